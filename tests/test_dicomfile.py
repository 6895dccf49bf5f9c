"""The fast header scanner reads the same identity as pydicom, or hands over to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsfetch.plugins.dicomfile import (
    UnreadableInstance,
    read_identity,
    read_identity_pydicom,
)
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study


def test_same_identity_as_pydicom_for_every_syntax(mixed_study: SampleStudy) -> None:
    # The mixed study holds implicit/explicit LE (fast path) and deflated and compressed
    # syntaxes (fallback or encapsulated pixel data after Instance Number).
    for instance in mixed_study.instances:
        fast = read_identity(instance.path)
        assert fast == read_identity_pydicom(instance.path)
        assert fast.sop_instance_uid == instance.sop_instance_uid
        assert fast.transfer_syntax_uid == instance.transfer_syntax_uid


def test_same_identity_for_large_images(tmp_path: Path) -> None:
    study = generate_uniform_study(tmp_path, n_instances=2, rows=512, columns=512)
    for instance in study.instances:
        fast = read_identity(instance.path)
        assert fast == read_identity_pydicom(instance.path)
        assert fast.attributes["InstanceNumber"] in ("1", "2")
        assert fast.attributes["Modality"] == "CT"


def test_truncated_header_is_unreadable(tmp_path: Path, mixed_study: SampleStudy) -> None:
    data = mixed_study.instances[0].path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:300])
    with pytest.raises(UnreadableInstance):
        read_identity(cut)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(UnreadableInstance):
        read_identity(junk)


def test_malformed_uid_is_unreadable(tmp_path: Path, mixed_study: SampleStudy) -> None:
    source = mixed_study.instances[0]
    data = source.path.read_bytes()
    bad = data.replace(source.sop_instance_uid.encode(), b"1.02" + b"3" * (len(source.sop_instance_uid) - 4))
    path = tmp_path / "bad.dcm"
    path.write_bytes(bad)
    with pytest.raises(UnreadableInstance, match="SOPInstanceUID"):
        read_identity(path)


def test_non_ascii_values_are_decoded_by_pydicom(tmp_path: Path) -> None:
    import pydicom

    study = generate_uniform_study(tmp_path / "s", n_instances=1, rows=8, columns=8)
    ds = pydicom.dcmread(study.instances[0].path)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "Åsa-Ö-1"
    path = tmp_path / "utf8.dcm"
    ds.save_as(path, enforce_file_format=True)
    identity = read_identity(path)
    assert identity == read_identity_pydicom(path)
    assert identity.attributes["PatientID"] == "Åsa-Ö-1"
