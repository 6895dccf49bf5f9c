"""The STOW-RS forward store (``plugin = "stow-rs"``): POST every instance to a DICOMweb archive.

Each instance goes up as a ``multipart/related; type="application/dicom"`` request whose body
is streamed from the spool file with httpx: the Part-10 bytes exactly as received, with memory
bounded by the read block whatever the instance size. (dicomweb-client's ``store_instances``
takes decoded pydicom data sets and re-encodes them, which would hold each instance in memory
and need not reproduce its bytes, so it is not used for sending.)

Two phases as for the DIMSE forward store: a remote archive has no invisible staging, so
``write`` remembers the spool file (the sink keeps it until every store has committed) and
``commit`` POSTs it. The instance counts as stored only when the archive's STOW-RS response
lists it in Referenced SOP Sequence (0008,1199); an entry in Failed SOP Sequence (0008,1198)
fails it with the archive's Failure Reason (0008,1197).

Credentials come from environment variables the config names (``token_env`` for a bearer
token, or ``username`` with ``password_env`` for basic auth), never from the config itself.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from pacsfetch import hookimpl
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.plugins.contracts import IncomingInstance, StoreBackend
from pacsfetch.uids import is_valid_uid

if TYPE_CHECKING:  # imported where used: loading the plugin costs no HTTP client (70 ms)
    import httpx

log = logging.getLogger(__name__)

READ_BLOCK = 1024 * 1024
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
RETRIEVE_URL = "00081190"
SOP_INSTANCE_UID = "00080018"
QIDO_PAGE = 1000

_FAILURE_REASONS = {
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "referenced SOP class not supported",
}


class StowRsSettings(BaseModel):
    """Keys of a ``[stores.NAME]`` section with ``plugin = "stow-rs"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: AnyHttpUrl = Field(description="DICOMweb root; instances are POSTed to {url}/studies.")
    token_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Environment variable with a bearer token.")
    username: str | None = Field(None, min_length=1, description="For HTTP basic auth.")
    password_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Environment variable with the password.")
    timeout: float = Field(60.0, gt=0, description="Seconds for connect and each read.")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        if self.token_env and (self.username or self.password_env):
            raise ValueError("give token_env or username/password_env, not both")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("username and password_env go together")
        return self


@dataclass(frozen=True, slots=True)
class _Pending:
    path: Path
    size: int
    sop_instance_uid: str


