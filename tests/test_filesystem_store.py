"""The filesystem store: atomic, idempotent, and never outside its root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pacsfetch.plugins.contracts import IncomingInstance, InstanceIdentity
from pacsfetch.plugins.stores.filesystem import FilesystemBackend, FilesystemSettings

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _instance(tmp_path: Path, content: bytes = b"DICM-ish payload", sop: str = SOP,
              **attributes: str) -> IncomingInstance:
    spooled = tmp_path / f"spooled-{sop}.dcm"
    spooled.write_bytes(content)
    identity = InstanceIdentity(CT, sop, STUDY, SERIES, EXPLICIT, attributes)
    return IncomingInstance(identity, spooled, len(content))


def _session(root: Path, **settings: object):
    model = FilesystemSettings(root=root, **settings)
    return FilesystemBackend().open("local", model, "job1")


def test_write_is_invisible_until_commit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    session = _session(root)
    staged = session.write(_instance(tmp_path))
    final = root / STUDY / SERIES / f"{SOP}.dcm"
    assert not final.exists()
    assert staged.temp.exists() and staged.temp.is_relative_to(root / ".pacsfetch")
    assert session.commit(staged) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    session.sync()  # fsync, then rename: in place once sync returns
    assert final.read_bytes() == b"DICM-ish payload"
    session.close()
    assert not any((root / ".pacsfetch" / "spool").iterdir())


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    session = _session(root)
    staged = session.write(_instance(tmp_path))
    session.abort(staged)
    session.close()
    files = [p for p in root.rglob("*") if p.is_file() and "jobs" not in p.parts]
    assert files == []


def test_same_instance_twice_is_one_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    session = _session(root)
    session.commit(session.write(_instance(tmp_path, b"first")))
    session.commit(session.write(_instance(tmp_path, b"second")))
    session.close()
    files = [p for p in root.rglob("*.dcm")]
    assert len(files) == 1 and files[0].read_bytes() == b"second"


def test_manifest_records_what_the_job_wrote(tmp_path: Path) -> None:
    root = tmp_path / "root"
    session = _session(root)
    session.commit(session.write(_instance(tmp_path, sop="1.2.3.4.5")))
    session.commit(session.write(_instance(tmp_path, sop="1.2.3.4.6")))
    session.close()
    lines = (root / ".pacsfetch" / "jobs" / "job1.jsonl").read_text().splitlines()
    assert [json.loads(line)["sop_instance_uid"] for line in lines] == ["1.2.3.4.5", "1.2.3.4.6"]


def test_layout_values_from_the_wire_are_sanitised(tmp_path: Path) -> None:
    root = tmp_path / "root"
    session = _session(root, layout="{Modality}/{PatientID}/{SOPInstanceUID}.dcm")
    location = session.commit(session.write(
        _instance(tmp_path, Modality="../../..", PatientID="/etc/passwd")))
    session.close()
    assert location == f"_.._../_etc_passwd/{SOP}.dcm"
    assert (root / location).is_file()


def test_missing_layout_attribute_renders_unknown(tmp_path: Path) -> None:
    session = _session(tmp_path / "root", layout="{Modality}/{SOPInstanceUID}.dcm")
    assert session.commit(session.write(_instance(tmp_path))) == f"unknown/{SOP}.dcm"
    session.close()


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    os.symlink(outside, root / STUDY)
    session = _session(root)
    with pytest.raises(PermissionError, match="outside the store root"):
        session.write(_instance(tmp_path))
    session.close()
    assert list(outside.iterdir()) == []


def test_stale_spool_of_a_dead_process_is_swept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _session(root).close()
    import socket

    stale = root / ".pacsfetch" / "spool" / f"{socket.gethostname()}-999999-deadbeef"
    stale.mkdir()
    (stale / "x.part").write_bytes(b"half")
    session = _session(root)
    assert not stale.exists()
    session.close()
