"""Transport ``auto``: fall back along the source's ``transports``, resume, explain why."""

from __future__ import annotations

from collections.abc import Callable

from helpers import CALLING_AE, run_job
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from test_cget import stored_files
from test_dicomweb import _root

from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore, encode_notes
from pacsfetch.models import JobRequest, JobStatus, TransportNote
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import SampleStudy
from pacsfetch.workers.runner import FALLBACK_KINDS


def test_refused_c_get_falls_back_to_dicomweb_and_says_why(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    # Proposing only a transfer syntax Orthanc does not know makes it refuse every storage
    # context: C-GET can bring nothing, DICOMweb (plain HTTP) brings everything.
    config = config_factory(extra_sources={"pacs": {
        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
        "calling_ae_title": CALLING_AE, "transports": ["c-get", "dicomweb"],
        "dicomweb_url": orthanc.dicomweb_url, "transfer_syntaxes": ["1.2.3.999.1"],
        "timeout": 10}})
    outcome = run_job(config, JobRequest(source="pacs", study_uid=mixed_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "dicomweb"
    assert [(n.transport, n.error_kind) for n in outcome.transport_notes] == [("c-get", "negotiation")]
    assert "refused every storage presentation context" in outcome.transport_notes[0].error
    assert len(stored_files(_root(config))) == len(mixed_study.instances)


def test_explicit_transport_does_not_fall_back(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    config = config_factory(extra_sources={"pacs": {
        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
        "transports": ["c-get", "dicomweb"], "dicomweb_url": orthanc.dicomweb_url,
        "transfer_syntaxes": ["1.2.3.999.1"], "timeout": 10}})
    outcome = run_job(config, JobRequest(source="pacs", study_uid=mixed_study.study_uid,
                                         store="local", transport="c-get"))
    assert outcome.status is JobStatus.FAILED and outcome.error_kind == "negotiation"
    assert outcome.transport_notes == ()


def test_next_transport_continues_where_the_first_stopped(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy,
) -> None:
    # Offered uncompressed syntaxes only, Orthanc sends what it can by C-GET (transcoding
    # where its codecs allow) and fails the rest (it has no JPEG 2000 decoder without the
    # GDCM plugin); DICOMweb then brings exactly the instances still missing.
    config = config_factory(extra_sources={"pacs": {
        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
        "calling_ae_title": CALLING_AE, "transports": ["c-get", "dicomweb"],
        "dicomweb_url": orthanc.dicomweb_url,
        "transfer_syntaxes": [ExplicitVRLittleEndian, ImplicitVRLittleEndian], "timeout": 10}})
    first = run_job(config, JobRequest(source="pacs", study_uid=mixed_study.study_uid,
                                 store="local", transport="c-get"))
    by_c_get = first.progress.completed
    assert 0 < by_c_get < len(mixed_study.instances), first.error
    for path in stored_files(_root(config)):
        path.unlink()

    outcome = run_job(config, JobRequest(source="pacs", study_uid=mixed_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "dicomweb"
    assert [n.transport for n in outcome.transport_notes] == ["c-get"]
    assert outcome.transport_notes[0].error_kind in {k.value for k in FALLBACK_KINDS}
    assert len(stored_files(_root(config))) == len(mixed_study.instances)
    assert outcome.progress.completed == len(mixed_study.instances)


def test_move_destination_and_auth_failures_fall_back() -> None:
    assert {"move-destination", "auth", "negotiation"} <= {k.value for k in FALLBACK_KINDS}


def test_transport_notes_are_kept_on_the_job(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create(JobRequest(source="pacs", study_uid="1.2.3", store="local"))
    note = TransportNote(transport="c-get", error_kind="negotiation", error="refused")
    store.transition(job.id, JobStatus.SUCCEEDED, transport="dicomweb",
                     transport_notes=encode_notes([note]))
    assert store.get(job.id).transport_notes == [note]
