"""Generated sample studies: real DICOM Part-10 files for the demo, the tests and the benchmarks.

The studies are generated, never shipped, so the repository holds no patient data: every
name and ID is an obviously fake value. UIDs are name-based ``2.25`` UIDs derived from a seed,
so a re-run names the same objects and a PACS seeded twice does not fill up with duplicates.
Compressed transfer syntaxes are encoded by real codecs (DCMTK's command-line encoders and the
OpenJPEG build bundled with Pillow), so a retrieval is exercised with data that decoders accept,
exactly as a PACS would serve it.
"""

from __future__ import annotations

import bisect
import copy
import io
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image
from pydicom import __version__ as pydicom_version
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

__all__ = ["SampleInstance", "SampleStudy", "generate_mixed_study", "generate_uniform_study"]

#: Name-based (SHA-1, ISO/IEC 9834-8) UUIDs in this namespace become ``2.25`` UIDs: the same
#: names give the same UIDs on every run, and no other generator's UIDs can coincide with them.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "pacsfetch.sandbox")
_PATIENT_NAME = "SANDBOX^PACSFETCH"
#: Fixed dates keep the generated files byte-identical from one run to the next.
_STUDY_DATE = "20240102"
_STUDY_TIME = "101500"

#: DCMTK encoders per target syntax. ``+un`` keeps our SOP Instance UID even for lossy JPEG
#: (dcmcjpeg would otherwise mint a random one, breaking the deterministic UIDs).
_DCMTK_ENCODERS: dict[str, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("dcmcjpeg", "+eb", "+un"),
    JPEGLosslessSV1: ("dcmcjpeg", "+e1", "+un"),
    JPEGLSLossless: ("dcmcjpls", "+el", "+un"),
    RLELossless: ("dcmcrle", "+un"),
}

