"""Real peers on private loopback ports: Redis, Orthanc, DCMTK's dcmqrscp and storescp.

Nothing is mocked: each peer is the server from Debian's packages, run as a subprocess with a
configuration generated under a work directory (its log goes there too), so the demo, the tests
and the benchmarks talk DICOM and HTTP to the software a site actually runs. Each peer is a
context manager: entering starts it and waits until it answers, leaving stops it. Every address
is 127.0.0.1; peers that cannot bind to loopback only (Orthanc, DCMTK) at least listen on
private, randomly chosen ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from pacsfetch.sandbox.samples import SampleStudy

__all__ = ["DcmQrScp", "Orthanc", "Prometheus", "RedisServer", "S3Server", "StoreScp", "free_port"]

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# Absolute paths on purpose: pynetdicom installs a ``storescp`` of its own on the PATH.
_REDIS_SERVER = "/usr/bin/redis-server"
_ORTHANC = "/usr/sbin/Orthanc"
_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
_DCMQRSCP = "/usr/bin/dcmqrscp"
_DCMQRIDX = "/usr/bin/dcmqridx"
_STORESCP = "/usr/bin/storescp"
_PROMETHEUS = "/usr/bin/prometheus"

#: Debian builds DCMTK (which also does Orthanc's DICOM networking) with Nagle's algorithm
#: left on unless this variable says otherwise. Nagle plus delayed ACKs stalls every small
#: PDU exchange by up to 40 ms, which would swamp what the benchmarks measure.
_NAGLE_OFF = {"TCP_NODELAY": "1"}

#: Storage SOP classes (DCMTK's names) that dcmqrscp stores, indexes and sends back by C-GET.
_DCMQRSCP_STORAGE_CLASSES = (
    "ComputedRadiographyImageStorage", "CTImageStorage", "EnhancedCTImageStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiframeImageStorage", "SecondaryCaptureImageStorage",
    "MultiframeGrayscaleByteSecondaryCaptureImageStorage",
    "MultiframeGrayscaleWordSecondaryCaptureImageStorage",
    "MultiframeTrueColorSecondaryCaptureImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "XRayAngiographicImageStorage",
    "XRayRadiofluoroscopicImageStorage", "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage", "RTImageStorage", "RTDoseStorage",
    "RTStructureSetStorage", "RTPlanStorage", "SegmentationStorage", "BasicTextSRStorage",
    "EnhancedSRStorage", "ComprehensiveSRStorage", "KeyObjectSelectionDocumentStorage",
    "GrayscaleSoftcopyPresentationStateStorage", "EncapsulatedPDFStorage",
)

#: Uncompressed syntaxes first: dcmqrscp cannot transcode compressed data, and it sends every
#: instance of a SOP class on the first context accepted for that class.
_DCMQRSCP_TRANSFER_SYNTAXES = (
    "LocalEndianExplicit", "LittleEndianImplicit", "DeflatedLittleEndianExplicit",
    "JPEGBaseline", "JPEGExtended:Process2+4",
    "JPEGLossless:Non-hierarchical-1stOrderPrediction", "JPEGLSLossless", "JPEGLSLossy",
    "JPEG2000LosslessOnly", "JPEG2000", "RLELossless",
)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class _Peer(ABC):
    """A server subprocess: started, waited for until it answers, stopped.

    It runs in a session of its own, so stopping it also ends the children it forked per
    association (dcmqrscp, storescp), and nothing outlives the peer.
    """

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = self.workdir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _command(self) -> list[str]:
        """The command line that runs the server in the foreground."""

    @abstractmethod
    def _answers(self) -> bool:
        """Whether the server answers requests yet."""

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        """Start the server and wait until it answers; fail with its log if it does not."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(), cwd=self.workdir, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_answering(self._process)

    def stop(self) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL if it lingers."""
        if self._process is None:
            return
        process, self._process = self._process, None
        self._signal_group(process, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(process, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _wait_until_answering(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"{self.name} exited with status {process.returncode}; "
                                   f"{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT:.0f} s; "
                                   f"{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 40) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"end of {self.log_path}:\n" + "\n".join(tail)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
            os.killpg(process.pid, signum)


class RedisServer(_Peer):
    """``redis-server`` without persistence: a broker that starts empty every time; with
    *appendonly*, as production should run it: AOF fsynced on every write, so a restart,
    even after SIGKILL, finds everything that was acknowledged."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 appendonly: bool = False) -> None:
        super().__init__(workdir, "redis")
        self.port = port or free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self._appendonly = appendonly

    def _command(self) -> list[str]:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self._appendonly \
            else ["--appendonly", "no"]
        return [_installed(_REDIS_SERVER), "--bind", LOOPBACK, "--port", str(self.port),
                "--save", "", *aof, "--dir", str(self.workdir)]

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash or a lost node would."""
        if self._process is not None:
            process, self._process = self._process, None
            self._signal_group(process, signal.SIGKILL)
            process.wait()

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class Orthanc(_Peer):
    """Debian's Orthanc with its own storage, optionally with the DICOMweb plugin.

    Any calling AE may C-ECHO, C-FIND, C-GET, C-MOVE and C-STORE, under any called AE title;
    C-MOVE destinations are the *modalities* (name -> (AE title, host, port)). Orthanc 1.10
    cannot bind to loopback only: its HTTP server refuses remote clients instead
    (``RemoteAccessAllowed``), and both ports are private. *tcp_nodelay* turns Nagle's
    algorithm off in the DICOM layer (see :data:`_NAGLE_OFF`); Orthanc's HTTP server already
    sets TCP_NODELAY itself. With *users* (name -> password) its HTTP server, DICOMweb
    included, demands HTTP basic authentication; this class then authenticates as the first.
    *extra_config* adds or overrides Orthanc options (e.g. ``LimitFindResults``).
    """

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None,
                 modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 tcp_nodelay: bool = True, dicomweb: bool = True,
                 users: Mapping[str, str] | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(workdir, "orthanc")
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.http_url = f"http://{LOOPBACK}:{self.http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web"
        self._tcp_nodelay = tcp_nodelay
        self._dicomweb = dicomweb
        self._client: httpx.Client | None = None
        self._users = dict(users or {})
        self._auth = next(iter(self._users.items()), None)
        self.config_path = self.workdir / "orthanc.json"
        config = {**self._config(modalities or {}), **(extra_config or {})}
        self.config_path.write_text(json.dumps(config, indent=2))

    def _config(self, modalities: Mapping[str, tuple[str, str, int]]) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        config: dict[str, Any] = {
            "Name": f"pacsfetch sandbox {self.aet}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            # Sandbox data is disposable: no fsync per instance, so seeding thousands is quick.
            "SyncStorageArea": False,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self._users),
            "RegisteredUsers": self._users,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: [ae, _loopback(host), port]
                                for name, (ae, host, port) in modalities.items()},
        }
        if self._dicomweb:
            config["Plugins"] = [_DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    def _command(self) -> list[str]:
        if self._dicomweb:
            _installed(_DICOMWEB_PLUGIN)
        return [_installed(_ORTHANC), str(self.config_path)]

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1" if self._tcp_nodelay else "0"}

    def _answers(self) -> bool:
        try:
            plugins = httpx.get(f"{self.http_url}/plugins", timeout=1, auth=self._auth).json()
        except (httpx.HTTPError, ValueError):
            return False
        # The HTTP server comes up last; the DICOMweb check catches a plugin that failed to load
        # (Orthanc then runs without it) as a start that never completes.
        return _accepts_tcp(self.dicom_port) and (not self._dicomweb or "dicom-web" in plugins)

    def start(self) -> None:
        super().start()
        self._client = httpx.Client(base_url=self.http_url, timeout=60, auth=self._auth)

    def stop(self) -> None:
        """Stop Orthanc (a graceful stop takes it about 3 s); :meth:`start` brings it back on
        the same ports with the same storage, as a PACS restarting."""
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop()

    def upload(self, paths: Iterable[Path]) -> int:
        """POST each DICOM file to ``/instances`` (one keep-alive connection); how many."""
        count = 0
        for path in paths:
            self._request("POST", "/instances", content=Path(path).read_bytes(),
                          headers={"Content-Type": "application/dicom"})
            count += 1
        return count

    def upload_study(self, study: SampleStudy) -> int:
        return self.upload(instance.path for instance in study.instances)

    def instance_count(self) -> int:
        return int(self._request("GET", "/statistics").json()["CountInstances"])

    def list_study_instances(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs of the study as Orthanc holds them, sorted."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        found = self._request("POST", "/tools/find", json=query).json()
        return sorted(instance["MainDicomTags"]["SOPInstanceUID"] for instance in found)

    def get_instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of one instance, byte for byte."""
        matches = self._request("POST", "/tools/lookup", content=sop_instance_uid).json()
        ids = [match["ID"] for match in matches if match["Type"] == "Instance"]
        if not ids:
            raise KeyError(f"Orthanc holds no instance {sop_instance_uid}")
        return self._request("GET", f"/instances/{ids[0]}/file").content

    def _request(self, method: str, url: str, *, content: bytes | str | None = None,
                 json: object = None, headers: Mapping[str, str] | None = None) -> httpx.Response:
        if self._client is None:
            raise RuntimeError("Orthanc is not running")
        response = self._client.request(method, url, content=content, json=json,
                                        headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"Orthanc {method} {url}: HTTP {response.status_code} "
                               f"{response.text[:500]}")
        return response


