"""C-GET into the filesystem, inline (no broker), against real Orthanc and DCMTK peers."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import run_job
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacsfetch.config import Config
from pacsfetch.models import JobRequest, JobStatus, Level
from pacsfetch.sandbox.peers import DcmQrScp, Orthanc
from pacsfetch.sandbox.samples import SampleStudy
from pacsfetch.workers.state import LocalJobState


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part-10 file: what crossed the wire, without our file meta."""
    assert part10[128:132] == b"DICM"
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".pacsfetch" not in p.parts)


@pytest.fixture
def config(config_factory: Callable[..., Config], orthanc: Orthanc) -> Config:
    return config_factory(orthanc=orthanc)


def _root(config: Config) -> Path:
    return Path(config.stores["local"].settings["root"])


def test_study_with_several_sop_classes_and_compressed_syntaxes_is_stored_byte_for_byte(
    config: Config, orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid, store="local",
                         transport="c-get")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "c-get"
    assert outcome.progress.completed == len(mixed_study.instances)
    files = stored_files(_root(config))
    assert len(files) == len(mixed_study.instances)
    by_sop = {i.sop_instance_uid: i for i in mixed_study.instances}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        sample = by_sop[ds.SOPInstanceUID]
        assert path.relative_to(_root(config)).as_posix() == (
            f"{sample.study_uid}/{sample.series_uid}/{sample.sop_instance_uid}.dcm")
        assert ds.file_meta.TransferSyntaxUID == sample.transfer_syntax_uid
        assert ds.file_meta.MediaStorageSOPClassUID == sample.sop_class_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == sample.sop_instance_uid
        original = orthanc.get_instance_file(sample.sop_instance_uid)
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(original)
    assert outcome.progress.bytes == sum(p.stat().st_size for p in files)


def test_series_level(config: Config, mixed_study: SampleStudy) -> None:
    series = mixed_study.series_uids[1]
    request = JobRequest(source="orthanc", level=Level.SERIES, study_uid=mixed_study.study_uid,
                         series_uid=series, store="local")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    expected = {i.sop_instance_uid for i in mixed_study.instances_of_series(series)}
    assert {p.stem for p in stored_files(_root(config))} == expected


@pytest.mark.parametrize("with_series", [True, False])
def test_single_instances(config: Config, mixed_study: SampleStudy, with_series: bool) -> None:
    chosen = mixed_study.instances_of_series(mixed_study.series_uids[2])[:2]
    request = JobRequest(source="orthanc", level=Level.IMAGE, study_uid=mixed_study.study_uid,
                         series_uid=chosen[0].series_uid if with_series else None,
                         sop_uids=[i.sop_instance_uid for i in chosen], store="local")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert {p.stem for p in stored_files(_root(config))} == {i.sop_instance_uid for i in chosen}


def test_resumed_job_asks_only_for_what_is_missing(config: Config, mixed_study: SampleStudy) -> None:
    done = mixed_study.instances[:4]
    state = LocalJobState()
    state.instances = {i.sop_instance_uid: '{"local":"earlier"}' for i in done}
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid, store="local")
    outcome = run_job(config, request, state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.skipped == 4
    assert outcome.progress.completed == len(mixed_study.instances)
    # The four "earlier" ones were not fetched again: their files are not in this store.
    assert {p.stem for p in stored_files(_root(config))} == {
        i.sop_instance_uid for i in mixed_study.instances[4:]}


def test_study_the_pacs_does_not_hold_fails_with_a_query_error(config: Config) -> None:
    request = JobRequest(source="orthanc", study_uid="1.2.3.4.5.6.7", store="local")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "query" and "C-FIND found none" in (outcome.error or "")


def test_refused_storage_contexts_are_reported_as_negotiation(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    # Propose only a transfer syntax Orthanc does not know: it refuses every storage context.
    config = config_factory(orthanc=orthanc)
    source = config.sources["orthanc"].model_copy(update={"transfer_syntaxes": ["1.2.3.999.1"]})
    config = config.model_copy(update={"sources": {"orthanc": source}})
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid, store="local")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "negotiation"
    assert "refused every storage presentation context" in (outcome.error or "")
    assert "CT Image Storage" in (outcome.error or "")
    assert stored_files(_root(config)) == []


def test_pacs_down_is_a_connection_error(config_factory: Callable[..., Config]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the retrieve: nobody listens
    config = config_factory(extra_sources={"down": {"ae_title": "DOWN", "host": "127.0.0.1",
                                                    "port": port, "timeout": 2}})
    request = JobRequest(source="down", study_uid="1.2.3", store="local")
    from pacsfetch.errors import RetrieveError

    with pytest.raises(RetrieveError) as info:
        run_job(config, request)
    assert info.value.kind == "connection" and info.value.retryable
    assert f"cannot connect to 127.0.0.1:{port}" in info.value.message


def test_silent_peer_is_a_timeout(config_factory: Callable[..., Config], silent_port: int) -> None:
    config = config_factory(extra_sources={"mute": {"ae_title": "MUTE", "host": "127.0.0.1",
                                                    "port": silent_port, "timeout": 1}})
    from pacsfetch.errors import RetrieveError

    with pytest.raises(RetrieveError) as info:
        run_job(config, JobRequest(source="mute", study_uid="1.2.3", store="local"))
    assert info.value.kind == "timeout"
    assert "did not answer the association request" in info.value.message


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, mixed_study: SampleStudy) -> Iterator[DcmQrScp]:
    files = [instance.path for instance in mixed_study.instances]
    with DcmQrScp(tmp_path_factory.mktemp("dcmqrscp"), files=files) as server:
        yield server


def test_dcmtk_archive_study_is_stored_byte_for_byte(
    config_factory: Callable[..., Config], dcmqrscp: DcmQrScp, mixed_study: SampleStudy
) -> None:
    # dcmqrscp returns neither SOP Class UID nor Available Transfer Syntax UID in C-FIND and
    # cannot decompress: the transport must guess classes and syntaxes in rounds.
    config = config_factory(extra_sources={"dcmtk": {
        "ae_title": dcmqrscp.aet, "host": "127.0.0.1", "port": dcmqrscp.port, "timeout": 10}})
    request = JobRequest(source="dcmtk", study_uid=mixed_study.study_uid, store="local")
    outcome = run_job(config, request)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    files = stored_files(_root(config))
    assert len(files) == len(mixed_study.instances)
    by_sop = {i.sop_instance_uid: i for i in mixed_study.instances}
    for path in files:
        sample = by_sop[path.stem]
        stored = dcmread(path)
        if sample.transfer_syntax_uid in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            # dcmqrscp sends an instance on the first context accepted for its class, and the
            # first round offers Explicit VR Little Endian: it re-encodes uncompressed data
            # sets (losslessly) to that. Compressed ones it cannot re-encode, so they arrive
            # exactly as stored, in later rounds.
            original = dcmread(sample.path)
            assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert stored.PixelData == original.PixelData
            assert stored.SOPInstanceUID == original.SOPInstanceUID
            continue
        assert stored.file_meta.TransferSyntaxUID == sample.transfer_syntax_uid
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(sample.path.read_bytes())
