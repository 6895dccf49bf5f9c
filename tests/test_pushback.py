"""What an overloaded archive says, and how a migration slows down when it says it.

A peer of the test's own on a real loopback socket refuses associations as *transient*
(PS3.8 A-ASSOCIATE-RJ result 2, as a PACS out of association slots does): opening one gives
``peer-busy``, not a configuration error. A migration whose study job ended ``peer-busy``
puts the study back at the front of its queue, halves its in-flight limit and feeds nothing
during the back-off; a verified study raises the limit again.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import make_config, wait_for

from pacsfetch.config import parse_config
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.jobstore import JobStore
from pacsfetch.migrations import MigrationRequest, MigrationStore, StudyRow, StudyState
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.dimse.services import QUERY_SYNTAXES, associate
from pacsfetch.plugins.transports.query import FIND_MODEL
from pacsfetch.pushback import FIRST_BACKOFF
from pacsfetch.sandbox.peers import free_port
from pacsfetch.workers.migrate import MigrationFeeder

# A-ASSOCIATE-RJ: type 3, length 4; reserved, result 2 (transient), source 3 (service
# provider, presentation), reason 1 (temporary congestion).
TRANSIENT_REJECT = bytes([0x03, 0x00]) + struct.pack(">I", 4) + bytes([0x00, 0x02, 0x03, 0x01])


@pytest.fixture
def busy_peer() -> Iterator[int]:
    """Answers every association request with a transient rejection."""
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                header = conn.recv(6, socket.MSG_WAITALL)
                length = struct.unpack(">I", header[2:6])[0]
                conn.recv(length, socket.MSG_WAITALL)
                conn.sendall(TRANSIENT_REJECT)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    server.close()


def test_a_transient_rejection_is_busy_not_a_configuration_error(busy_peer: int,
                                                                 redis_url: str,
                                                                 tmp_path: Path) -> None:
    config = parse_config(make_config(redis_url=redis_url, store_root=tmp_path, extra_sources={
        "old": {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": busy_peer, "timeout": 5}}))
    with pytest.raises(RetrieveError) as caught:
        associate(config.sources["old"], [(FIND_MODEL, QUERY_SYNTAXES)], purpose="C-FIND",
                  source_name="old")
    assert caught.value.kind is ErrorKind.PEER_BUSY and caught.value.retryable
    assert "rejected the association for C-FIND as transient" in caught.value.message


def test_a_busy_study_goes_back_and_the_migration_slows_down(redis_url: str,
                                                             tmp_path: Path) -> None:
    config = parse_config(make_config(redis_url=redis_url, store_root=tmp_path, extra_sources={
        "old": {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": free_port()}}))
    store, jobs = MigrationStore.from_url(redis_url), JobStore.from_url(redis_url)
    mig = store.create(MigrationRequest(source="old", stores=["local"], max_in_flight=4))
    uids = [f"1.2.826.0.1.3680043.8.498.99{n}" for n in range(6)]
    store.add_studies(mig.id, [StudyRow(uid, StudyState.PLANNED, "20200101", 1) for uid in uids])
    store.finish_planning(mig.id)
    # The first study ran and the PACS pushed back (as the transports report it).
    (first,) = store.take(mig.id, 1)
    job = jobs.create(JobRequest(source="old", study_uid=first, store="local"),
                      origin="migration")
    jobs.transition(job.id, JobStatus.FAILED, error_kind=ErrorKind.PEER_BUSY.value,
                    error="OLDPACS is busy: it rejected the association as transient")
    store.set_study(mig.id, StudyRow(first, StudyState.RUNNING, "20200101", 1, None, job.id),
                    inflight=job.id)

    store.pause(mig.id, True)  # so that this test's first tick only verifies
    feeder = MigrationFeeder(config)
    try:
        feeder.tick()
        wait_for(lambda: not feeder.busy()
                 and store.study(mig.id, first).state is StudyState.PLANNED, 30, 0.1,
                 "the busy study's verification")
        record = store.get(mig.id)
        assert record.in_flight_limit == 2 and "busy" in (record.error or "")
        assert store.client.lindex(store.key(mig.id, "queue"), 0) == first  # front again
        assert store.inflight(mig.id) == {} and store.queued(mig.id) == 6
        until = float(store.fields(mig.id)["busy_until"])
        assert FIRST_BACKOFF - 1 < until - time.time() <= FIRST_BACKOFF

        store.pause(mig.id, False)
        feeder.tick()  # backing off: nothing fed
        assert store.inflight(mig.id) == {} and store.queued(mig.id) == 6
        feeder.tick(datetime.fromtimestamp(until + 0.1, UTC))  # after it: two at most
        wait_for(lambda: not feeder.busy(), 30, 0.1, "the study checks")
        assert len(store.inflight(mig.id)) == 2 and first in store.inflight(mig.id)
    finally:
        feeder.close()