class DcmQrScp(_Peer):
    """DCMTK's ``dcmqrscp``: C-FIND, C-GET and C-MOVE at patient, study, series, image level.

    *files* are copied into its storage area and indexed before it starts. Any calling AE may
    connect; the called AE must be *aet*. C-MOVE destinations are *move_destinations*
    (AE title -> (host, port)). Without an association profile dcmqrscp accepts uncompressed
    syntaxes only, so a generated one accepts all (storage classes:
    :data:`_DCMQRSCP_STORAGE_CLASSES`) and grants the SCP role C-GET needs. dcmqrscp cannot
    decompress and sends every instance of a SOP class on the first context accepted for it:
    C-GET compressed files by proposing exactly their syntax; C-MOVE sends uncompressed ones
    only. At most 500 studies of 1 GiB each: beyond that dcmqrscp deletes the oldest.
    """

    def __init__(self, workdir: Path, *, aet: str = "DCMQRSCP", port: int | None = None,
                 move_destinations: Mapping[str, tuple[str, int]] | None = None,
                 files: Iterable[Path] = ()) -> None:
        super().__init__(workdir, "dcmqrscp")
        self.aet = aet
        self.port = port or free_port()
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "dcmqrscp.cfg"
        self.profiles_path = self.workdir / "profiles.cfg"
        self.config_path.write_text(self._config(move_destinations or {}))
        self.profiles_path.write_text(_dcmqrscp_profiles())
        self._index(files)

    def _config(self, move_destinations: Mapping[str, tuple[str, int]]) -> str:
        hosts = [f"dest{n} = ({ae}, {_loopback(host)}, {port})"
                 for n, (ae, (host, port)) in enumerate(move_destinations.items())]
        return "\n".join([
            f"NetworkTCPPort = {self.port}",
            "MaxPDUSize = 16384",
            "MaxAssociations = 16",
            "HostTable BEGIN", *hosts, "HostTable END",
            "VendorTable BEGIN", "VendorTable END",
            # Quota: beyond it dcmqrscp deletes the oldest studies. These are its maxima.
            "AETable BEGIN", f"{self.aet} {self.storage_dir} RW (500, 1024mb) ANY",
            "AETable END",
        ]) + "\n"

    def _index(self, files: Iterable[Path]) -> None:
        stored: list[str] = []
        for path in files:
            target = self.storage_dir / f"{len(stored):06d}-{Path(path).name}"
            shutil.copyfile(path, target)
            stored.append(str(target))
        if stored:
            result = subprocess.run([_installed(_DCMQRIDX), str(self.storage_dir), *stored],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"dcmqridx failed ({result.returncode}):\n{result.stderr}")

    def _command(self) -> list[str]:
        return [_installed(_DCMQRSCP), "--config", str(self.config_path),
                "--assoc-config-file", str(self.profiles_path), "Incoming", "Outgoing",
                "--disable-host-lookup"]

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **_NAGLE_OFF}

    def _answers(self) -> bool:
        return _accepts_tcp(self.port)


