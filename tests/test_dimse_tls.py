"""DICOM TLS against a real Orthanc 1.10 (``DicomTlsEnabled``) and our own receiver.

Throwaway certificates are made here with ``cryptography``: one CA signs Orthanc's, the
receiver's and our client certificate; a second CA stands for "someone else's". Orthanc
demands client certificates signed by the first CA, and uses its own certificate as the
client when it connects back to the receiver for a C-MOVE.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from helpers import CALLING_AE, ReceiverProcess, make_config, run_job, write_toml

from pacsfetch.config import parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study

RECEIVER_AE = "PACSFETCH"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Pair:
    pair = Pair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return pair


def make_ca(directory: Path, name: str) -> tuple[Pair, x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(directory, name, cert, key), cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Pair, x509.Certificate, rsa.RSAPrivateKey]
              ) -> Pair:
    """A certificate for loopback (SAN 127.0.0.1 and localhost), usable as server and client."""
    _, ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return _write(directory, name, cert, key)


@dataclass(frozen=True)
class Certificates:
    ca: Pair
    pacs: Pair
    receiver: Pair
    client: Pair
    other_ca: Pair
    stranger: Pair
    """Signed by the other CA: trusted by nobody here."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls-certs")
    ca = make_ca(directory, "pacsfetch-test-ca")
    other = make_ca(directory, "someone-elses-ca")
    return Certificates(ca[0], make_leaf(directory, "pacs", ca),
                        make_leaf(directory, "receiver", ca), make_leaf(directory, "client", ca),
                        other[0], make_leaf(directory, "stranger", other))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("tls-study"), n_instances=30,
                                  rows=16, columns=16, patient_id="PF-TLS", seed=210)


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, certs: Certificates, study: SampleStudy,
         receiver_port: int) -> Iterator[Orthanc]:
    tls = {"DicomTlsEnabled": True,
           "DicomTlsCertificate": str(certs.pacs.cert),
           "DicomTlsPrivateKey": str(certs.pacs.key),
           "DicomTlsTrustedCertificates": str(certs.ca.cert),
           "DicomTlsRemoteCertificateRequired": True,
           # The receiver as a move destination reached over TLS.
           "DicomModalities": {"pacsfetch": {"AET": RECEIVER_AE, "Host": "127.0.0.1",
                                             "Port": receiver_port, "UseDicomTls": True}}}
    with Orthanc(tmp_path_factory.mktemp("tls-orthanc"), aet="TLSPACS", dicomweb=False,
                 extra_config=tls) as server:
        server.upload_study(study)
        yield server


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
             certs: Certificates, pacs: Orthanc, receiver_port: int) -> dict[str, Any]:
    source = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
              "calling_ae_title": CALLING_AE, "transports": ["c-get"], "timeout": 20,
              "move_destination": RECEIVER_AE,
              "tls": {"ca_file": str(certs.ca.cert), "cert_file": str(certs.client.cert),
                      "key_file": str(certs.client.key)}}
    wrong_ca = {**source, "tls": {**source["tls"], "ca_file": str(certs.other_ca.cert)}}
    data = make_config(redis_url=redis_server.url,
                       store_root=tmp_path_factory.mktemp("tls-store"),
                       extra_sources={"orthanc": source, "wrong-ca": wrong_ca})
    data["receiver"] = {"ae_title": RECEIVER_AE, "port": receiver_port, "bind": "127.0.0.1",
                        "tls": {"cert_file": str(certs.receiver.cert),
                                "key_file": str(certs.receiver.key),
                                "ca_file": str(certs.ca.cert)}}
    return data


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory,
             settings: dict[str, Any]) -> Iterator[ReceiverProcess]:
    workdir = tmp_path_factory.mktemp("tls-receiver")
    process = ReceiverProcess(write_toml(settings, workdir / "receiver.toml"),
                              workdir / "receiver.log", settings["receiver"]["port"])
    process.wait_ready()
    yield process
    process.stop()


