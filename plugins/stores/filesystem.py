"""The filesystem store: one file per instance under ``root``, laid out by a template.

Writes are atomic and durable in the classic order: an instance is staged under
``root/.pacsfetch/spool``, fsynced, and only then renamed into place, so neither a reader nor
a power loss ever sees half a file, and a crash leaves only spool litter that the next
session sweeps. With ``fsync`` on, the fsync and rename of a committed instance run on a
background thread (fsync releases the GIL), so receiving the next instance never waits for
the disk, which would cost more than the whole rest of storing an instance;
:meth:`FilesystemSession.sync` waits for them, fsyncs the directories, and the job records
instances only after it returns. The same SOP instance delivered twice is one file.
Every path is built from validated UIDs and sanitised header values and checked to stay
inside ``root`` (symlinks included) before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacsfetch import hookimpl
from pacsfetch.plugins.contracts import IncomingInstance, StoreBackend
from pacsfetch.plugins.stores.layout import (
    CONTROL_AREA,
    DEFAULT_LAYOUT,
    check_layout,
    render_layout,
)
from pacsfetch.plugins.stores.listing import study_listing
from pacsfetch.procs import pid_alive

log = logging.getLogger(__name__)

CONTROL_DIR = CONTROL_AREA
STALE_SPOOL_SECONDS = 24 * 3600


class FilesystemSettings(BaseModel):
    """Keys of a ``[stores.NAME]`` section with ``plugin = "filesystem"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Field(description="Directory that holds the store; created if missing.")
    layout: str = Field(DEFAULT_LAYOUT, description="Path template below root.")
    fsync: bool = Field(True, description="fsync files and directories before they are recorded.")

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("layout")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return check_layout(value)


@dataclass(slots=True)
class _Staged:
    temp: Path
    final: Path
    sop_instance_uid: str
    size: int


