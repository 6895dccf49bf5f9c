"""The DICOM forward store (``plugin = "dicom"``): C-STORE every instance to another archive.

For migrations: what a job retrieves from one PACS is stored into another, exactly as it
arrived. Each instance is sent from the spool file in PDU-sized pieces by the project's DIMSE
engine (:func:`pacsfetch.plugins.dimse.services.c_store`), so its data set goes out byte for
byte (no transcoding) and memory does not grow with its size.

Two phases: a remote archive offers no invisible staging, so ``write`` only checks that the
instance can be sent and remembers its spool file (the sink keeps that file until every store
of the job has committed), and ``commit`` sends the C-STORE; the instance counts as stored only
when the archive answers success (or a warning: stored with coercion). A refused C-STORE fails
that instance with the archive's status; nothing is sent by ``abort``.

One association per job, opened lazily and proposing one presentation context per (SOP class,
transfer syntax) received so far. An instance whose pair was not proposed yet makes the session
release the association and open a new one proposing the union, so a job re-associates at most
once per new pair (a study's series usually share a handful). A pair the archive refuses fails
its instances with a negotiation error naming SOP class and transfer syntax; an archive that
cannot be reached or rejects the association fails the rest of the job's instances at once
with that reason instead of being asked again for each.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pacsfetch import hookimpl
from pacsfetch.config import AETitle, SourceConfig, TlsConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.plugins.contracts import IncomingInstance, StoreBackend
from pacsfetch.plugins.dimse import messages
from pacsfetch.plugins.dimse.association import Association, DimseError
from pacsfetch.plugins.dimse.association import Context as AcceptedContext
from pacsfetch.plugins.dimse.services import (
    MAX_PRESENTATION_CONTEXTS,
    associate,
    c_store,
    store_status_text,
    uid_name,
)
from pacsfetch.plugins.stores.dicom_inventory import find_study_instances

log = logging.getLogger(__name__)

SUCCESS_OR_WARNING = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
SEND_ATTEMPTS = 2
"""C-STOREs of one instance, each on a fresh association after an abort or a timeout."""
"""Success, and the warnings that still mean "stored" (coercion, elements discarded)."""
_FATAL_FOR_THE_JOB = frozenset(
    {ErrorKind.CONNECTION, ErrorKind.ASSOCIATION_REJECTED, ErrorKind.TIMEOUT})

Context = tuple[str, str]  # (SOP class UID, transfer syntax UID)


class DicomForwardSettings(BaseModel):
    """Keys of a ``[stores.NAME]`` section with ``plugin = "dicom"``: the destination AE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: AETitle = Field(description="The destination archive's AE title.")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle = Field("PACSFETCH", description="Our AE title towards it.")
    timeout: float = Field(30.0, gt=0, description="Seconds for connect, ACSE and DIMSE replies.")
    max_pdu: int = Field(0, ge=0, description="Largest PDU we accept; 0 means no limit.")
    tls: TlsConfig | None = Field(None, description="DICOM TLS towards the archive, as a "
                                  "source's [sources.X.tls].")


def _peer(settings: DicomForwardSettings) -> SourceConfig:
    """The destination as the DIMSE helpers know a peer."""
    return SourceConfig(
        ae_title=settings.ae_title, host=settings.host, port=settings.port,
        calling_ae_title=settings.calling_ae_title, timeout=settings.timeout,
        max_pdu=settings.max_pdu, tls=settings.tls,
    )


@dataclass(frozen=True, slots=True)
class _Pending:
    path: Path
    context: Context
    sop_instance_uid: str