#: Syntaxes pydicom writes itself (it implements the deflate step of 1.2.840.10008.1.2.1.99);
#: Explicit VR Little Endian has a faster writer of its own, :class:`_SplicingWriter`.
_PYDICOM_SYNTAXES = frozenset({ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

#: The elements :func:`_set_instance` changes from one instance to the next.
_INSTANCE_TAGS = [Tag(keyword) for keyword in ("SOPInstanceUID", "InstanceNumber",
                                               "ImagePositionPatient", "SliceLocation",
                                               "PixelData")]

_SOP_CLASS_BY_MODALITY: dict[str, str] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
    "OT": SecondaryCaptureImageStorage,
}


@dataclass(frozen=True)
class SampleInstance:
    """One generated DICOM Part-10 file and the identifiers a retrieval is checked against."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SampleStudy:
    """A generated study: what to upload to a peer and what a retrieval must bring back."""

    study_uid: str
    patient_id: str
    instances: tuple[SampleInstance, ...]

    @property
    def series_uids(self) -> tuple[str, ...]:
        """Series Instance UIDs in generation order, each once."""
        return tuple(dict.fromkeys(instance.series_uid for instance in self.instances))

    @property
    def sop_class_uids(self) -> frozenset[str]:
        return frozenset(instance.sop_class_uid for instance in self.instances)

    @property
    def transfer_syntax_uids(self) -> frozenset[str]:
        return frozenset(instance.transfer_syntax_uid for instance in self.instances)

    def instances_of_series(self, series_uid: str) -> tuple[SampleInstance, ...]:
        return tuple(i for i in self.instances if i.series_uid == series_uid)


@dataclass(frozen=True)
class _PixelFormat:
    rows: int
    columns: int
    bits_allocated: int  # 8 or 16
    bits_stored: int
    samples: int  # 1 = MONOCHROME2, 3 = RGB

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_allocated // 8 * self.samples


@dataclass(frozen=True)
class _SeriesSpec:
    label: str  # the series' directory name and SeriesDescription
    modality: str
    transfer_syntax_uid: str
    pixels: _PixelFormat
    count: int

    @property
    def sop_class_uid(self) -> str:
        return _SOP_CLASS_BY_MODALITY[self.modality]


@dataclass(frozen=True)
class _StudyIdentity:
    """What all instances of one study share; *entropy* names every UID derived from it."""

    entropy: tuple[str, ...]
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str


_CT_PIXELS = _PixelFormat(rows=64, columns=64, bits_allocated=16, bits_stored=12, samples=1)
_MR_PIXELS = _PixelFormat(rows=48, columns=48, bits_allocated=16, bits_stored=12, samples=1)

#: One study covering the SOP class / transfer syntax pairs a retriever meets in practice.
_MIXED_SERIES: tuple[_SeriesSpec, ...] = (
    _SeriesSpec("ct-explicit-le", "CT", ExplicitVRLittleEndian, _CT_PIXELS, 3),
    _SeriesSpec("mr-implicit-le", "MR", ImplicitVRLittleEndian, _MR_PIXELS, 3),
    _SeriesSpec("sc-jpeg-baseline", "OT", JPEGBaseline8Bit, _PixelFormat(32, 32, 8, 8, 3), 2),
    _SeriesSpec("ct-jpeg-lossless-sv1", "CT", JPEGLosslessSV1, _CT_PIXELS, 2),
    _SeriesSpec("mr-jpeg-ls-lossless", "MR", JPEGLSLossless, _MR_PIXELS, 2),
    _SeriesSpec("cr-jpeg2000-lossless", "CR", JPEG2000Lossless,
                _PixelFormat(64, 48, 16, 16, 1), 2),
    _SeriesSpec("us-rle-lossless", "US", RLELossless, _PixelFormat(40, 56, 8, 8, 3), 2),
    _SeriesSpec("ct-deflated", "CT", DeflatedExplicitVRLittleEndian, _CT_PIXELS, 2),
)


def generate_mixed_study(out_dir: Path, *, patient_id: str = "PF-DEMO-001",
                         seed: int = 0) -> SampleStudy:
    """One small study of several series, each a different SOP class and/or transfer syntax.

    Pixel data depends only on the image format and the instance number, so a lossless series
    decodes to the pixels of the uncompressed series of the same format (CT, MR): a check
    that a transcoding retrieval lost nothing. Needs DCMTK's encoders (``dcmcjpeg``,
    ``dcmcjpls``, ``dcmcrle``) on the PATH.
    """
    identity = _study_identity(("mixed", str(seed)), patient_id)
    instances: list[SampleInstance] = []
    for number, spec in enumerate(_MIXED_SERIES, start=1):
        series_dir = Path(out_dir) / f"{number:02d}-{spec.label}"
        instances += _write_series(identity, spec, number, series_dir)
    return SampleStudy(identity.study_uid, patient_id, tuple(instances))


def generate_uniform_study(out_dir: Path, *, n_instances: int, rows: int, columns: int,
                           bits: int = 16, modality: str = "CT",
                           patient_id: str = "PF-BENCH-001", seed: int = 0) -> SampleStudy:
    """*n_instances* images of one series, uncompressed Explicit VR Little Endian.

    Built for volume (benchmarks, long-running jobs): the elements all instances share are
    encoded once, so thousands of files take seconds. *bits* is Bits Allocated (8 or 16);
    *modality* is one of CT, MR, CR, US, OT.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    if modality not in _SOP_CLASS_BY_MODALITY:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS_BY_MODALITY)}")
    pixels = _PixelFormat(rows, columns, bits, 12 if bits == 16 else 8, 1)
    spec = _SeriesSpec("uniform", modality, ExplicitVRLittleEndian, pixels, n_instances)
    shape = f"{n_instances}x{rows}x{columns}x{bits}-{modality}"
    identity = _study_identity(("uniform", shape, str(seed)), patient_id)
    instances = _write_series(identity, spec, 1, Path(out_dir))
    return SampleStudy(identity.study_uid, patient_id, tuple(instances))


def _study_identity(entropy: tuple[str, ...], patient_id: str) -> _StudyIdentity:
    entropy = (*entropy, patient_id)
    return _StudyIdentity(entropy, patient_id, _uid(entropy, "study"),
                          _uid(entropy, "frame-of-reference"))