def _from_env(name: str, store_name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RetrieveError(ErrorKind.CONFIG, f"environment variable {name} (named by "
                            f"stores.{store_name}'s token_env/password_env) is not set")
    return value


def _http_client(settings: StowRsSettings, store_name: str) -> httpx.Client:
    import httpx

    headers = {"Accept": "application/dicom+json"}
    auth: httpx.Auth | None = None
    if settings.token_env:
        headers["Authorization"] = f"Bearer {_from_env(settings.token_env, store_name)}"
    if settings.username and settings.password_env:
        auth = httpx.BasicAuth(settings.username, _from_env(settings.password_env, store_name))
    return httpx.Client(headers=headers, auth=auth, timeout=settings.timeout)


class StowRsSession:
    """One job POSTing instances to one STOW-RS endpoint over one keep-alive connection."""

    def __init__(self, settings: StowRsSettings, store_name: str, job_id: str) -> None:
        self._url = str(settings.url).rstrip("/") + "/studies"
        self._store_name = store_name
        self._job_id = job_id
        self._client = _http_client(settings, store_name)

    @property
    def spool_dir(self) -> Path | None:
        return None

    def write(self, instance: IncomingInstance) -> _Pending:
        return _Pending(instance.path, instance.size, instance.identity.sop_instance_uid)

    def commit(self, staged: _Pending) -> str:
        import httpx  # already loaded by _http_client: a dictionary look-up

        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {staged.size}\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        try:
            response = self._client.post(
                self._url,
                content=_body(head, staged.path, tail),
                headers={
                    "Content-Type": "multipart/related; type=\"application/dicom\"; "
                                    f"boundary={boundary}",
                    # A known length: no chunked encoding, which some archives refuse.
                    "Content-Length": str(len(head) + staged.size + len(tail)),
                },
            )
        except httpx.TransportError as exc:
            raise RetrieveError(ErrorKind.STORE, f"cannot reach the STOW-RS endpoint "
                                f"{self._url} ({type(exc).__name__}): is the archive up?") from None
        return self._verify(response, staged.sop_instance_uid)

    def _verify(self, response: httpx.Response, sop_instance_uid: str) -> str:
        """The instance's location if the archive stored it; raise with its reason if not."""
        answer = _json(response)
        failed = _sequence(answer, FAILED_SOP_SEQUENCE)
        for item in failed:
            if _value(item, REFERENCED_SOP_INSTANCE_UID) == sop_instance_uid:
                reason = _value(item, FAILURE_REASON)
                text = _FAILURE_REASONS.get(reason, "") if isinstance(reason, int) else ""
                code = f"0x{reason:04X}" if isinstance(reason, int) else "unknown"
                raise RetrieveError(ErrorKind.STORE, f"{self._url} refused the instance: "
                                    f"STOW-RS failure reason {code} {text}".rstrip())
        if response.status_code in (401, 403):
            raise RetrieveError(ErrorKind.STORE, f"{self._url} refused our credentials "
                                f"(HTTP {response.status_code}): check token_env/password_env")
        for item in _sequence(answer, REFERENCED_SOP_SEQUENCE):
            if _value(item, REFERENCED_SOP_INSTANCE_UID) == sop_instance_uid:
                return str(_value(item, RETRIEVE_URL) or self._url)
        raise RetrieveError(ErrorKind.STORE, f"{self._url} did not confirm the instance "
                            f"(HTTP {response.status_code}, {response.reason_phrase})")

    def abort(self, staged: _Pending) -> None:
        """Nothing to undo: nothing is sent before commit."""

    def sync(self) -> None:
        """Nothing to do: the archive answered each POST after storing the instance."""

    def close(self) -> None:
        self._client.close()


def _body(head: bytes, path: Path, tail: bytes) -> Iterator[bytes]:
    yield head
    with path.open("rb") as fh:
        while block := fh.read(READ_BLOCK):
            yield block
    yield tail


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _sequence(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    items = dataset.get(tag, {}).get("Value", [])
    return [item for item in items if isinstance(item, dict)]


def _value(dataset: dict[str, Any], tag: str) -> Any:
    values = dataset.get(tag, {}).get("Value") or [None]
    return values[0]


class StowRsBackend:
    name = "stow-rs"
    settings_model = StowRsSettings

    def open(self, store_name: str, settings: BaseModel, job_id: str) -> StowRsSession:
        assert isinstance(settings, StowRsSettings)
        return StowRsSession(settings, store_name, job_id)

    def study_inventory(self, store_name: str, settings: BaseModel,
                        study_uid: str) -> frozenset[str] | None:
        """What the archive lists of the study by QIDO-RS (same DICOMweb root as STOW-RS),
        page by page; None when it offers no QIDO-RS or refuses the query."""
        assert isinstance(settings, StowRsSettings)
        url = f"{str(settings.url).rstrip('/')}/studies/{study_uid}/instances"
        found: set[str] = set()
        import httpx

        with _http_client(settings, store_name) as client:
            while True:
                try:
                    response = client.get(url, params={
                        "includefield": SOP_INSTANCE_UID, "offset": len(found),
                        "limit": QIDO_PAGE})
                except httpx.TransportError:
                    return None
                if response.status_code in (204, 404):
                    return frozenset(found)
                if response.status_code != 200:
                    return None
                try:
                    page = response.json()
                except ValueError:
                    return None
                before = len(found)
                found.update(uid for item in page if isinstance(item, dict)
                             and isinstance(uid := _value(item, SOP_INSTANCE_UID), str)
                             and is_valid_uid(uid))
                if len(page) < QIDO_PAGE or len(found) == before:
                    return frozenset(found)


@hookimpl
def pacsfetch_store_backends() -> list[StoreBackend]:
    return [StowRsBackend()]
