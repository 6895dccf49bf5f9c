"""Key and path templates shared by the stores: validated once, rendered per instance.

A layout such as ``{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm`` names
where an instance goes below a store's root (a directory, a bucket prefix). Validation
refuses templates that could escape that root (absolute, ``..``) or collide (no
``{SOPInstanceUID}``); rendering uses validated UIDs as they are and reduces every other
header value to a harmless single path segment, so what a PACS sends can never steer a
write outside the store.
"""

from __future__ import annotations

import re
import string

from pacsfetch.plugins.contracts import InstanceIdentity
from pacsfetch.plugins.dicomfile import LAYOUT_ATTRIBUTES

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
LAYOUT_FIELDS = frozenset(LAYOUT_ATTRIBUTES) | {"TransferSyntaxUID"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
CONTROL_AREA = ".pacsfetch"
"""A store's own bookkeeping below its root (spool, job manifests): the spool sweep deletes
files there, so no layout may place instances inside it."""


def check_layout(value: str) -> str:
    """Validate a layout template (a pydantic validator); returns it unchanged."""
    if "\0" in value:
        raise ValueError("must not contain a NUL character (no filesystem or key can hold it)")
    fields = []
    for _literal, name, spec, conversion in string.Formatter().parse(value):
        if name is None:
            continue
        if name not in LAYOUT_FIELDS:
            raise ValueError(
                f"unknown field {{{name}}}; allowed: {', '.join(sorted(LAYOUT_FIELDS))}"
            )
        if spec or conversion:
            raise ValueError(f"field {{{name}}} may not carry a format spec or conversion")
        fields.append(name)
    if "SOPInstanceUID" not in fields:
        raise ValueError("must contain {SOPInstanceUID}, or instances would overwrite each other")
    if value.startswith("/") or any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError("must be a relative path without empty, '.' or '..' segments")
    if value.split("/")[0].casefold() == CONTROL_AREA:
        raise ValueError(f"must not write into the store's control area {CONTROL_AREA!r}: its "
                         "spool sweep would delete committed instances")
    return value


def safe_component(value: str) -> str:
    """A header value made harmless as (part of) one path segment."""
    cleaned = _UNSAFE.sub("_", value.strip())[:64].lstrip(".")
    return cleaned or "unknown"


def render_layout(layout: str, identity: InstanceIdentity) -> str:
    """The relative path (``/``-separated) of an instance under a validated *layout*."""
    values = _Missing({name: safe_component(v) for name, v in identity.attributes.items()})
    # UIDs were validated by the sink; they are safe path segments as they are.
    values.update(
        StudyInstanceUID=identity.study_uid,
        SeriesInstanceUID=identity.series_uid,
        SOPInstanceUID=identity.sop_instance_uid,
        SOPClassUID=identity.sop_class_uid,
        TransferSyntaxUID=identity.transfer_syntax_uid,
    )
    return layout.format_map(values)


class _Missing(dict[str, str]):
    """Template values; an attribute the instance lacks renders as ``unknown``."""

    def __missing__(self, key: str) -> str:
        return "unknown"