class _Syncer(threading.Thread):
    """fsyncs committed files, then renames them into place, in the background.

    :meth:`wait` returns once every submitted file is durable and visible.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="fsync")
        self._paths: queue.Queue[tuple[Path, Path] | None] = queue.Queue()
        self._error: OSError | None = None

    def submit(self, temp: Path, final: Path) -> None:
        self._paths.put((temp, final))

    def run(self) -> None:
        while True:
            item = self._paths.get()
            try:
                if item is None:
                    return
                temp, final = item
                _fsync(temp)
                os.replace(temp, final)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                self._paths.task_done()

    def wait(self) -> None:
        """Block until every submitted file is in place; raise the first failure."""
        self._paths.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        self._paths.put(None)
        self.join()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemSession:
    """One job writing into one filesystem store."""

    def __init__(self, settings: FilesystemSettings, job_id: str) -> None:
        self._settings = settings
        self._job_id = job_id
        self._root = settings.root
        self._root.mkdir(parents=True, exist_ok=True)
        self._root_real = Path(os.path.realpath(self._root))
        control = self._root / CONTROL_DIR
        spool_parent = control / "spool"
        spool_parent.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_spools(spool_parent)
        self._spool = spool_parent / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._spool.mkdir()
        (control / "jobs").mkdir(exist_ok=True)
        self._manifest: IO[str] = open(control / "jobs" / f"{job_id}.jsonl", "a", encoding="utf-8")
        self._checked_dirs: set[Path] = set()
        self._dirty_dirs: set[Path] = set()
        self._syncer: _Syncer | None = None
        if settings.fsync:
            self._syncer = _Syncer()
            self._syncer.start()

    @property
    def spool_dir(self) -> Path:
        return self._spool

    def _sweep_stale_spools(self, spool_parent: Path) -> None:
        """Remove spools of dead processes on this host, and any spool idle for a day."""
        host = socket.gethostname()
        now = time.time()
        for entry in spool_parent.iterdir():
            parts = entry.name.rsplit("-", 2)
            dead_here = (
                len(parts) == 3 and parts[0] == host and parts[1].isdigit()
                and not pid_alive(int(parts[1]))
            )
            try:
                stale = now - entry.stat().st_mtime > STALE_SPOOL_SECONDS
            except FileNotFoundError:
                continue
            if dead_here or stale:
                shutil.rmtree(entry, ignore_errors=True)

    def _final_path(self, instance: IncomingInstance) -> Path:
        relative = Path(render_layout(self._settings.layout, instance.identity))
        final = self._root / relative
        if final.parent not in self._checked_dirs:
            self._make_dirs_inside_root(relative.parent)
            self._checked_dirs.add(final.parent)
        return final

    def _make_dirs_inside_root(self, relative: Path) -> None:
        """Create directories one level at a time, refusing any that resolves outside root.

        Checking each level before descending means a symlink planted inside the store
        can never make us create, let alone write, anything outside it.
        """
        current = self._root_real
        for part in relative.parts:
            candidate = current / part
            try:
                candidate.mkdir()
            except FileExistsError:
                pass
            real = Path(os.path.realpath(candidate))
            if not real.is_relative_to(self._root_real):
                raise PermissionError(f"layout would write outside the store root: {relative}")
            current = real

    def write(self, instance: IncomingInstance) -> _Staged:
        final = self._final_path(instance)
        temp = self._spool / f"{uuid.uuid4().hex}.part"
        try:
            os.link(instance.path, temp)
        except OSError:  # another filesystem, or links not allowed: copy instead
            shutil.copyfile(instance.path, temp)
        return _Staged(temp, final, instance.identity.sop_instance_uid, instance.size)

    def commit(self, staged: _Staged) -> str:
        if self._syncer is None:
            os.replace(staged.temp, staged.final)
        else:
            self._syncer.submit(staged.temp, staged.final)
            self._dirty_dirs.add(staged.final.parent)
        relative = staged.final.relative_to(self._root).as_posix()
        self._manifest.write(
            json.dumps({"sop_instance_uid": staged.sop_instance_uid, "path": relative,
                        "size": staged.size}) + "\n"
        )
        return relative

    def abort(self, staged: _Staged) -> None:
        staged.temp.unlink(missing_ok=True)

    def sync(self) -> None:
        if self._syncer is not None:
            self._syncer.wait()
        self._manifest.flush()
        if self._syncer is None:
            return
        for directory in self._dirty_dirs:
            _fsync(directory)
        self._dirty_dirs.clear()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self._syncer is not None:
                self._syncer.stop()
            self._manifest.close()
            shutil.rmtree(self._spool, ignore_errors=True)


class FilesystemBackend:
    name = "filesystem"
    settings_model = FilesystemSettings

    def open(self, store_name: str, settings: BaseModel, job_id: str) -> FilesystemSession:
        assert isinstance(settings, FilesystemSettings)
        return FilesystemSession(settings, job_id)

    def study_inventory(self, store_name: str, settings: BaseModel,
                        study_uid: str) -> frozenset[str] | None:
        """The study's instances whose files are in place now (listed, not recalled)."""
        assert isinstance(settings, FilesystemSettings)
        listing = study_listing(settings.layout, study_uid)
        if listing is None:
            return None
        top_relative = listing.prefix.rpartition("/")[0]
        top = settings.root / top_relative if top_relative else settings.root
        found: set[str] = set()
        for directory, subdirs, files in os.walk(top):
            if Path(directory) == settings.root:
                subdirs[:] = [d for d in subdirs if d != CONTROL_DIR]
            base = Path(directory).relative_to(settings.root).as_posix()
            for name in files:
                relative = name if base == "." else f"{base}/{name}"
                if relative.startswith(listing.prefix) and (uid := listing.sop_uid(relative)):
                    found.add(uid)
        return frozenset(found)


@hookimpl
def pacsfetch_store_backends() -> list[StoreBackend]:
    return [FilesystemBackend()]
