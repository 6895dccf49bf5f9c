"""Forward stores against real archives: C-STORE into DCMTK storescp and a second Orthanc,
STOW-RS into Orthanc's DICOMweb plugin. Instances must arrive exactly as received."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacsfetch.config import ConfigError, parse_config
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.plugins.contracts import IncomingInstance
from pacsfetch.plugins.dicomfile import read_identity
from pacsfetch.plugins.registry import get_registry
from pacsfetch.plugins.stores.dicom_forward import (
    DicomForwardBackend,
    DicomForwardSession,
    DicomForwardSettings,
)
from pacsfetch.plugins.stores.stowrs import StowRsBackend, StowRsSession, StowRsSettings
from pacsfetch.sandbox.peers import Orthanc, StoreScp, free_port
from pacsfetch.sandbox.samples import SampleInstance, SampleStudy


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part-10 file: what crossed the wire, without the file meta."""
    assert part10[128:132] == b"DICM"
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


def spooled(sample: SampleInstance, spool: Path) -> IncomingInstance:
    spool.mkdir(exist_ok=True)
    path = spool / f"{uuid.uuid4().hex}.dcm"
    shutil.copyfile(sample.path, path)
    return IncomingInstance(read_identity(path), path, path.stat().st_size)


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    with StoreScp(tmp_path_factory.mktemp("storescp"), aet="NEWARCHIVE") as server:
        yield server


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A second Orthanc: the archive a migration moves studies into (DICOMweb on too)."""
    with Orthanc(tmp_path_factory.mktemp("archive"), aet="ARCHIVE") as server:
        yield server


def forward_session(aet: str, port: int, timeout: float = 10) -> DicomForwardSession:
    settings = DicomForwardSettings(ae_title=aet, host="127.0.0.1", port=port, timeout=timeout)
    return DicomForwardBackend().open("newpacs", settings, "job-" + uuid.uuid4().hex[:8])


def send_all(session: DicomForwardSession | StowRsSession, study: SampleStudy,
             spool: Path) -> list[str]:
    locations = []
    for sample in study.instances:
        locations.append(session.commit(session.write(spooled(sample, spool))))
    session.close()
    return locations


def test_cstore_into_storescp_arrives_byte_for_byte(
    storescp: StoreScp, mixed_study: SampleStudy, tmp_path: Path
) -> None:
    session = forward_session(storescp.aet, storescp.port)
    locations = send_all(session, mixed_study, tmp_path)
    assert set(locations) == {f"NEWARCHIVE@127.0.0.1:{storescp.port}"}
    pairs = {(i.sop_class_uid, i.transfer_syntax_uid) for i in mixed_study.instances}
    # Re-associating only when a new (SOP class, transfer syntax) pair shows up (or to send an
    # instance again after the archive stalled, which a loaded machine can provoke).
    assert 1 <= session.associations_opened - session.resends <= len(pairs)
    for sample in mixed_study.instances:
        [received] = storescp.received_dir.glob(f"*.{sample.sop_instance_uid}.dcm")
        assert dataset_bytes(received.read_bytes()) == dataset_bytes(sample.path.read_bytes())


def test_cstore_into_a_second_orthanc(archive: Orthanc, mixed_study: SampleStudy,
                                      tmp_path: Path) -> None:
    send_all(forward_session(archive.aet, archive.dicom_port), mixed_study, tmp_path)
    assert archive.list_study_instances(mixed_study.study_uid) == sorted(
        i.sop_instance_uid for i in mixed_study.instances)
    for sample in mixed_study.instances:
        stored = archive.get_instance_file(sample.sop_instance_uid)
        if sample.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
            # Orthanc keeps deflated data sets inflated: compare what they say, not bytes.
            assert dcmread(BytesIO(stored)) == dcmread(sample.path)
        else:
            assert dataset_bytes(stored) == dataset_bytes(sample.path.read_bytes())


def test_refused_cstore_fails_the_instance_with_the_status(
    tmp_path: Path, mixed_study: SampleStudy
) -> None:
    with StoreScp(tmp_path / "full", aet="FULL") as server:
        # The archive cannot write what it receives: storescp answers "out of resources".
        server.received_dir.rmdir()
        server.received_dir.write_text("not a directory")
        session = forward_session(server.aet, server.port)
        staged = session.write(spooled(mixed_study.instances[0], tmp_path / "spool"))
        with pytest.raises(RetrieveError) as info:
            session.commit(staged)
        session.close()
    assert info.value.kind == "store"
    assert f"FULL@127.0.0.1:{server.port} refused the instance: C-STORE status 0xA7" in (
        info.value.message)


def test_unreachable_destination_fails_every_instance_with_the_reason(
    mixed_study: SampleStudy, tmp_path: Path
) -> None:
    port = free_port()
    session = forward_session("NOBODY", port, timeout=2)
    first = session.write(spooled(mixed_study.instances[0], tmp_path))
    with pytest.raises(RetrieveError) as info:
        session.commit(first)
    assert info.value.kind == "connection"
    assert f"cannot connect to 127.0.0.1:{port}" in info.value.message
    with pytest.raises(RetrieveError) as again:  # not asked again for every instance
        session.write(spooled(mixed_study.instances[1], tmp_path))
    assert again.value is info.value
    session.close()
    assert session.associations_opened == 0


def stow_session(url: str, **settings: str) -> StowRsSession:
    return StowRsBackend().open("web", StowRsSettings(url=url, timeout=10, **settings), "job")


def test_stalling_archive_costs_a_fresh_association_then_fails_the_instance_saying_so(
        tmp_path: Path, mixed_study: SampleStudy) -> None:
    # storescp sits on every C-STORE for 3 s; the store waits 1 s per answer. Each stall
    # must be noticed, answered with a fresh association, and the end told plainly.
    with StoreScp(tmp_path / "stalling", aet="SLOWPACS", stall_s=3) as slow:
        session = forward_session(slow.aet, slow.port, timeout=1)
        with pytest.raises(RetrieveError) as info:
            session.commit(session.write(spooled(mixed_study.instances[0], tmp_path / "spool")))
        session.close()
    assert session.resends == 2
    assert info.value.kind is ErrorKind.ASSOCIATION_ABORTED
    assert "did not answer the C-STORE within 1 s" in info.value.message
    assert "2 times" in info.value.message


def test_stowrs_into_orthanc(archive: Orthanc, mixed_study: SampleStudy, big_study: SampleStudy,
                             tmp_path: Path) -> None:
    some = SampleStudy(big_study.study_uid, big_study.patient_id, big_study.instances[:5])
    locations = send_all(stow_session(archive.dicomweb_url), some, tmp_path)
    assert archive.list_study_instances(some.study_uid) == sorted(
        i.sop_instance_uid for i in some.instances)
    for sample, location in zip(some.instances, locations, strict=True):
        assert location.startswith(archive.dicomweb_url)
        assert sample.sop_instance_uid in location
        stored = archive.get_instance_file(sample.sop_instance_uid)
        assert dataset_bytes(stored) == dataset_bytes(sample.path.read_bytes())


def test_stowrs_refusal_names_the_reason(archive: Orthanc, tmp_path: Path,
                                         mixed_study: SampleStudy) -> None:
    instance = spooled(mixed_study.instances[0], tmp_path)
    garbage = instance.path.read_bytes()[:200]  # a truncated file the archive cannot parse
    instance.path.write_bytes(garbage)
    session = stow_session(archive.dicomweb_url)
    with pytest.raises(RetrieveError) as info:
        session.commit(session.write(IncomingInstance(instance.identity, instance.path,
                                                      len(garbage))))
    session.close()
    assert info.value.kind == "store"
    assert f"{archive.dicomweb_url}/studies did not confirm the instance (HTTP 400" in (
        info.value.message)


def test_stowrs_endpoint_down(mixed_study: SampleStudy, tmp_path: Path) -> None:
    session = stow_session(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(RetrieveError) as info:
        session.commit(session.write(spooled(mixed_study.instances[0], tmp_path)))
    session.close()
    assert "cannot reach the STOW-RS endpoint" in info.value.message


def test_stowrs_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PF_TEST_STOW_TOKEN", raising=False)
    with pytest.raises(RetrieveError) as info:
        stow_session("http://127.0.0.1:1/dicom-web", token_env="PF_TEST_STOW_TOKEN")
    assert info.value.kind == "config"
    assert "PF_TEST_STOW_TOKEN" in info.value.message and "stores.web" in info.value.message


@pytest.mark.parametrize(("plugin", "settings", "message"), [
    ("dicom", {"ae_title": "A", "host": "h", "port": 104, "aet": "B"},
     "stores.out.aet: unknown key"),
    ("dicom", {"ae_title": "A", "host": "h"}, "stores.out.port: Field required"),
    ("dicom", {"ae_title": "A" * 17, "host": "h", "port": 104}, "stores.out.ae_title"),
    ("stow-rs", {"url": "not a url"}, "stores.out.url"),
    ("stow-rs", {"url": "http://h/dicom-web", "password": "x"}, "stores.out.password: unknown key"),
    ("stow-rs", {"url": "http://h/dicom-web", "username": "u"},
     "username and password_env go together"),
])
def test_bad_keys_refuse_start_up(plugin: str, settings: dict[str, object], message: str) -> None:
    config = parse_config({"stores": {"out": {"plugin": plugin, **settings}}})
    with pytest.raises(ConfigError) as info:
        get_registry().check_config(config)
    assert message in str(info.value)


class UncompressedOnlyStoreScp(StoreScp):
    """storescp as an archive that accepts only uncompressed transfer syntaxes (its default
    without ``--accept-all``)."""

    def _command(self) -> list[str]:
        return [arg for arg in super()._command() if arg != "--accept-all"]


def test_refused_transfer_syntax_is_a_negotiation_error_naming_it(
    tmp_path: Path, mixed_study: SampleStudy
) -> None:
    compressed = {i.transfer_syntax_uid for i in mixed_study.instances} - {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    assert compressed, "the mixed study must hold compressed instances"
    with UncompressedOnlyStoreScp(tmp_path / "plain", aet="PLAIN") as server:
        session = forward_session(server.aet, server.port)
        errors: dict[str, str] = {}
        for sample in mixed_study.instances:
            try:
                session.commit(session.write(spooled(sample, tmp_path / "spool")))
            except RetrieveError as exc:
                assert exc.kind == "negotiation"
                errors[sample.transfer_syntax_uid] = exc.message
        session.close()
    assert set(errors) == compressed
    for syntax, message in errors.items():
        assert "does not accept" in message and UID(syntax).name in message
        assert "never transcoded" in message
    received = {p.name.split(".", 1)[1].removesuffix(".dcm")
                for p in server.received_dir.glob("*.dcm")}
    assert received == {i.sop_instance_uid for i in mixed_study.instances
                        if i.transfer_syntax_uid not in compressed}