def _uid(entropy: tuple[str, ...], *parts: object) -> str:
    name = "/".join([*entropy, *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _write_series(identity: _StudyIdentity, spec: _SeriesSpec, series_number: int,
                  series_dir: Path) -> list[SampleInstance]:
    series_dir.mkdir(parents=True, exist_ok=True)
    series_uid = _uid(identity.entropy, "series", series_number)
    ds = _series_dataset(identity, spec, series_uid, series_number)
    write = _series_writer(ds, spec.transfer_syntax_uid)
    image = _gradient_image(spec.pixels)
    instances = []
    for number in range(1, spec.count + 1):
        sop_uid = _uid(identity.entropy, "instance", series_number, number)
        _set_instance(ds, spec, number, sop_uid, _shifted(image, spec.pixels, number))
        path = series_dir / f"{number:05d}.dcm"
        write(ds, path)
        instances.append(SampleInstance(path, identity.study_uid, series_uid, sop_uid,
                                        spec.sop_class_uid, spec.transfer_syntax_uid))
    return instances


def _series_dataset(identity: _StudyIdentity, spec: _SeriesSpec, series_uid: str,
                    series_number: int) -> Dataset:
    """Everything but the per-instance elements: patient, study, series, equipment, pixels."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = spec.sop_class_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
    ds.AccessionNumber = ""
    ds.Modality = spec.modality
    ds.Manufacturer = "pacsfetch sandbox"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = spec.label
    ds.PatientName = _PATIENT_NAME
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.update(_modality_elements(spec.modality, identity))
    ds.update(_pixel_description(spec.pixels))
    return ds


def _modality_elements(modality: str, identity: _StudyIdentity) -> Dataset:
    """The type-1/2 elements of each modality's image module, with plausible fake values."""
    ds = Dataset()
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = identity.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2.0
    else:
        ds.PatientOrientation = ""
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = 1
    elif modality == "OT":
        ds.ConversionType = "WSD"
    elif modality == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def _pixel_description(pixels: _PixelFormat) -> Dataset:
    ds = Dataset()
    ds.SamplesPerPixel = pixels.samples
    ds.PhotometricInterpretation = "RGB" if pixels.samples == 3 else "MONOCHROME2"
    if pixels.samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = pixels.rows
    ds.Columns = pixels.columns
    ds.BitsAllocated = pixels.bits_allocated
    ds.BitsStored = pixels.bits_stored
    ds.HighBit = pixels.bits_stored - 1
    ds.PixelRepresentation = 0
    return ds


def _set_instance(ds: Dataset, spec: _SeriesSpec, number: int, sop_uid: str,
                  pixel_data: bytes) -> None:
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    if spec.modality in ("CT", "MR"):
        ds.ImagePositionPatient = [0, 0, 2.0 * number]
        ds.SliceLocation = 2.0 * number
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"


def _file_meta(sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> FileMetaDataset:
    """Complete File Meta Information (group length aside), as pydicom itself would fill it."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom_version}"
    return meta


def _gradient_image(pixels: _PixelFormat) -> bytes:
    """A diagonal gradient: cheap to build at any size, and never blank after compression.

    Row *y* is the slice of one long ramp starting at pixel *y*, so the whole image costs one
    ramp of ``rows + columns`` pixels and a join, whatever the size.
    """
    top = (1 << pixels.bits_stored) - 1
    step = max(1, top // (pixels.rows + pixels.columns))
    sample_bytes = pixels.bits_allocated // 8
    ramp = b"".join(
        b"".join(((k * step + channel * top // 3) & top).to_bytes(sample_bytes, "little")
                 for channel in range(pixels.samples))
        for k in range(pixels.rows + pixels.columns)
    )
    width = pixels.columns * pixels.bytes_per_pixel
    return b"".join(ramp[y * pixels.bytes_per_pixel:][:width] for y in range(pixels.rows))


def _shifted(image: bytes, pixels: _PixelFormat, number: int) -> bytes:
    """The image rotated by *number* pixels: every instance gets its own pixel data, so a
    retrieval that swaps two instances' contents cannot go unnoticed."""
    offset = (number * 7 * pixels.bytes_per_pixel) % len(image)
    return image[offset:] + image[:offset]


def _series_writer(template: Dataset, transfer_syntax_uid: str) -> Callable[[Dataset, Path], None]:
    """How each instance of a series built from *template* is written to its file."""
    if transfer_syntax_uid == ExplicitVRLittleEndian:
        return _SplicingWriter(template)
    return partial(_encode, transfer_syntax_uid=transfer_syntax_uid)


class _Splicer:
    """Encodes datasets that differ from *template* only in the elements *variable*.

    pydicom takes about 4 ms to write a whole dataset, too slow for the thousands of files a
    benchmark needs. The constant elements are encoded once, as the runs between the variable
    ones; each dataset then costs its own few elements and a join.
    """

    def __init__(self, template: Dataset, variable: Iterable[BaseTag]) -> None:
        self._variable = sorted(variable)
        runs: list[list[BaseTag]] = [[] for _ in range(len(self._variable) + 1)]
        for tag in sorted(template.keys()):
            if tag not in self._variable:
                runs[bisect.bisect(self._variable, tag)].append(tag)
        self._runs = [_encode_elements(template[tag] for tag in tags) for tags in runs]

    def __call__(self, ds: Dataset) -> bytes:
        parts = [self._runs[0]]
        for tag, run in zip(self._variable, self._runs[1:], strict=True):
            parts += [_encode_elements([ds[tag]]) if tag in ds else b"", run]
        return b"".join(parts)


class _SplicingWriter:
    """Explicit VR Little Endian files of one series, written fast by :class:`_Splicer`s.

    The bytes are those pydicom's ``save_as`` writes (the tests check it).
    """

    def __init__(self, template: Dataset) -> None:
        self._meta = _file_meta(template.SOPClassUID, "", ExplicitVRLittleEndian)
        self._encode_meta = _Splicer(self._meta, [Tag("MediaStorageSOPInstanceUID")])
        self._encode_dataset = _Splicer(template, _INSTANCE_TAGS)

    def __call__(self, ds: Dataset, path: Path) -> None:
        self._meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        meta = self._encode_meta(self._meta)
        group_length = _encode_elements([DataElement(0x00020000, "UL", len(meta))])
        path.write_bytes(b"".join([b"\0" * 128, b"DICM", group_length, meta,
                                   self._encode_dataset(ds)]))


def _encode_elements(elements: Iterable[DataElement]) -> bytes:
    """*elements*, in order, in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    for element in elements:
        write_data_element(fp, element)
    return fp.getvalue()


def _encode(ds: Dataset, path: Path, transfer_syntax_uid: str) -> None:
    """Write *ds* (uncompressed pixel data) to *path* in *transfer_syntax_uid*."""
    if transfer_syntax_uid in _PYDICOM_SYNTAXES:
        _save(ds, path, transfer_syntax_uid)
    elif transfer_syntax_uid == JPEG2000Lossless:
        _write_jpeg2000(ds, path)
    else:
        _write_with_dcmtk(ds, path, transfer_syntax_uid)


def _save(ds: Dataset, path: Path, transfer_syntax_uid: str) -> None:
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax_uid)
    ds.save_as(path, enforce_file_format=True)


def _write_with_dcmtk(ds: Dataset, path: Path, transfer_syntax_uid: str) -> None:
    """Explicit VR Little Endian to a temporary file next to *path*, then DCMTK encodes it.

    The result is checked: a DCMTK encoder that cannot handle an image may leave it as it was.
    """
    tool, *options = _DCMTK_ENCODERS[transfer_syntax_uid]
    source = path.with_suffix(".uncompressed")
    _save(ds, source, ExplicitVRLittleEndian)
    try:
        _run([_tool(tool), *options, str(source), str(path)])
    finally:
        source.unlink()
    written = read_file_meta_info(path).TransferSyntaxUID
    if written != transfer_syntax_uid:
        raise RuntimeError(f"{tool} wrote {path} as {written}, not {transfer_syntax_uid}")


def _write_jpeg2000(ds: Dataset, path: Path) -> None:
    """Reversible (lossless) JPEG 2000 by OpenJPEG through Pillow, as a raw codestream
    (``no_jp2``: DICOM encapsulates the J2K stream, not the JP2 file format)."""
    mode = {(8, 1): "L", (16, 1): "I;16", (8, 3): "RGB"}[(ds.BitsAllocated, ds.SamplesPerPixel)]
    image = Image.frombytes(mode, (ds.Columns, ds.Rows), ds.PixelData)
    codestream = io.BytesIO()
    image.save(codestream, format="JPEG2000", no_jp2=True, irreversible=False)
    encoded = copy.deepcopy(ds)  # *ds* is reused for the next instance, keep it uncompressed
    encoded.PixelData = encapsulate([codestream.getvalue()])
    encoded["PixelData"].VR = "OB"
    encoded.LossyImageCompression = "00"
    _save(encoded, path, JPEG2000Lossless)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install Debian's dcmtk (scripts/bootstrap.sh)")
    return found


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
