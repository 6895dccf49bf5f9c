"""DICOMweb: WADO-RS over plain HTTP(S) from an archive or a gateway in front of one.

The "via gateway" strategy. Like C-GET it needs no connection back to us, and being HTTP it
also crosses proxies and NAT like any web traffic. A retrieve is planned with QIDO-RS (the
instances of the job's scope, with their series and SOP classes), then fetched series by
series (up to ``associations_per_job`` requests at once) with a streamed multipart WADO-RS
response: dicomweb-client decodes one part (one
instance) at a time, which is spooled as a Part-10 file and handed to the sink before the
next part is read, so memory holds at most one instance, never a study. A resumed job asks
whole series only where none of its instances are stored yet, and single instances elsewhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from pacsfetch import hookimpl
from pacsfetch.config import SourceConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.gate import GateCancelled
from pacsfetch.models import Level
from pacsfetch.plugins.contracts import RetrieveContext, RetrieveResult, Transport
from pacsfetch.uids import is_valid_uid

log = logging.getLogger(__name__)

# dicomweb-client logs request URLs (which hold UIDs) at DEBUG: keep them out of our logs.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

_SERIES_UID = "0020000E"
_SOP_CLASS_UID = "00080016"
_SOP_INSTANCE_UID = "00080018"


@dataclass(frozen=True, slots=True)
class WebInstance:
    """One instance QIDO-RS says matches the job."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def _first(attributes: dict[str, dict], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _secret(source_name: str, key: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise RetrieveError(
            ErrorKind.CONFIG,
            f"sources.{source_name}.{key} names environment variable {variable!r}, which is "
            "not set in the worker's environment.",
        )
    return value


def make_client(source_name: str, source: SourceConfig) -> DICOMwebClient:
    """A client for the source's ``dicomweb_url`` with credentials from the environment.

    dicomweb-client's own retries are off: failed jobs are retried by the worker, with
    backoff, as for every other transport, and resume from what is already stored.
    """
    if source.dicomweb_url is None:
        raise RetrieveError(
            ErrorKind.CONFIG, f"sources.{source_name}.dicomweb_url is not set: the dicomweb "
            "transport needs the gateway's DICOMweb root URL.")
    session = requests.Session()
    if source.dicomweb_username and source.dicomweb_password_env:
        session.auth = (source.dicomweb_username,
                        _secret(source_name, "dicomweb_password_env", source.dicomweb_password_env))
    elif source.dicomweb_token_env:
        token = _secret(source_name, "dicomweb_token_env", source.dicomweb_token_env)
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(str(source.dicomweb_url).rstrip("/"), session=session,
                            timeout=source.timeout)
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def http_errors(where: str, what: str) -> Iterator[None]:
    """Turn HTTP and network failures into :class:`RetrieveError` an operator can act on."""
    try:
        yield
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code in (401, 403):
            raise RetrieveError(
                ErrorKind.AUTH,
                f"{where} refused our credentials for {what} (HTTP {code}): check "
                "dicomweb_username with the password in dicomweb_password_env, or the token "
                "in dicomweb_token_env, and that this user may read the study.",
            ) from None
        if code == 404:
            raise RetrieveError(
                ErrorKind.QUERY,
                f"{where} does not hold what the job asks for ({what}: HTTP 404): check the "
                "UIDs, and that the gateway fronts the archive that has the study.",
            ) from None
        if code >= 500 or code in (408, 429):
            raise RetrieveError(
                ErrorKind.CONNECTION,
                f"{where} failed to serve {what} (HTTP {code}); the job is retried.",
            ) from None
        raise RetrieveError(
            ErrorKind.PEER_STATUS, f"{where} refused {what} with HTTP {code}.") from None
    except requests.Timeout:
        raise RetrieveError(
            ErrorKind.TIMEOUT, f"{where} did not answer {what} within the source's timeout."
        ) from None
    except requests.ConnectionError:
        raise RetrieveError(
            ErrorKind.CONNECTION,
            f"cannot reach {where} for {what} (refused, unreachable, or the connection "
            "dropped): is the gateway up and dicomweb_url right? The job is retried.",
        ) from None
    except requests.RequestException as exc:  # chunked-encoding and similar mid-body failures
        raise RetrieveError(
            ErrorKind.CONNECTION, f"{where} broke off {what} ({type(exc).__name__}); the job "
            "is retried and resumes.") from None


def list_instances(client: DICOMwebClient, ctx: RetrieveContext) -> list[WebInstance]:
    """QIDO-RS: every instance of the job's scope (malformed UIDs from the wire dropped)."""
    request = ctx.request
    found = client.search_for_instances(
        study_instance_uid=request.study_uid,
        series_instance_uid=request.series_uid,
        fields=["SeriesInstanceUID", "SOPClassUID"],
        get_remaining=True,
    )
    wanted = set(request.sop_uids)
    instances: dict[str, WebInstance] = {}
    for attributes in found:
        ref = WebInstance(_first(attributes, _SERIES_UID), _first(attributes, _SOP_INSTANCE_UID),
                          _first(attributes, _SOP_CLASS_UID))
        if not all(map(is_valid_uid, (ref.series_uid, ref.sop_instance_uid, ref.sop_class_uid))):
            continue
        if request.series_uid and ref.series_uid != request.series_uid:
            continue
        if wanted and ref.sop_instance_uid not in wanted:
            continue
        instances[ref.sop_instance_uid] = ref
    return list(instances.values())


Unit = tuple[str, WebInstance | None]
"""A series UID to fetch whole (None), or one instance of it."""