class StoreScp(_Peer):
    """DCMTK's ``storescp``: a C-MOVE destination writing what it receives to *received_dir*.

    It accepts every storage SOP class (known or not) in every transfer syntax it knows and
    writes the data set exactly as received (no transcoding), one ``<modality>.<SOP Instance
    UID>.dcm`` file per instance; each association is served by a child process of its own.
    *stall_s* makes it sit on every C-STORE for that long before answering: an archive
    that stalls under load, on purpose.
    """

    def __init__(self, workdir: Path, *, aet: str = "STORESCP", port: int | None = None,
                 stall_s: int = 0) -> None:
        super().__init__(workdir, "storescp")
        self.aet = aet
        self.port = port or free_port()
        self.stall_s = stall_s
        self.received_dir = self.workdir / "received"
        self.received_dir.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [_installed(_STORESCP), "--aetitle", self.aet,
                "--output-directory", str(self.received_dir), "--filename-extension", ".dcm",
                "--accept-all", "--promiscuous", "--bit-preserving", "--fork",
                "--disable-host-lookup",
                *(["--sleep-during", str(self.stall_s)] if self.stall_s else []), str(self.port)]

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **_NAGLE_OFF}

    def _answers(self) -> bool:
        return _accepts_tcp(self.port)


def _dcmqrscp_profiles() -> str:
    """dcmqrscp's association profiles: *Incoming* accepts storage in any syntax and grants
    the SCP role C-GET needs; *Outgoing* (C-MOVE sub-associations) proposes uncompressed
    syntaxes, as dcmqrscp does without a profile."""
    classes = _DCMQRSCP_STORAGE_CLASSES
    return "\n".join([
        "[[TransferSyntaxes]]",
        "[Any]", *_numbered("TransferSyntax", _DCMQRSCP_TRANSFER_SYNTAXES),
        "[Uncompressed]", *_numbered("TransferSyntax", _DCMQRSCP_TRANSFER_SYNTAXES[:2]),
        "[[PresentationContexts]]",
        "[Incoming]", *_numbered("PresentationContext", [
            "VerificationSOPClass\\Uncompressed", *(f"{c}\\Any" for c in classes)]),
        "[Outgoing]", *_numbered("PresentationContext", [f"{c}\\Uncompressed" for c in classes]),
        "[[SCPSCURoleSelection]]",
        "[BothRoles]", *_numbered("Role", [f"{c}\\BOTH" for c in classes]),
        "[[Profiles]]",
        "[Incoming]", "PresentationContexts = Incoming", "SCPSCURoleSelection = BothRoles",
        "[Outgoing]", "PresentationContexts = Outgoing",
    ]) + "\n"