def test_c_get_over_tls_from_orthanc(settings: dict[str, Any], study: SampleStudy,
                                     tmp_path: Path) -> None:
    settings = {**settings, "stores": {"local": {"plugin": "filesystem",
                                                 "root": str(tmp_path / "get")}}}
    outcome = run_job(parse_config(settings),
                      JobRequest(source="orthanc", study_uid=study.study_uid, store="local",
                                 transport="c-get"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == len(study.instances)
    assert len(list((tmp_path / "get").rglob("*.dcm"))) == len(study.instances)


def test_a_wrong_ca_fails_as_tls(settings: dict[str, Any], study: SampleStudy) -> None:
    outcome = run_job(parse_config(settings),
                      JobRequest(source="wrong-ca", study_uid=study.study_uid, store="local",
                                 transport="c-get"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "tls", outcome.error
    assert "certificate verify failed" in outcome.error and "ca_file" in outcome.error


def refusals(settings: dict[str, Any]) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{settings['metrics']['receiver_port']}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^pacsfetch_receiver_refusals_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}


def test_c_move_over_tls_into_the_receiver(settings: dict[str, Any], study: SampleStudy,
                                          receiver: ReceiverProcess) -> None:
    before = refusals(settings).get("tls", 0)
    outcome = run_job(parse_config(settings),
                      JobRequest(source="orthanc", study_uid=study.study_uid, store="local",
                                 transport="c-move"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == len(study.instances)
    # The receiver (its own process, its own copy of the config) wrote them.
    root = Path(settings["stores"]["local"]["root"]) / study.study_uid
    assert len(list(root.rglob("*.dcm"))) == len(study.instances)
    assert refusals(settings).get("tls", 0) == before


def _handshake(port: int, certs: Certificates, client: Pair | None) -> bool:
    """Does a TLS client (with *client* as its certificate) get through to the receiver?"""
    ctx = ssl.create_default_context(cafile=str(certs.ca.cert))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                # TLS 1.3 reports a refused client certificate on the first read.
                tls.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT
                tls.recv(1)
        except (ssl.SSLError, ConnectionResetError):
            return False
    return True


def test_receiver_refuses_and_counts_failed_handshakes(
        settings: dict[str, Any], certs: Certificates, receiver: ReceiverProcess) -> None:
    before = refusals(settings).get("tls", 0)
    assert _handshake(receiver.port, certs, certs.client)  # our CA's client: in
    assert not _handshake(receiver.port, certs, certs.stranger)  # another CA's: out
    assert not _handshake(receiver.port, certs, None)  # no client certificate: out
    # A peer speaking plain DICOM to the TLS port: its A-ASSOCIATE-RQ is no handshake.
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as plain:
        plain.sendall(b"\x01\x00\x00\x00\x00\x44" + bytes(0x44))
        try:
            answer = plain.recv(64)
        except ConnectionResetError:  # closed with our bytes unread
            answer = b""
        assert answer == b""
    assert refusals(settings).get("tls", 0) - before == 3
    assert "handshake" in receiver.log_path.read_text()


def test_forward_store_over_tls(settings: dict[str, Any], certs: Certificates,
                                study: SampleStudy, pacs: Orthanc, tmp_path: Path) -> None:
    """C-GET over TLS, forwarded by C-STORE over TLS into a second TLS Orthanc."""
    with Orthanc(tmp_path / "archive", aet="TLSARCHIVE", dicomweb=False, extra_config={
            "DicomTlsEnabled": True, "DicomTlsCertificate": str(certs.pacs.cert),
            "DicomTlsPrivateKey": str(certs.pacs.key),
            "DicomTlsTrustedCertificates": str(certs.ca.cert),
            "DicomTlsRemoteCertificateRequired": True}) as archive:
        tls = settings["sources"]["orthanc"]["tls"]
        settings = {**settings, "stores": {"archive": {
            "plugin": "dicom", "ae_title": archive.aet, "host": "127.0.0.1",
            "port": archive.dicom_port, "calling_ae_title": CALLING_AE, "tls": tls}}}
        outcome = run_job(parse_config(settings),
                          JobRequest(source="orthanc", study_uid=study.study_uid,
                                     store="archive", transport="c-get"))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        assert archive.instance_count() == len(study.instances)