class _Transfer:
    """One attempt's WADO-RS requests, spooling and counting as instances arrive.

    Up to ``associations_per_job`` requests run at once, each on its own thread and HTTP
    session and each holding a slot of the source's ``max_associations``; the sink and the
    progress reporter are called under one lock, as they are not thread-safe.
    """

    def __init__(self, ctx: RetrieveContext, planned: dict[str, WebInstance],
                 units: list[Unit], where: str) -> None:
        self.ctx = ctx
        self.planned = planned
        self.units = deque(units)
        self.where = where
        self.media_types = (("application/dicom", ctx.source.dicomweb_transfer_syntax),)
        self.done = 0
        self.cancelled = False
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()

    def run(self, client: DICOMwebClient, width: int) -> None:
        """Fetch every unit over *width* concurrent requests, the first on *client* (the
        others on sessions of their own); raise the first failure."""
        threads = [threading.Thread(target=self._stripe, args=(None,), daemon=True,
                                    name=f"wado-{n}")
                   for n in range(1, max(1, min(width, len(self.units))))]
        for thread in threads:
            thread.start()
        self._stripe(client)
        for thread in threads:
            thread.join()
        if self.failures:
            raise self.failures[0]

    def _stop(self) -> bool:
        return bool(self.failures) or self._cancelled() or not self.units

    def _cancelled(self) -> bool:
        with self.lock:
            self.cancelled = self.cancelled or self.ctx.progress.cancelled()
            return self.cancelled

    def _stripe(self, client: DICOMwebClient | None) -> None:
        """Requests one after another on one session and one slot. Only the first stripe
        reports waiting for a slot: the others' wait is no wait of the job's."""
        gate = self.ctx.gate
        assert gate is not None  # RetrieveContext builds one when none is given
        try:
            slot = gate.gate.acquire(gate.source_name, bulk=gate.bulk, cancelled=self._stop,
                                     on_wait=gate.on_wait if client is not None else None)
        except GateCancelled:
            return
        try:
            client = client or make_client(self.ctx.source_name, self.ctx.source)
            while True:
                with self.lock:
                    unit = self.units.popleft() if self.units and not self.failures else None
                if unit is None or self._cancelled():
                    return
                series_uid, ref = unit
                with http_errors(self.where, "a WADO-RS retrieve"):
                    if ref is None:
                        self._consume(client.iter_series(
                            self.ctx.request.study_uid, series_uid, media_types=self.media_types))
                    else:
                        self._consume(iter([client.retrieve_instance(
                            self.ctx.request.study_uid, ref.series_uid, ref.sop_instance_uid,
                            media_types=self.media_types)]))
        except BaseException as exc:
            with self.lock:
                self.failures.append(exc)
        finally:
            slot.release()

    def _consume(self, datasets: Iterator[Dataset]) -> None:
        try:
            for ds in datasets:
                self._hand_over(ds)
                if self._cancelled():
                    return
        finally:
            close = getattr(datasets, "close", None)
            if close is not None:
                close()  # a generator left early closes its streamed HTTP response

    def _hand_over(self, ds: Dataset) -> None:
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        claimed = self.planned.get(sop_uid)
        # The claim is what QIDO-RS said; the sink checks the header against it.
        sop_class = claimed.sop_class_uid if claimed else str(ds.get("SOPClassUID", ""))
        with tempfile.NamedTemporaryFile(dir=self.ctx.sink.spool_dir, prefix="dicomweb-",
                                         suffix=".dcm", delete=False) as fh:
            path = Path(fh.name)
            dcmwrite(fh, ds, enforce_file_format=True)
        with self.lock:
            self.ctx.sink.accept(path, sop_class_uid=sop_class, sop_instance_uid=sop_uid)
            self.done += 1
            self.ctx.progress.peer_counts(remaining=max(len(self.planned) - self.done, 0),
                                          completed=self.done, failed=0, warning=0)


class DicomwebTransport:
    """WADO-RS retrieval planned by QIDO-RS, streamed one instance at a time."""

    name = "dicomweb"

    def retrieve(self, ctx: RetrieveContext) -> RetrieveResult:
        client = make_client(ctx.source_name, ctx.source)
        where = f"DICOMweb gateway {ctx.source.dicomweb_url}"
        gate = ctx.gate
        assert gate is not None  # RetrieveContext builds one when none is given
        try:
            with gate.acquire(), http_errors(where, "the QIDO-RS instance search"):
                inventory = list_instances(client, ctx)
        except GateCancelled:
            return RetrieveResult(expected=None, cancelled=True)
        if not inventory:
            raise RetrieveError(
                ErrorKind.QUERY,
                f"{where} holds no instances matching the job (QIDO-RS found none): check the "
                "UIDs, and that the gateway fronts the archive that has the study.",
            )
        missing = {r.sop_instance_uid: r for r in inventory
                   if r.sop_instance_uid not in ctx.already_stored}
        by_series: dict[str, list[WebInstance]] = defaultdict(list)
        for ref in inventory:
            by_series[ref.series_uid].append(ref)
        units: list[Unit] = []
        for series_uid, refs in sorted(by_series.items()):
            todo = [r for r in refs if r.sop_instance_uid in missing]
            if todo and len(todo) == len(refs) and ctx.request.level is not Level.IMAGE:
                units.append((series_uid, None))
            else:
                units += [(series_uid, ref) for ref in todo]
        transfer = _Transfer(ctx, missing, units, where)
        ctx.progress.peer_counts(remaining=len(missing), completed=0, failed=0, warning=0)
        source = ctx.source
        transfer.run(client, min(source.associations_per_job,
                                 gate.gate.limit(ctx.source_name, gate.bulk)))
        return RetrieveResult(expected=frozenset(r.sop_instance_uid for r in inventory),
                              cancelled=transfer.cancelled)


@hookimpl
def pacsfetch_transports() -> list[Transport]:
    return [DicomwebTransport()]
