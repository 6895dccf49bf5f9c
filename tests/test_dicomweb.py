"""DICOMweb (WADO-RS/QIDO-RS) into the filesystem, inline, against Debian's Orthanc with its
DICOMweb plugin (with and without HTTP authentication)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import run_job
from pydicom import dcmread
from test_cget import dataset_bytes, stored_files

from pacsfetch.config import Config, ConfigError
from pacsfetch.errors import RetrieveError
from pacsfetch.models import JobRequest, JobStatus, Level
from pacsfetch.sandbox.peers import Orthanc, free_port
from pacsfetch.sandbox.samples import SampleStudy
from pacsfetch.workers.state import LocalJobState

USER, PASSWORD_ENV = "pacsfetch", "PF_TEST_DICOMWEB_PASSWORD"


def web_source(url: str, **extra: Any) -> dict[str, Any]:
    """A source reached only through its DICOMweb URL (the DIMSE port is never used)."""
    return {"ae_title": "GATEWAY", "host": "127.0.0.1", "port": 104, "transports": ["dicomweb"],
            "dicomweb_url": url, "timeout": 5, **extra}


@pytest.fixture
def config(config_factory: Callable[..., Config], orthanc: Orthanc) -> Config:
    return config_factory(extra_sources={"web": web_source(orthanc.dicomweb_url)})


@pytest.fixture(scope="module")
def secured_orthanc(tmp_path_factory: pytest.TempPathFactory,
                    mixed_study: SampleStudy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={USER: "s3cret-pw"}) as server:
        server.upload(i.path for i in mixed_study.instances[:3])
        yield server


def _root(config: Config) -> Path:
    return Path(config.stores["local"].settings["root"])


def test_study_with_several_transfer_syntaxes_arrives_as_stored_byte_for_byte(
    config: Config, orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    request = JobRequest(source="web", study_uid=mixed_study.study_uid, store="local",
                         transport="dicomweb")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "dicomweb"
    files = stored_files(_root(config))
    assert len(files) == len(mixed_study.instances) == outcome.progress.completed
    by_sop = {i.sop_instance_uid: i for i in mixed_study.instances}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        sample = by_sop[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == sample.transfer_syntax_uid
        assert ds.file_meta.MediaStorageSOPClassUID == sample.sop_class_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == sample.sop_instance_uid
        original = orthanc.get_instance_file(sample.sop_instance_uid)
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(original), sample.series_uid
    assert list((_root(config)).rglob("dicomweb-*")) == []  # no spool file left behind


def test_series_and_instance_level(config: Config, mixed_study: SampleStudy) -> None:
    series = mixed_study.series_uids[3]
    request = JobRequest(source="web", level=Level.SERIES, study_uid=mixed_study.study_uid,
                         series_uid=series, store="local", transport="dicomweb")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    expected = {i.sop_instance_uid for i in mixed_study.instances_of_series(series)}
    assert {p.stem for p in stored_files(_root(config))} == expected

    chosen = [i.sop_instance_uid for i in mixed_study.instances_of_series(mixed_study.series_uids[0])[:2]]
    request = JobRequest(source="web", level=Level.IMAGE, study_uid=mixed_study.study_uid,
                         sop_uids=chosen, store="local", transport="dicomweb")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == 2
    assert {p.stem for p in stored_files(_root(config))} == expected | set(chosen)


def test_resumed_job_fetches_only_what_is_missing(config: Config, mixed_study: SampleStudy) -> None:
    done = mixed_study.instances[:5]  # the whole first series and part of the second
    state = LocalJobState()
    state.instances = {i.sop_instance_uid: '{"local":"earlier"}' for i in done}
    request = JobRequest(source="web", study_uid=mixed_study.study_uid, store="local",
                         transport="dicomweb")
    outcome = run_job(config, request, state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.skipped == 5
    assert outcome.progress.completed == len(mixed_study.instances)
    assert {p.stem for p in stored_files(_root(config))} == {
        i.sop_instance_uid for i in mixed_study.instances[5:]}


def test_unknown_study_is_reported_as_not_on_the_gateway(config: Config) -> None:
    outcome = run_job(config, JobRequest(source="web", study_uid="1.2.3.4.5.6.7", store="local",
                                         transport="dicomweb"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "query"
    assert "DICOMweb gateway" in (outcome.error or "")


def test_sandbox_orthanc_with_users_demands_authentication(secured_orthanc: Orthanc) -> None:
    assert httpx.get(f"{secured_orthanc.dicomweb_url}/studies").status_code == 401
    assert secured_orthanc.instance_count() == 3  # the sandbox itself authenticates


def test_wrong_or_missing_credentials_are_an_auth_failure(
    config_factory: Callable[..., Config], secured_orthanc: Orthanc, mixed_study: SampleStudy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    config = config_factory(extra_sources={
        "web": web_source(secured_orthanc.dicomweb_url, dicomweb_username=USER,
                          dicomweb_password_env=PASSWORD_ENV)})
    outcome = run_job(config, JobRequest(source="web", study_uid=mixed_study.study_uid,
                                         store="local", transport="dicomweb"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "auth"
    assert "HTTP 401" in (outcome.error or "") and "dicomweb_password_env" in (outcome.error or "")
    assert "wrong" not in (outcome.error or "")

    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    outcome = run_job(config, JobRequest(source="web", study_uid=mixed_study.study_uid,
                                         store="local", transport="dicomweb"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == 3


def test_unset_secret_variable_fails_naming_the_key(
    config_factory: Callable[..., Config], secured_orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PF_TEST_UNSET_TOKEN", raising=False)
    config = config_factory(extra_sources={
        "web": web_source(secured_orthanc.dicomweb_url, dicomweb_token_env="PF_TEST_UNSET_TOKEN")})
    outcome = run_job(config, JobRequest(source="web", study_uid="1.2.3", store="local",
                                         transport="dicomweb"))
    assert outcome.status is JobStatus.FAILED and outcome.error_kind == "config"
    assert "sources.web.dicomweb_token_env" in (outcome.error or "")


def test_auth_keys_are_checked_at_start_up(config_factory: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="dicomweb_username and dicomweb_password_env"):
        config_factory(extra_sources={"web": web_source("http://127.0.0.1:1/", dicomweb_username="u")})
    with pytest.raises(ConfigError, match="dicomweb_password_env"):
        config_factory(extra_sources={"web": web_source(
            "http://127.0.0.1:1/", dicomweb_username="u", dicomweb_password_env="not a name")})
    with pytest.raises(ConfigError, match="dicomweb_transfer_syntax"):
        config_factory(extra_sources={"web": web_source(
            "http://127.0.0.1:1/", dicomweb_transfer_syntax="jpeg please")})


@pytest.fixture
def failing_gateway() -> Iterator[str]:
    """The one stand-in: Orthanc cannot be made to answer 500 on demand, so this tiny local
    HTTP server answers every request with 500 Internal Server Error."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def test_gateway_error_500_is_retryable(config_factory: Callable[..., Config],
                                        failing_gateway: str) -> None:
    config = config_factory(extra_sources={"web": web_source(failing_gateway)})
    with pytest.raises(RetrieveError) as info:
        run_job(config, JobRequest(source="web", study_uid="1.2.3", store="local",
                                   transport="dicomweb"))
    assert info.value.kind == "connection" and info.value.retryable
    assert "HTTP 500" in info.value.message


def test_gateway_down_is_a_retryable_connection_error(config_factory: Callable[..., Config]) -> None:
    port = free_port()  # nobody listens there any more
    config = config_factory(extra_sources={"web": web_source(f"http://127.0.0.1:{port}/dicom-web")})
    with pytest.raises(RetrieveError) as info:
        run_job(config, JobRequest(source="web", study_uid="1.2.3", store="local",
                                   transport="dicomweb"))
    assert info.value.kind == "connection" and info.value.retryable
    assert "cannot reach" in info.value.message


def test_silent_gateway_is_a_timeout(config_factory: Callable[..., Config]) -> None:
    server = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web"
        config = config_factory(extra_sources={"web": web_source(url, timeout=1)})
        with pytest.raises(RetrieveError) as info:
            run_job(config, JobRequest(source="web", study_uid="1.2.3", store="local",
                                       transport="dicomweb"))
    finally:
        server.close()
    assert info.value.kind == "timeout" and info.value.retryable
