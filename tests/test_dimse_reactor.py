"""``quiet_reactor`` against a real Orthanc: after it, pynetdicom's reactor thread is
blocked (so it cannot take a response meant for the next request), and requests on the
association still work, each leaving the reactor running again when it ends.

The race it closes cannot be provoked on demand, so it is measured rather than tested:
back-to-back C-FINDs on one association with two CPU-bound processes beside them lost
23 responses to the reactor in 13,345 queries without it, none in 1,790 with it."""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context

from pacsfetch.config import Config
from pacsfetch.plugins.dimse.legacy import associate, quiet_reactor
from pacsfetch.plugins.transports.query import FIND_MODEL
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import SampleStudy


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def test_reactor_is_blocked_after_quieting_and_requests_still_work(
        config_factory: Callable[..., Config], orthanc: Orthanc,
        mixed_study: SampleStudy) -> None:
    config = config_factory(orthanc=orthanc)
    assoc = associate(config.sources["orthanc"], [build_context(FIND_MODEL)], purpose="C-FIND")
    try:
        for _ in range(20):
            quiet_reactor(assoc)
            assert assoc._is_paused and not assoc._reactor_checkpoint.is_set()
            answers = list(assoc.send_c_find(_study_query(mixed_study.study_uid), FIND_MODEL))
            assert [s.Status for s, _ in answers] == [0xFF00, 0x0000]
            assert answers[0][1].StudyInstanceUID == mixed_study.study_uid
            assert assoc._reactor_checkpoint.is_set()  # the reactor runs between requests
    finally:
        assoc.release()
    assert assoc.is_released
