"""Bad configuration refuses start-up with a message naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsfetch.config import ConfigError, load_config, parse_config
from pacsfetch.plugins.registry import get_registry

SOURCE = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


def test_contract_example_from_the_issue_loads(tmp_path: Path) -> None:
    path = tmp_path / "pacsfetch.toml"
    path.write_text(
        """
[broker]
url = "redis://127.0.0.1:6379/0"

[sources.orthanc]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
calling_ae_title = "PACSFETCH"
transports = ["c-get"]
dicomweb_url = "http://127.0.0.1:8042/dicom-web"

[stores.local]
plugin = "filesystem"
root = "/data/dicom"
layout = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
"""
    )
    config = load_config(path)
    assert config.sources["orthanc"].port == 4242
    assert config.sources["orthanc"].calling_ae_title == "PACSFETCH"
    settings = get_registry().check_config(config)
    assert str(settings["local"].root) == "/data/dicom"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sources": {"o": {**SOURCE, "prot": 1}}}, "sources.o.prot: unknown key"),
        ({"sources": {"o": {**SOURCE, "port": 70000}}}, "sources.o.port:"),
        ({"sources": {"o": {**SOURCE, "ae_title": "A" * 17}}}, "sources.o.ae_title:"),
        ({"sources": {"o": {**SOURCE, "transports": []}}}, "sources.o.transports:"),
        ({"sources": {"o": {**SOURCE, "transfer_syntaxes": ["1.2.x"]}}},
         "sources.o.transfer_syntaxes[0]:"),
        ({"broker": {"url": "http://x"}}, "broker.url:"),
        ({"brokers": {}}, "brokers: unknown key"),
        ({"worker": {"concurrency": 0}}, "worker.concurrency:"),
        ({"stores": {"s": {"root": "/x"}}}, "stores.s.plugin:"),
        ({"sources": {"o": {**SOURCE, "dicomweb_url": "http://user:secret@pacs/dicom-web"}}},
         "sources.o.dicomweb_url: Value error, must not embed credentials"),
        ({"sources": {"o": {**SOURCE, "dicomweb_url": "https://token@pacs/dicom-web"}}},
         "sources.o.dicomweb_url:"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert key in str(info.value)
    assert "secret" not in str(info.value)  # a refused URL's password is not echoed


@pytest.mark.parametrize(
    ("store", "key"),
    [
        ({"plugin": "filesystem", "root": "/x", "layuot": "{SOPInstanceUID}"}, "stores.s.layuot: unknown key"),
        ({"plugin": "filesystem", "root": "/x", "layout": "{PatientName}/{SOPInstanceUID}"}, "stores.s.layout:"),
        ({"plugin": "filesystem", "root": "/x", "layout": "{StudyInstanceUID}.dcm"}, "stores.s.layout:"),
        ({"plugin": "filesystem", "root": "/x", "layout": "../{SOPInstanceUID}"}, "stores.s.layout:"),
        ({"plugin": "filesystem"}, "stores.s.root:"),
        # Inside the store's control area, whose spool sweep deletes what it finds there.
        ({"plugin": "filesystem", "root": "/x", "layout": ".pacsfetch/{SOPInstanceUID}"},
         "stores.s.layout: Value error, must not write into the store's control area"),
        ({"plugin": "filesystem", "root": "/x", "layout": ".PACSFETCH/spool/{SOPInstanceUID}"},
         "stores.s.layout:"),
        ({"plugin": "s3", "bucket": "b", "layout": ".pacsfetch/{SOPInstanceUID}"},
         "stores.s.layout:"),
        ({"plugin": "filesystem", "root": "/x", "layout": "a\0b/{SOPInstanceUID}"},
         "stores.s.layout: Value error, must not contain a NUL"),
        ({"plugin": "nosuch", "root": "/x"}, "stores.s.plugin: no store plugin named 'nosuch'"),
    ],
)
def test_store_plugin_keys_are_checked_by_the_plugin(store: dict, key: str) -> None:
    config = parse_config({"stores": {"s": store}})
    with pytest.raises(ConfigError) as info:
        get_registry().check_config(config)
    assert key in str(info.value)


def test_unknown_transport_is_refused_naming_the_list_entry() -> None:
    config = parse_config({"sources": {"o": {**SOURCE, "transports": ["c-get", "carrier-pigeon"]}}})
    with pytest.raises(ConfigError, match=r"sources\.o\.transports\[1\]: no transport plugin"):
        get_registry().check_config(config)


def test_broker_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSFETCH_BROKER_URL", "redis://10.0.0.9:6380/2")
    assert parse_config({}).broker.url == "redis://10.0.0.9:6380/2"


def test_missing_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PACSFETCH_CONFIG"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize("command", [["worker"], ["api"], ["check-config"]])
def test_processes_refuse_to_start_on_bad_config(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[sources.o]\nae_title = "O"\nhost = "h"\nport = 1\ntimeout_s = 3\n')
    result = subprocess.run([sys.executable, "-m", "pacsfetch", *command], capture_output=True,
                            text=True, env={"PACSFETCH_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
                            timeout=60)
    assert result.returncode == 2
    assert "sources.o.timeout_s: unknown key" in result.stderr
