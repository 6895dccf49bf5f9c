"""Hook specifications: the contract every pacsfetch plugin implements a part of.

A plugin is a module (or object) with functions marked ``@pacsfetch.hookimpl`` whose names
match the specifications below, registered under the ``pacsfetch`` entry-point group of its
distribution. Built-in transports and stores are registered the same way, so a third-party
plugin is a peer of theirs, not a special case.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from pacsfetch import PROJECT_NAME
from pacsfetch.models import JobRecord
from pacsfetch.plugins.contracts import IncomingInstance, StoreBackend, Transport

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def pacsfetch_transports() -> Sequence[Transport]:
    """Return the transports this plugin provides.

    Each transport's ``name`` is what sources list in ``transports = [...]`` and jobs name
    in ``"transport"``; names must be unique across all plugins or workers refuse to start.
    Called once per process, when the registry is built.
    """


@hookspec
def pacsfetch_store_backends() -> Sequence[StoreBackend]:
    """Return the store backends this plugin provides.

    Each backend's ``name`` is the ``plugin = "..."`` value of ``[stores.NAME]`` sections,
    and its ``settings_model`` validates the rest of such a section at start-up, so a bad
    key refuses start-up instead of failing the first job. Called once per process.
    """


@hookspec
def pacsfetch_job_started(job: JobRecord, attempt: int) -> None:
    """A worker starts (or resumes, ``attempt`` > 1) running *job*.

    Runs in the worker process before the transport opens any association. Must be quick
    and must not raise: an exception is logged and otherwise ignored.
    """


@hookspec
def pacsfetch_instance_stored(job_id: str, instance: IncomingInstance, locations: dict[str, str]) -> None:
    """An instance was committed to every store of the job; *locations* maps store -> place.

    Runs on the per-instance hot path, on the thread that answers the PACS: keep it to a
    counter increment or a queue put, never I/O that can block.
    """


@hookspec
def pacsfetch_job_finished(job: JobRecord) -> None:
    """*job* reached a final status (``job.status``, ``job.error``) on this worker.

    Not called for an attempt that will be retried. Must not raise.
    """
