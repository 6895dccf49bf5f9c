"""The one configuration file: PACS nodes (sources), stores, broker, API and worker settings.

The file is TOML; its path comes from ``PACSFETCH_CONFIG`` (default ``./pacsfetch.toml``).
Key names are a contract with operators' files: extend them, never rename them. Every
section forbids unknown keys so that a typo refuses start-up with a message naming the key
instead of being silently ignored. Secrets never live here: they come from the environment.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pacsfetch.uids import check_ae_title, check_uid

CONFIG_ENV = "PACSFETCH_CONFIG"
BROKER_URL_ENV = "PACSFETCH_BROKER_URL"
DEFAULT_CONFIG_PATH = Path("pacsfetch.toml")

AETitle = Annotated[str, AfterValidator(check_ae_title)]
TransferSyntaxUID = Annotated[str, AfterValidator(lambda v: check_uid(v, "transfer syntax UID"))]
DicomwebTransferSyntax = Annotated[
    str, AfterValidator(lambda v: v if v == "*" else check_uid(v, "transfer syntax UID"))
]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
"""The *name* of an environment variable: secrets stay in the environment, never in the file."""


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    """Redis: Celery's broker and the job-state store (one server, two uses)."""

    url: str = "redis://127.0.0.1:6379/0"
    visibility_timeout: int = Field(
        3600,
        ge=10,
        description="Seconds before a job whose worker vanished without acking is redelivered.",
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// , rediss:// or unix:// URL")
        return value


class SourceConfig(_Section):
    """A PACS node that pacsfetch retrieves from."""

    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle = "PACSFETCH"
    transports: list[str] = Field(default_factory=lambda: ["c-get"], min_length=1)
    dicomweb_url: AnyHttpUrl | None = None
    timeout: float = Field(30.0, gt=0, description="Seconds for connect, ACSE and DIMSE replies.")
    max_pdu: int = Field(
        0, ge=0, description="Largest P-DATA PDU we accept from the PACS; 0 means no limit."
    )
    transfer_syntaxes: list[TransferSyntaxUID] | None = Field(
        None,
        description="Transfer syntaxes proposed for storage contexts when the PACS does not "
        "say which ones a study holds; default: the common uncompressed and compressed ones.",
    )
    dicomweb_username: str | None = Field(
        None, min_length=1, description="HTTP basic-auth user for dicomweb_url."
    )
    dicomweb_password_env: EnvName | None = Field(
        None, description="Name of the environment variable holding the basic-auth password."
    )
    dicomweb_token_env: EnvName | None = Field(
        None, description="Name of the environment variable holding a bearer token."
    )
    dicomweb_transfer_syntax: DicomwebTransferSyntax = Field(
        "*", description="transfer-syntax asked of WADO-RS; '*' means as stored (no transcoding)."
    )
    max_results: int = Field(
        0, ge=0, description="C-FIND result count at which this PACS caps its answers "
        "(e.g. Orthanc's LimitFindResults); queries reaching it are split. 0: no cap.",
    )
    move_destination: AETitle | None = Field(
        None,
        description="C-MOVE only: the AE title under which this PACS knows `pacsfetch "
        "receiver` (the PACS maps it to the receiver's host and port).",
    )

    @model_validator(mode="after")
    def _one_dicomweb_auth(self) -> Self:
        if self.dicomweb_token_env and self.dicomweb_username:
            raise ValueError("dicomweb_token_env and dicomweb_username exclude each other")
        if bool(self.dicomweb_username) != bool(self.dicomweb_password_env):
            raise ValueError("dicomweb_username and dicomweb_password_env go together")
        return self

    @field_validator("transports")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a transport twice")
        if "auto" in value:
            raise ValueError("'auto' is a job setting, not a transport of a source")
        return value


class StoreConfig(BaseModel):
    """A place instances are written to; ``plugin`` picks the store plugin.

    The remaining keys belong to the plugin, which validates them with its own model
    (see :func:`pacsfetch.plugins.registry.Registry.check_config`).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    plugin: str = Field(min_length=1)

    @property
    def settings(self) -> dict[str, Any]:
        """The plugin-specific keys of this section."""
        return dict(self.model_extra or {})


class ApiConfig(_Section):
    """The HTTP edge."""

    require_token: bool = Field(
        False,
        description="Refuse to start unless PACSFETCH_API_TOKEN is set; callers then send it "
        "as a bearer token.",
    )
    echo_timeout: float = Field(15.0, gt=0)
    query_timeout: float = Field(
        60.0, gt=0, description="Seconds the API waits for a worker to answer a C-FIND query."
    )


class WorkerConfig(_Section):
    """How workers run jobs."""

    concurrency: int = Field(2, ge=1, le=64)
    max_retries: int = Field(
        3, ge=0, description="Retries of a job whose PACS was unreachable or aborted."
    )
    retry_backoff: float = Field(10.0, ge=0, description="Seconds before the first retry; doubles.")
    lease_seconds: int = Field(
        30, ge=5, description="A running job's lease; a redelivered job waits for it to lapse."
    )
    progress_interval: float = Field(0.5, gt=0, description="Seconds between progress updates.")


class MetricsConfig(_Section):
    """Prometheus metrics: the API serves them at ``/metrics``, workers and the receiver on
    ports of their own (a Celery worker has no HTTP server to add a path to)."""

    enabled: bool = Field(True, description="Serve metrics on the worker and receiver ports.")
    bind: str = Field("0.0.0.0", min_length=1, description="Address the metrics ports listen on.")
    worker_port: int = Field(9808, ge=1, le=65535)
    receiver_port: int = Field(9809, ge=1, le=65535)


class ReceiverConfig(_Section):
    """`pacsfetch receiver`: the storage SCP that C-MOVE destinations point at.

    One receiver process serves every worker, so the PACS needs one destination however
    many workers run.
    """

    ae_title: AETitle = "PACSFETCH"
    port: int = Field(11112, ge=1, le=65535)
    bind: str = Field("0.0.0.0", min_length=1, description="Address to listen on.")
    accept_from: list[AETitle] = Field(
        default_factory=list,
        description="Calling AE titles allowed to send instances; empty accepts any.",
    )


class Config(_Section):
    """The whole configuration file."""

    broker: BrokerConfig = BrokerConfig()
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    stores: dict[str, StoreConfig] = Field(default_factory=dict)
    api: ApiConfig = ApiConfig()
    worker: WorkerConfig = WorkerConfig()
    metrics: MetricsConfig = MetricsConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    path: Path | None = Field(None, exclude=True, description="Where it was loaded from.")


def _key_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the key as it is written in the TOML file."""
    lines = []
    for item in error.errors():
        key = _key_of(tuple(item["loc"]))
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{key}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], *, source: str = "config") -> Config:
    """Validate already-parsed TOML data, applying environment overrides."""
    data = dict(data)
    broker_url = os.environ.get(BROKER_URL_ENV)
    if broker_url:
        data["broker"] = {**data.get("broker", {}), "url": broker_url}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}:\n{describe_validation_error(exc)}") from None
    for name in (*config.sources, *config.stores):
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{source}: section name {name!r} may hold only letters, digits, - and _")
    return config


def config_path() -> Path:
    """The path named by ``PACSFETCH_CONFIG``, or ``./pacsfetch.toml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None) -> Config:
    """Read and validate the configuration file; raise :class:`ConfigError` when unusable."""
    path = path or config_path()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found (set {CONFIG_ENV} to its path)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, source=str(path))
    return config.model_copy(update={"path": path})