class DicomForwardSession:
    """One job's association (re-opened as contexts grow) with one destination archive."""

    def __init__(self, settings: DicomForwardSettings, store_name: str, job_id: str) -> None:
        self._peer = _peer(settings)
        self._where = f"{settings.ae_title}@{settings.host}:{settings.port}"
        self._store_name = store_name
        self._job_id = job_id
        self._assoc: Association | None = None
        self._message_ids = itertools.count(1)
        self._proposed: dict[Context, None] = {}  # ordered set: oldest first
        self._refused: set[Context] = set()
        self._broken: RetrieveError | None = None
        self.associations_opened = 0
        self.resends = 0
        """C-STOREs sent again on a fresh association after an abort or a timeout."""

    @property
    def spool_dir(self) -> Path | None:
        return None

    def write(self, instance: IncomingInstance) -> _Pending:
        context = (instance.identity.sop_class_uid, instance.identity.transfer_syntax_uid)
        if self._broken is not None:
            raise self._broken
        if context in self._refused:
            raise self._refusal(context)
        return _Pending(instance.path, context, instance.identity.sop_instance_uid)

    def commit(self, staged: _Pending) -> str:
        # An archive that drops an association (or stalls on one) mid-migration should cost
        # one re-association, not the instance: C-STORE of the same instance is idempotent.
        for attempt in range(1, SEND_ATTEMPTS + 1):
            assoc = self._association_for(staged.context)
            cx = self._context(staged.context)
            assert cx is not None  # _association_for checked it was accepted
            try:
                status = c_store(assoc, cx, staged.sop_instance_uid, staged.path,
                                 next(self._message_ids) & 0xFFFF or 1)
            except DimseError:
                status = None
            except (OSError, ValueError) as exc:
                raise RetrieveError(ErrorKind.STORE, f"cannot read the spooled instance to "
                                    f"forward it: {exc}") from None
            if status is not None:
                code = status.get(messages.STATUS, 0xC000)
                break
            self._drop_association()
            self.resends += 1
            log.warning("forward association aborted or timed out; re-associating",
                        extra={"job_id": self._job_id, "store": self._store_name,
                               "attempt": attempt})
        else:
            raise RetrieveError(
                ErrorKind.ASSOCIATION_ABORTED,
                f"{self._where} did not answer the C-STORE within {self._peer.timeout:g} s or "
                f"aborted the association, {SEND_ATTEMPTS} times; the instance was not stored",
            )
        if code not in SUCCESS_OR_WARNING:
            category, meaning = store_status_text(code)
            comment = status.get(messages.ERROR_COMMENT)
            raise RetrieveError(
                ErrorKind.STORE,
                f"{self._where} refused the instance: C-STORE status 0x{code:04X} "
                f"({category}: {meaning}){f' - {comment}' if comment else ''}",
            )
        return self._where

    def _association_for(self, context: Context) -> Association:
        """The open association if it accepted *context*; else a new one proposing it too."""
        if self._broken is not None:
            raise self._broken
        if self._assoc is not None and self._assoc.is_established and self._accepts(context):
            return self._assoc
        self._drop_association()
        self._proposed[context] = None
        wanted = list(self._proposed)[-MAX_PRESENTATION_CONTEXTS:]
        try:
            self._assoc = associate(self._peer, [(sop, (ts,)) for sop, ts in wanted],
                                    purpose="forwarding instances")
        except RetrieveError as exc:
            if exc.kind in _FATAL_FOR_THE_JOB:
                self._broken = exc
            if exc.kind is ErrorKind.NEGOTIATION:
                self._refused.update(wanted)
            raise
        self.associations_opened += 1
        accepted = {(cx.abstract_syntax, cx.transfer_syntax)
                    for cx in self._assoc.contexts.values()}
        self._refused.update(c for c in wanted if c not in accepted)
        if context not in accepted:
            raise self._refusal(context)
        return self._assoc

    def _accepts(self, context: Context) -> bool:
        return self._context(context) is not None

    def _context(self, context: Context) -> AcceptedContext | None:
        assert self._assoc is not None
        for cx in self._assoc.contexts.values():
            if (cx.abstract_syntax, cx.transfer_syntax) == context:
                return cx
        return None

    def _refusal(self, context: Context) -> RetrieveError:
        sop, ts = context
        return RetrieveError(
            ErrorKind.NEGOTIATION,
            f"{self._where} does not accept {uid_name(sop)} in {uid_name(ts)}; instances are "
            "forwarded as received, never transcoded: enable this SOP class and transfer "
            "syntax on the destination",
        )

    def _drop_association(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc = None

    def abort(self, staged: _Pending) -> None:
        """Nothing to undo: nothing is sent before commit."""

    def sync(self) -> None:
        """Nothing to do: the archive answered each C-STORE after storing the instance."""

    def close(self) -> None:
        self._drop_association()
        log.info("forward store closed", extra={
            "job_id": self._job_id, "store": self._store_name,
            "associations": self.associations_opened})


class DicomForwardBackend:
    name = "dicom"
    settings_model = DicomForwardSettings

    def open(self, store_name: str, settings: BaseModel, job_id: str) -> DicomForwardSession:
        assert isinstance(settings, DicomForwardSettings)
        return DicomForwardSession(settings, store_name, job_id)

    def study_inventory(self, store_name: str, settings: BaseModel,
                        study_uid: str) -> frozenset[str] | None:
        """What the destination archive holds of the study, by C-FIND (series, then image
        level); None when it capped an answer, so the list would be a guess."""
        assert isinstance(settings, DicomForwardSettings)
        return find_study_instances(_peer(settings), study_uid, store_name)


@hookimpl
def pacsfetch_store_backends() -> list[StoreBackend]:
    return [DicomForwardBackend()]