def _numbered(key: str, values: Iterable[str]) -> list[str]:
    return [f"{key}{n} = {value}" for n, value in enumerate(values, start=1)]


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def _loopback(host: str) -> str:
    """*host*, which must be 127.0.0.1: the sandbox never sends anything elsewhere."""
    if host != LOOPBACK:
        raise ValueError(f"sandbox peers only talk to {LOOPBACK}, not {host}")
    return host


def _installed(path: str) -> str:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: install Debian's orthanc, orthanc-dicomweb, "
                                "dcmtk, redis-server and prometheus (scripts/bootstrap.sh)")
    return path


class Prometheus(_Peer):
    """Debian's Prometheus server scraping loopback targets every *scrape_interval*.

    *targets* maps a job name to ``host:port`` addresses (loopback only); each job scrapes
    ``/metrics``. Its data lives under the work directory and starts empty.
    """

    def __init__(self, workdir: Path, targets: Mapping[str, Iterable[str]], *,
                 scrape_interval: str = "1s", port: int | None = None) -> None:
        super().__init__(workdir, "prometheus")
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._targets = {job: [self._loopback_target(address) for address in addresses]
                         for job, addresses in targets.items()}
        self._interval = scrape_interval

    @staticmethod
    def _loopback_target(address: str) -> str:
        host, _, port = address.rpartition(":")
        return f"{_loopback(host)}:{int(port)}"

    def _command(self) -> list[str]:
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({
            "global": {"scrape_interval": self._interval, "evaluation_interval": self._interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addrs}]}
                for job, addrs in self._targets.items()
            ],
        }, indent=2))
        return [_installed(_PROMETHEUS), f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}"]

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query; the ``result`` list of the HTTP API's answer."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10)
        reply.raise_for_status()
        return list(reply.json()["data"]["result"])


class S3Server(_Peer):
    """An S3 API over HTTP on loopback: moto's standalone server, with signatures enforced.

    There is no Debian package of an S3 server, so this is the one peer from PyPI; it speaks
    the real S3 REST protocol, and boto3 talks HTTP to it exactly as to AWS. Authentication is
    on: the first IAM calls (``INITIAL_NO_AUTH_ACTION_COUNT``) create a user allowed ``s3:*``,
    whose key pair (:attr:`access_key_id`, :attr:`secret_access_key`) signs everything after;
    any other key is refused with 403, as AWS does.
    """

    _SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key

    def __init__(self, workdir: Path, *, port: int | None = None,
                 region: str = "us-east-1") -> None:
        super().__init__(workdir, "s3")
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.region = region
        self.access_key_id = ""
        self.secret_access_key = ""

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self._SETUP_ACTIONS)}

    def _answers(self) -> bool:
        return _accepts_tcp(self.port)  # an HTTP probe could count as one of the setup actions

    def start(self) -> None:
        super().start()
        import boto3  # only the S3 peer needs it

        iam = boto3.client("iam", endpoint_url=self.url, region_name=self.region,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="pacsfetch")
        iam.put_user_policy(UserName="pacsfetch", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="pacsfetch")["AccessKey"]
        self.access_key_id, self.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self) -> Any:
        """A boto3 S3 client signed with the server's credentials."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.region,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key)
