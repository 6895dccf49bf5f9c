"""The sandbox itself: generated studies are valid DICOM, and the peers are real and answer.

Everything here runs the real thing (DCMTK's codecs and servers, Orthanc, Redis, pynetdicom);
the peers start once for the module.
"""

from __future__ import annotations

import io
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
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
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsfetch.sandbox.peers import LOOPBACK, DcmQrScp, Orthanc, RedisServer, StoreScp, free_port
from pacsfetch.sandbox.samples import (
    SampleInstance,
    SampleStudy,
    generate_mixed_study,
    generate_uniform_study,
)

CALLING_AE = "PFSANDBOX"

#: (SOP class, transfer syntax) pairs the mixed study must contain.
REQUIRED_PAIRS = {
    (CTImageStorage, ExplicitVRLittleEndian),
    (MRImageStorage, ImplicitVRLittleEndian),
    (SecondaryCaptureImageStorage, JPEGBaseline8Bit),
    (CTImageStorage, JPEGLosslessSV1),
    (MRImageStorage, JPEGLSLossless),
}
REQUIRED_SYNTAXES = {JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian}

#: DCMTK command lines that turn a file in each syntax into Explicit VR Little Endian.
DCMTK_DECODERS = {
    JPEGBaseline8Bit: ["dcmdjpeg"],
    JPEGLosslessSV1: ["dcmdjpeg"],
    JPEGLSLossless: ["dcmdjpls"],
    RLELossless: ["dcmdrle"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+te"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox")


@pytest.fixture(scope="module")
def study(workdir: Path) -> SampleStudy:
    return generate_mixed_study(workdir / "mixed")


@pytest.fixture(scope="module")
def storescp(workdir: Path) -> Iterator[StoreScp]:
    with StoreScp(workdir / "storescp") as server:
        yield server


@pytest.fixture(scope="module")
def orthanc(workdir: Path, study: SampleStudy, storescp: StoreScp) -> Iterator[Orthanc]:
    modalities = {"storescp": (storescp.aet, LOOPBACK, storescp.port)}
    with Orthanc(workdir / "orthanc", modalities=modalities) as server:
        server.upload_study(study)
        yield server


@pytest.fixture(scope="module")
def dcmqrscp(workdir: Path, study: SampleStudy, storescp: StoreScp) -> Iterator[DcmQrScp]:
    destinations = {storescp.aet: (LOOPBACK, storescp.port)}
    files = [instance.path for instance in study.instances]
    with DcmQrScp(workdir / "dcmqrscp", move_destinations=destinations, files=files) as server:
        yield server


def series_with(study: SampleStudy, transfer_syntax_uid: str) -> tuple[SampleInstance, ...]:
    """The first series of *study* in *transfer_syntax_uid*."""
    first = next(i for i in study.instances if i.transfer_syntax_uid == transfer_syntax_uid)
    return study.instances_of_series(first.series_uid)


def dataset_bytes(part10: bytes) -> bytes:
    """A Part-10 file's data set: what follows the preamble and the File Meta Information."""
    group_length = struct.unpack_from("<I", part10, 128 + 4 + 8)[0]
    return part10[128 + 4 + 12 + group_length:]


def decoded(instance: SampleInstance, scratch: Path) -> Dataset:
    """*instance* decoded to Explicit VR Little Endian by DCMTK."""
    out = scratch / f"{instance.sop_instance_uid}.dcm"
    command = DCMTK_DECODERS[instance.transfer_syntax_uid]
    subprocess.run([*command, str(instance.path), str(out)], check=True)
    return pydicom.dcmread(out)


def series_identifier(instance: SampleInstance) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = instance.study_uid
    ds.SeriesInstanceUID = instance.series_uid
    return ds


def calling_ae(*contexts: str) -> AE:
    ae = AE(ae_title=CALLING_AE)
    for context in contexts:
        ae.add_requested_context(context)
    return ae


# --- generated studies -------------------------------------------------------------------------


def test_mixed_study_has_the_required_sop_classes_and_syntaxes(study: SampleStudy) -> None:
    pairs = {(i.sop_class_uid, i.transfer_syntax_uid) for i in study.instances}
    assert pairs >= REQUIRED_PAIRS
    assert study.transfer_syntax_uids >= REQUIRED_SYNTAXES
    assert len(study.series_uids) == len(pairs) == 8
    for series_uid in study.series_uids:
        assert 2 <= len(study.instances_of_series(series_uid)) <= 3
    assert len({i.sop_instance_uid for i in study.instances}) == len(study.instances)


def test_mixed_study_files_carry_what_the_study_says(study: SampleStudy) -> None:
    for instance in study.instances:
        ds = pydicom.dcmread(instance.path)
        assert ds.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid
        assert (ds.SOPClassUID, ds.SOPInstanceUID) == (instance.sop_class_uid,
                                                       instance.sop_instance_uid)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study.study_uid,
                                                               instance.series_uid)
        assert (ds.PatientID, str(ds.PatientName)) == (study.patient_id, "SANDBOX^PACSFETCH")


