"""The benchmark's world: generated studies and the local peers that serve them.

Studies are generated once into ``.bench/studies`` (the generator is deterministic, so a
complete directory is reused by the next run). Two Orthancs hold the same studies: one with
Nagle's algorithm off in its DICOM layer, one with it left on, as many PACS in the field
run; every tool is measured against the same data. Redis is the broker and job store of the
queued path. Both Orthancs know ``pacsfetch receiver`` as a C-MOVE destination at one
loopback port, where each C-MOVE measurement starts its receiver, and DCMTK ``storescp``
(the destination of DCMTK ``movescu``) at another.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from benchmarks.dimse_paths import STORESCP_AE
from benchmarks.receiver import RECEIVER_AE
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study


@dataclass(frozen=True)
class StudySpec:
    """The shape of one generated study; *name* labels it in the results."""

    name: str
    n_instances: int
    rows: int
    columns: int
    seed: int = 0

    def generate(self, root: Path) -> SampleStudy:
        out = root / f"{self.name}-{self.n_instances}x{self.rows}x{self.columns}-s{self.seed}"
        return generate_uniform_study(out, n_instances=self.n_instances, rows=self.rows,
                                      columns=self.columns, bits=16, modality="CT",
                                      patient_id=f"PF-BENCH-{self.name.upper()}",
                                      seed=self.seed)


@dataclass(frozen=True)
class Plan:
    """What one run measures: the two comparison studies and the scaling set."""

    small: StudySpec
    large: StudySpec
    scaling: tuple[StudySpec, ...]
    worker_counts: tuple[int, ...]
    api_requests: int
    api_batch: int

    @property
    def studies(self) -> tuple[StudySpec, ...]:
        return (self.small, self.large, *self.scaling)


FULL = Plan(
    small=StudySpec("small", 2000, 64, 64),
    large=StudySpec("large", 300, 512, 512),
    scaling=tuple(StudySpec(f"scale{n}", 500, 64, 64, seed=n) for n in range(1, 5)),
    worker_counts=(1, 2, 4),
    api_requests=5000,
    api_batch=10_000,
)
QUICK = Plan(
    small=StudySpec("small", 20, 64, 64),
    large=StudySpec("large", 4, 512, 512),
    scaling=tuple(StudySpec(f"scale{n}", 6, 64, 64, seed=n) for n in range(1, 3)),
    worker_counts=(1, 2),
    api_requests=100,
    api_batch=200,
)


class Environment:
    """Generated studies plus both Orthancs (Nagle off / on) and Redis, started together.

    *receiver_port* is where the Orthancs send C-MOVE deliveries for :data:`RECEIVER_AE`.
    """

    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.studies: dict[str, SampleStudy] = {}
        self.orthanc: Orthanc | None = None
        self.orthanc_nagle: Orthanc | None = None
        self.redis: RedisServer | None = None
        self.receiver_port = free_port()
        self.storescp_port = free_port()
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        studies_dir = self.workdir / "studies"
        for spec in self.plan.studies:
            self.studies[spec.name] = spec.generate(studies_dir)
        try:
            peers = self.workdir / "peers"
            modalities = {RECEIVER_AE: (RECEIVER_AE, "127.0.0.1", self.receiver_port),
                          STORESCP_AE: (STORESCP_AE, "127.0.0.1", self.storescp_port)}
            self.redis = self._stack.enter_context(RedisServer(peers / "redis"))
            self.orthanc = self._stack.enter_context(
                Orthanc(peers / "orthanc-nodelay", tcp_nodelay=True, dicomweb=True,
                        modalities=modalities))
            self.orthanc_nagle = self._stack.enter_context(
                Orthanc(peers / "orthanc-nagle", aet="ORTHANCN", tcp_nodelay=False,
                        dicomweb=True, modalities=modalities))
            for study in self.studies.values():
                self.orthanc.upload_study(study)
                self.orthanc_nagle.upload_study(study)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stack.close()

    def peer(self, nagle: bool) -> Orthanc:
        peer = self.orthanc_nagle if nagle else self.orthanc
        assert peer is not None, "the environment is not started"
        return peer
