"""Named tokens with scopes, from the environment or a file of digests; every job records
who created it; the API's audit lines name the caller (real Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from test_api import EXTRA_SOURCE, STUDY

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, ConfigError, parse_config
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest
from pacsfetch.tokens import HL7_LISTENER, SCHEDULER, add_token, hash_token, read_tokens_file

JOB = {"source": "pacs2", "study_uid": STUDY, "store": "local"}


def _with(config: Config, **api: object) -> Config:
    return config.model_copy(update={"api": config.api.model_copy(update=api)})


@pytest.fixture
def config(config_factory: Callable[..., Config], tmp_path: Path) -> Config:
    base = config_factory(extra_sources=EXTRA_SOURCE)
    return base.model_copy(update={"audit": base.audit.model_copy(
        update={"path": tmp_path / "audit.jsonl"})})


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens"
    made = {"ris": add_token(path, "ris", "submit,read"), "viewer": add_token(path, "viewer", "read"),
            "ops": add_token(path, "ops", "admin")}
    return path, made


def _client(config: Config, token: str | None = None) -> TestClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return TestClient(create_app(config), headers=headers)


def test_the_tokens_file_holds_digests_only(tokens: tuple[Path, dict[str, str]]) -> None:
    path, made = tokens
    text = path.read_text()
    assert all(secret not in text for secret in made.values())
    assert hash_token(made["ris"]) in text
    assert [c.name for c, _ in read_tokens_file(path)] == ["ris", "viewer", "ops"]
    assert path.stat().st_mode & 0o077 == 0


def test_scopes_decide_and_jobs_record_the_token_name(
        config: Config, tokens: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PACSFETCH_API_TOKEN", raising=False)
    path, made = tokens
    config = _with(config, tokens_file=path)
    ris, viewer, ops = (_client(config, made[n]) for n in ("ris", "viewer", "ops"))
    assert _client(config).get("/jobs").status_code == 401
    assert _client(config, "nope").get("/jobs").status_code == 401
    job_id = ris.post("/jobs", json=JOB).json()["id"]
    assert ris.get(f"/jobs/{job_id}").json()["created_by"] == "ris"
    denied = viewer.post("/jobs", json=JOB)
    assert denied.status_code == 403 and "'submit'" in denied.json()["detail"]
    assert viewer.delete(f"/jobs/{job_id}").status_code == 403
    assert viewer.get(f"/jobs/{job_id}").status_code == 200
    batch = ops.post("/jobs/batch", json={"jobs": [JOB, JOB]}).json()["jobs"]
    assert {ops.get(f"/jobs/{j['id']}").json()["created_by"] for j in batch} == {"ops"}
    assert ops.delete(f"/jobs/{job_id}").json()["status"] == "cancelled"
    lines = [json.loads(line) for line in config.audit.path.read_text().splitlines()]
    assert [(e["event"], e["caller"]) for e in lines] == [
        ("job.submit", "ris"), ("job.submit", "ops"), ("job.submit", "ops"),
        ("job.cancel", "ops")]
    cancel = lines[-1]
    assert cancel["job_id"] == job_id and cancel["created_by"] == "ris"
    assert cancel["source"] == "pacs2" and cancel["study_uids"] == [STUDY]
    assert cancel["stores"] == ["local"] and cancel["status"] == "cancelled"
    assert cancel["counts"]["completed"] == 0 and cancel["time"]


def test_named_tokens_from_the_environment(config: Config,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSFETCH_API_TOKEN", "legacy")
    monkeypatch.setenv("PACSFETCH_API_TOKENS", "ris:submit,read:t-ris viewer:read:t-view")
    app = create_app(config)
    job_id = _client(config, "t-ris").post("/jobs", json=JOB).json()["id"]
    assert TestClient(app, headers={"Authorization": "Bearer legacy"}).get(
        f"/jobs/{job_id}").json()["created_by"] == "ris"
    assert _client(config, "t-view").post("/jobs", json=JOB).status_code == 403


def test_without_tokens_callers_are_anonymous(config: Config,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACSFETCH_API_TOKEN", raising=False)
    client = _client(config)
    job_id = client.post("/jobs", json=JOB).json()["id"]
    assert client.get(f"/jobs/{job_id}").json()["created_by"] == "anonymous"


@pytest.mark.parametrize(("line", "text"), [
    ("ris submit,read notahash", "line 2: expected 'NAME SCOPES sha256:HEX'"),
    (f"ris submit,write {hash_token('x')}", "line 2: scopes must be some of"),
    (f"bad/name read {hash_token('x')}", "line 2: a token name"),
    (f"ops read {hash_token('y')}", "token name 'ops' is given twice"),
])
def test_a_bad_tokens_file_refuses_start_naming_the_line(
        config: Config, tmp_path: Path, line: str, text: str) -> None:
    path = tmp_path / "bad-tokens"
    path.write_text(f"ops admin {hash_token('x')}\n{line}\n")
    with pytest.raises(ConfigError, match="api.tokens_file") as info:
        create_app(_with(config, tokens_file=path))
    assert text in str(info.value)


def test_bad_env_tokens_refuse_start(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSFETCH_API_TOKENS", "ris:superuser:abc")
    with pytest.raises(ConfigError, match="PACSFETCH_API_TOKENS entry 1"):
        create_app(config)


def test_services_create_jobs_under_their_own_names(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    request = JobRequest(source="pacs2", study_uid=STUDY, store="local")
    joined = store.create_or_join(request, origin="prefetch", created_by=HL7_LISTENER.name)
    assert store.get(joined.record.id).created_by == "hl7-listener"
    [job] = store.create_batch([request.model_copy(update={"study_uid": STUDY + ".2"})],
                               origin="migration", created_by=SCHEDULER.name)
    assert store.get(job.id).created_by == "scheduler"


def test_cli_token_add_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    cli = [sys.executable, "-m", "pacsfetch"]
    added = subprocess.run([*cli, "token", "add", "pacs-admin", "--scopes", "admin",
                            "--file", str(path)], capture_output=True, text=True, check=True)
    secret = added.stdout.strip()
    assert len(secret) >= 40 and secret not in path.read_text()
    hashed = subprocess.run([*cli, "token", "hash"], input=secret + "\n", capture_output=True,
                            text=True, check=True)
    assert path.read_text().split() == ["pacs-admin", "admin", hashed.stdout.strip()]
    again = subprocess.run([*cli, "token", "add", "pacs-admin", "--file", str(path)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already has a token named 'pacs-admin'" in again.stderr


def test_audit_path_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="audit.path"):
        parse_config({"audit": {"path": str(tmp_path / "missing" / "audit.jsonl")}})
    with pytest.raises(ConfigError, match="audit.path"):
        parse_config({"audit": {"path": str(tmp_path)}})


def test_a_full_audit_disk_is_counted_and_the_job_still_goes(config: Config) -> None:
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    full = config.model_copy(update={"audit": config.audit.model_copy(
        update={"path": Path("/dev/full")})})
    before = REGISTRY.get_sample_value("pacsfetch_audit_write_failures_total") or 0
    client = _client(full)
    response = client.post("/jobs", json=JOB)
    assert response.status_code == 202
    assert client.get(f"/jobs/{response.json()['id']}").json()["status"] == "queued"
    assert REGISTRY.get_sample_value("pacsfetch_audit_write_failures_total") == before + 1