def test_generation_is_deterministic_per_seed(study: SampleStudy, tmp_path: Path) -> None:
    again = generate_mixed_study(tmp_path / "again")
    assert [i.path.read_bytes() for i in again.instances] == [
        i.path.read_bytes() for i in study.instances]
    other = generate_mixed_study(tmp_path / "other", seed=1)
    assert not {i.sop_instance_uid for i in other.instances} & {
        i.sop_instance_uid for i in study.instances}


@pytest.mark.parametrize("transfer_syntax_uid", sorted(DCMTK_DECODERS))
def test_dcmtk_decodes_compressed_series(study: SampleStudy, transfer_syntax_uid: str,
                                         tmp_path: Path) -> None:
    for instance in series_with(study, transfer_syntax_uid):
        ds = decoded(instance, tmp_path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert len(ds.PixelData) == (ds.Rows * ds.Columns * ds.SamplesPerPixel
                                     * ds.BitsAllocated // 8)


def test_lossless_series_decode_to_their_uncompressed_twins(study: SampleStudy,
                                                            tmp_path: Path) -> None:
    twins = [(series_with(study, ExplicitVRLittleEndian), series_with(study, JPEGLosslessSV1)),
             (series_with(study, ImplicitVRLittleEndian), series_with(study, JPEGLSLossless)),
             (series_with(study, ExplicitVRLittleEndian),
              series_with(study, DeflatedExplicitVRLittleEndian))]
    for uncompressed, compressed in twins:
        # Instance n of either series has the same pixels; the uncompressed one may have more.
        for plain, packed in zip(uncompressed, compressed, strict=False):
            assert decoded(packed, tmp_path).PixelData == pydicom.dcmread(plain.path).PixelData


def test_jpeg2000_series_decodes_with_openjpeg(study: SampleStudy) -> None:
    for instance in series_with(study, JPEG2000Lossless):
        ds = pydicom.dcmread(instance.path)
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        assert frame.startswith(b"\xff\x4f\xff\x51")  # a J2K codestream, not a JP2 file
        image = Image.open(io.BytesIO(frame))
        image.load()
        assert (image.size, image.mode) == ((ds.Columns, ds.Rows), "I;16")


def test_uniform_study_files_are_exactly_what_pydicom_writes(tmp_path: Path) -> None:
    for bits, modality in ((16, "CT"), (8, "OT")):
        uniform = generate_uniform_study(tmp_path / modality, n_instances=4, rows=24,
                                         columns=40, bits=bits, modality=modality)
        assert len(uniform.series_uids) == 1
        assert uniform.transfer_syntax_uids == {ExplicitVRLittleEndian}
        for number, instance in enumerate(uniform.instances, start=1):
            ds = pydicom.dcmread(instance.path)
            rewritten = io.BytesIO()
            ds.save_as(rewritten, enforce_file_format=True)
            assert rewritten.getvalue() == instance.path.read_bytes()
            assert (ds.InstanceNumber, ds.Modality, ds.BitsAllocated) == (number, modality, bits)
            assert len(ds.PixelData) == 24 * 40 * bits // 8


# --- peers -------------------------------------------------------------------------------------


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 1024 < port < 65536


def test_redis_answers_and_keeps_nothing(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("sandbox", "yes")
        assert client.get("sandbox") == b"yes"
        client.close()
    assert not list(tmp_path.glob("*.rdb"))


@pytest.mark.parametrize("peer", ["orthanc", "dcmqrscp", "storescp"])
def test_c_echo(peer: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(peer)
    port = server.dicom_port if isinstance(server, Orthanc) else server.port
    assoc = calling_ae(Verification).associate(LOOPBACK, port, ae_title=server.aet)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_orthanc_holds_the_uploaded_study(orthanc: Orthanc, study: SampleStudy) -> None:
    assert orthanc.instance_count() == len(study.instances)
    assert orthanc.list_study_instances(study.study_uid) == sorted(
        i.sop_instance_uid for i in study.instances)


def test_orthanc_returns_each_file_unchanged(orthanc: Orthanc, study: SampleStudy) -> None:
    for instance in study.instances:
        stored = orthanc.get_instance_file(instance.sop_instance_uid)
        assert dataset_bytes(stored) == dataset_bytes(instance.path.read_bytes())


def test_orthanc_serves_dicomweb(orthanc: Orthanc, study: SampleStudy) -> None:
    response = httpx.get(f"{orthanc.dicomweb_url}/studies",
                         params={"StudyInstanceUID": study.study_uid})
    assert response.status_code == 200
    assert [s["0020000D"]["Value"] for s in response.json()] == [[study.study_uid]]


def test_orthanc_c_move_reaches_storescp_unchanged(orthanc: Orthanc, storescp: StoreScp,
                                                   study: SampleStudy) -> None:
    series = series_with(study, JPEGLSLossless)
    assoc = calling_ae(StudyRootQueryRetrieveInformationModelMove).associate(
        LOOPBACK, orthanc.dicom_port, ae_title=orthanc.aet)
    statuses = [status.Status for status, _ in assoc.send_c_move(
        series_identifier(series[0]), storescp.aet, StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert statuses[-1] == 0x0000
    for instance in series:
        (received,) = storescp.received_dir.glob(f"*{instance.sop_instance_uid}.dcm")
        assert dataset_bytes(received.read_bytes()) == dataset_bytes(instance.path.read_bytes())


def test_dcmqrscp_c_find_at_study_level(dcmqrscp: DcmQrScp, study: SampleStudy) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = study.patient_id
    assoc = calling_ae(StudyRootQueryRetrieveInformationModelFind).associate(
        LOOPBACK, dcmqrscp.port, ae_title=dcmqrscp.aet)
    matches = [identifier.StudyInstanceUID for status, identifier in assoc.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind)
        if status.Status == 0xFF00 and identifier is not None]
    assoc.release()
    assert matches == [study.study_uid]


@pytest.mark.parametrize("transfer_syntax_uid, proposed", [
    (ExplicitVRLittleEndian, None),  # pynetdicom's default: the uncompressed syntaxes
    (JPEGLSLossless, [JPEGLSLossless]),  # dcmqrscp cannot decompress: propose the exact one
])
def test_dcmqrscp_c_get_of_a_series(dcmqrscp: DcmQrScp, study: SampleStudy,
                                    transfer_syntax_uid: str, proposed: list[str] | None) -> None:
    series = series_with(study, transfer_syntax_uid)
    sop_class = series[0].sop_class_uid
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = calling_ae(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, proposed)
    assoc = ae.associate(LOOPBACK, dcmqrscp.port, ae_title=dcmqrscp.aet,
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    statuses = [status.Status for status, _ in assoc.send_c_get(
        series_identifier(series[0]), StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000
    assert sorted(received) == sorted(i.sop_instance_uid for i in series)


def test_dcmqrscp_c_move_reaches_storescp(dcmqrscp: DcmQrScp, storescp: StoreScp,
                                          study: SampleStudy) -> None:
    series = series_with(study, ImplicitVRLittleEndian)
    assoc = calling_ae(StudyRootQueryRetrieveInformationModelMove).associate(
        LOOPBACK, dcmqrscp.port, ae_title=dcmqrscp.aet)
    statuses = [status.Status for status, _ in assoc.send_c_move(
        series_identifier(series[0]), storescp.aet, StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert statuses[-1] == 0x0000
    for instance in series:
        assert len(list(storescp.received_dir.glob(f"*{instance.sop_instance_uid}.dcm"))) == 1


def test_orthanc_stops_and_comes_back_on_the_same_ports(orthanc: Orthanc,
                                                        study: SampleStudy) -> None:
    ports = (orthanc.dicom_port, orthanc.http_port)
    orthanc.stop()
    assoc = calling_ae(Verification).associate(LOOPBACK, orthanc.dicom_port,
                                               ae_title=orthanc.aet)
    assert not assoc.is_established
    orthanc.start()
    assert (orthanc.dicom_port, orthanc.http_port) == ports
    assert orthanc.instance_count() == len(study.instances)
