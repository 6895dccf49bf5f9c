"""The sink every transport feeds: what it refuses, and that refusing writes nothing.

Real Part-10 files from the sample study go through the real pipeline and filesystem store;
this is the guard a PACS that sends the wrong instances (another study, a lying C-STORE
command, a truncated file) meets, whichever transport carried them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pacsfetch.models import JobRequest, Level
from pacsfetch.plugins.contracts import Verdict
from pacsfetch.plugins.registry import get_registry
from pacsfetch.plugins.stores.filesystem import FilesystemBackend, FilesystemSettings
from pacsfetch.sandbox.samples import SampleInstance, SampleStudy
from pacsfetch.workers.pipeline import InstancePipeline
from pacsfetch.workers.state import LocalJobState


def _pipeline(tmp_path: Path, request: JobRequest) -> tuple[InstancePipeline, Path]:
    root = tmp_path / "store"
    session = FilesystemBackend().open("local", FilesystemSettings(root=root), "job1")
    pipeline = InstancePipeline("job1", request, {"local": session}, LocalJobState(),
                                get_registry().hooks.hook, session.spool_dir, 0.0)
    return pipeline, root


def _spooled(pipeline: InstancePipeline, sample: SampleInstance) -> Path:
    copy = pipeline.spool_dir / f"{sample.sop_instance_uid}.part"
    shutil.copyfile(sample.path, copy)
    return copy


def _accept(pipeline: InstancePipeline, sample: SampleInstance, path: Path | None = None) -> Verdict:
    return pipeline.accept(path or _spooled(pipeline, sample), sop_class_uid=sample.sop_class_uid,
                           sop_instance_uid=sample.sop_instance_uid)


def _visible(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".pacsfetch" not in p.parts]


def test_instance_of_another_study_is_refused_and_not_written(
    tmp_path: Path, mixed_study: SampleStudy
) -> None:
    pipeline, root = _pipeline(tmp_path, JobRequest(source="s", study_uid="1.2.3.4", store="local"))
    assert _accept(pipeline, mixed_study.instances[0]) is Verdict.OUT_OF_SCOPE
    assert _visible(root) == [] and pipeline.refused == 1
    assert "did not ask for" in pipeline.problems()[0][1]


def test_instance_outside_the_requested_series_or_list_is_refused(
    tmp_path: Path, mixed_study: SampleStudy
) -> None:
    wanted, other = mixed_study.instances_of_series(mixed_study.series_uids[0])[:2]
    request = JobRequest(source="s", level=Level.IMAGE, study_uid=mixed_study.study_uid,
                         sop_uids=[wanted.sop_instance_uid], store="local")
    pipeline, root = _pipeline(tmp_path, request)
    assert _accept(pipeline, other) is Verdict.OUT_OF_SCOPE
    assert _accept(pipeline, wanted) is Verdict.STORED
    assert [p.stem for p in _visible(root)] == [wanted.sop_instance_uid]


def test_header_contradicting_the_command_is_invalid(tmp_path: Path, mixed_study: SampleStudy) -> None:
    sample, impostor = mixed_study.instances[:2]
    pipeline, root = _pipeline(tmp_path, JobRequest(source="s", study_uid=mixed_study.study_uid,
                                                    store="local"))
    # The C-STORE command claims one instance; the file is another.
    assert _accept(pipeline, sample, _spooled(pipeline, impostor)) is Verdict.INVALID
    assert _visible(root) == [] and pipeline.invalid == 1


@pytest.mark.parametrize("keep", [0, 100, 132])
def test_unreadable_file_is_invalid_and_its_spool_file_removed(
    tmp_path: Path, mixed_study: SampleStudy, keep: int
) -> None:
    sample = mixed_study.instances[0]
    pipeline, root = _pipeline(tmp_path, JobRequest(source="s", study_uid=mixed_study.study_uid,
                                                    store="local"))
    truncated = pipeline.spool_dir / "truncated.part"
    truncated.write_bytes(sample.path.read_bytes()[:keep])
    assert _accept(pipeline, sample, truncated) is Verdict.INVALID
    assert not truncated.exists() and _visible(root) == []


def test_redelivery_is_acknowledged_once_stored(tmp_path: Path, mixed_study: SampleStudy) -> None:
    sample = mixed_study.instances[0]
    pipeline, root = _pipeline(tmp_path, JobRequest(source="s", study_uid=mixed_study.study_uid,
                                                    store="local"))
    assert _accept(pipeline, sample) is Verdict.STORED
    assert _accept(pipeline, sample) is Verdict.DUPLICATE
    assert len(_visible(root)) == 1 and pipeline.progress.completed == 1
