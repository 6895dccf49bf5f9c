"""Validation of DICOM UIDs and AE titles.

Every UID that arrives from the network or from an API caller is untrusted: it may end
up in a file path, an object key or a C-FIND identifier, so it is checked against the
grammar of PS3.5 §9.1 (digits and dots, no leading zeros, at most 64 characters) before
anything else looks at it.
"""

from __future__ import annotations

import re

# Used with ``fullmatch`` only: ``$`` would also match before a final newline, and a UID
# with a trailing "\n" would pass into a path, an object key or a C-FIND identifier.
UID_PATTERN = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+"
_UID_RE = re.compile(UID_PATTERN)
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII, no backslash

UID_MAX_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when *value* is a syntactically valid DICOM UID."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= UID_MAX_LENGTH
        and _UID_RE.fullmatch(value) is not None
    )


def check_uid(value: object, what: str = "UID") -> str:
    """Return *value* unchanged if it is a valid UID, else raise ``ValueError`` naming *what*."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise ValueError(
            f"{what} must be a DICOM UID (digits and dots, no leading zeros, "
            f"at most {UID_MAX_LENGTH} characters), got {shown}"
        )
    return value  # type: ignore[return-value]


def check_ae_title(value: object, what: str = "AE title") -> str:
    """Return the AE title stripped of padding, or raise ``ValueError`` naming *what*."""
    if not isinstance(value, str) or not _AE_RE.fullmatch(value) or not value.strip():
        raise ValueError(f"{what} must be 1-16 printable ASCII characters without '\\', got {value!r}")
    return value.strip()
