"""Errors a job can end with, classified so an operator knows what to fix.

Most DIMSE failures in the field are association, presentation-context and transfer-syntax
negotiation mistakes. Each :class:`ErrorKind` names one such class; the message of a
:class:`RetrieveError` says, in the operator's words, which setting to look at.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum


class ErrorKind(StrEnum):
    CONNECTION = "connection"
    """The PACS could not be reached (refused, unreachable, timed out): retried."""
    ASSOCIATION_REJECTED = "association-rejected"
    """The PACS refused the association (AE titles, not configured for us)."""
    ASSOCIATION_ABORTED = "association-aborted"
    """The association was aborted or dropped mid-transfer: retried, the job resumes."""
    NEGOTIATION = "negotiation"
    """Presentation contexts or SCP role selection were refused for SOP classes we need."""
    TRANSFER_SYNTAX = "transfer-syntax"
    """The PACS would only send an instance in a transfer syntax we did not propose."""
    QUERY = "query"
    """The C-FIND that plans the retrieve failed or matched nothing."""
    PEER_STATUS = "peer-status"
    """The PACS answered the retrieve with a failure status."""
    TIMEOUT = "timeout"
    """The PACS stopped answering within the configured timeout: retried."""
    MOVE_DESTINATION = "move-destination"
    """The PACS does not know, or cannot reach, the C-MOVE destination (the receiver)."""
    STORE = "store"
    """A store could not write or commit an instance: retried like a connection failure,
    except a full disk ("no space left"), which waits for an operator to free space."""
    AUTH = "auth"
    """An HTTP peer (DICOMweb gateway) refused our credentials (401/403)."""
    TLS = "tls"
    """The DICOM TLS handshake failed (certificates, CA, or a peer not speaking TLS)."""
    CONFIG = "config"
    """The job names something the configuration does not define."""
    CANCELLED = "cancelled"
    PEER_BUSY = "peer-busy"
    """The PACS said it is overloaded (association rejected as transient, 0xA7xx out of
    resources, or success with nothing sent when instances were expected): retried later,
    and bulk work against it slows down (see :mod:`pacsfetch.pushback`)."""


RETRYABLE_KINDS = frozenset(
    {ErrorKind.CONNECTION, ErrorKind.ASSOCIATION_ABORTED, ErrorKind.TIMEOUT,
     ErrorKind.PEER_BUSY}
)


class RetrieveError(Exception):
    """A retrieve that could not (fully) be done, with an operator-facing explanation."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether trying again later can help without anyone changing a setting."""
        return self.kind in RETRYABLE_KINDS

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_left(exc: BaseException) -> bool:
    """Whether *exc*, or an error it was raised from, says a file system is full.

    Some libraries re-raise an ``OSError`` with their own text and no errno (pydicom's
    writer does), so the system's message counts too.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain of causes; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and (seen.errno in _NO_SPACE
                                          or os.strerror(errno.ENOSPC) in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
