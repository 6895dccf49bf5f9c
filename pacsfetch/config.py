"""The one configuration file: PACS nodes (sources), stores, broker, API and worker settings.

The file is TOML; its path comes from ``PACSFETCH_CONFIG`` (default ``./pacsfetch.toml``).
Key names are a contract with operators' files: extend them, never rename them. Every
section forbids unknown keys so that a typo refuses start-up with a message naming the key
instead of being silently ignored. Secrets never live here: they come from the environment.
"""

from __future__ import annotations

import ipaddress
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

from pacsfetch.hl7_orders import Hl7Config
from pacsfetch.prefetch_rules import PrefetchConfig, check_references
from pacsfetch.uids import check_ae_title, check_uid
from pacsfetch.windows import check_timezone, parse_window

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


def _window(value: str) -> str:
    parse_window(value)
    return value


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.1.2.3 or "
                         "10.1.2.0/24)") from None
    return value


class TlsConfig(_Section):
    """DICOM TLS (PS3.15 Annex B) towards a PACS, or for the move receiver.

    Towards a PACS: ``ca_file`` verifies the PACS's certificate (the system's trust store
    when absent), ``cert_file`` and ``key_file`` are our client certificate where the PACS
    asks for one. For ``[receiver.tls]``: ``cert_file`` and ``key_file`` are the receiver's
    own, and ``ca_file`` makes it demand client certificates signed by that CA.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = Field(
        True, description="Towards a PACS: the certificate must name the source's host."
    )

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self


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
    move_from: list[Annotated[str, AfterValidator(_network)]] | None = Field(
        None,
        description="C-MOVE only: addresses or networks the PACS delivers to the receiver "
        "from; default: the addresses `host` resolves to.",
    )
    tls: TlsConfig | None = Field(None, description="DICOM TLS towards this PACS.")
    max_associations: int = Field(
        4, ge=1, le=64,
        description="Most associations the whole fleet holds open to this PACS at once "
        "(C-FIND, C-GET, C-MOVE alike; DICOMweb: concurrent requests).",
    )
    reserved_associations: int = Field(
        1, ge=0,
        description="Of max_associations, how many bulk work (migrations) never takes, so a "
        "prefetch or an interactive job starts at once (at most max_associations - 1; with "
        "one association in all, bulk work yields it between series instead).",
    )
    associations_per_job: int = Field(
        2, ge=1, le=16, description="Associations one job spreads its series over."
    )
    windows: list[Annotated[str, AfterValidator(_window)]] = Field(
        default_factory=list,
        description="When bulk work may open associations, e.g. 'Mon-Fri 19:00-07:00'; "
        "empty: always.",
    )
    timezone: Annotated[str, AfterValidator(check_timezone)] = Field(
        "UTC", description="IANA time zone of `windows`, e.g. 'Europe/Berlin'."
    )
    max_mb_per_second: float | None = Field(
        None, gt=0, description="Fleet-wide cap on the data rate received from this PACS."
    )

    @model_validator(mode="after")
    def _one_dicomweb_auth(self) -> Self:
        if self.dicomweb_token_env and self.dicomweb_username:
            raise ValueError("dicomweb_token_env and dicomweb_username exclude each other")
        if bool(self.dicomweb_username) != bool(self.dicomweb_password_env):
            raise ValueError("dicomweb_username and dicomweb_password_env go together")
        return self

    @field_validator("dicomweb_url")
    @classmethod
    def _no_credentials_in_url(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        # A URL is shown by GET /sources and quoted in job errors: a secret in it leaks.
        if value is not None and (value.username or value.password):
            raise ValueError("must not embed credentials (user:password@): set "
                             "dicomweb_username with dicomweb_password_env, or dicomweb_token_env")
        return value

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
        description="Refuse to start unless a token is configured (PACSFETCH_API_TOKEN, "
        "PACSFETCH_API_TOKENS or tokens_file); callers then send one as a bearer token.",
    )
    echo_timeout: float = Field(15.0, gt=0)
    query_timeout: float = Field(
        60.0, gt=0, description="Seconds the API waits for a worker to answer a C-FIND query."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="Largest request body; a longer one is answered 413 without being read "
        "(a full batch, 1,000 jobs with 100,000 SOP UIDs, is under 8 MiB).",
    )
    tokens_file: Path | None = Field(
        None, description="File of named, hashed API tokens with their scopes (`pacsfetch "
        "token add`); read at start.",
    )

    @field_validator("tokens_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value


class JobsConfig(_Section):
    """How long job records live."""

    retention_days: float = Field(
        30, gt=0, description="Days a finished job (with its instance list) is kept in Redis.",
    )


class AuditConfig(_Section):
    """The audit trail of who retrieved what (IHE ATNA in spirit): JSON lines, appended."""

    path: Path | None = Field(
        None, description="File each API and worker process appends audit events to; "
        "unset: no audit trail.",
    )

    @field_validator("path")
    @classmethod
    def _in_a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"{value.parent} is not a directory")
        if value is not None and value.is_dir():
            raise ValueError(f"{value} is a directory; name a file in it")
        return value


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
    drain_seconds: int = Field(
        60, ge=1, le=3600,
        description="After SIGTERM, seconds a worker may finish its running job before it "
        "hands the job back to the queue, and the receiver its open associations; the pod's "
        "terminationGracePeriodSeconds must exceed it.",
    )
    redis_outage_seconds: float = Field(
        60.0, ge=0, description="How long a running job rides out Redis (broker and job "
        "state) not answering before it gives up.",
    )


class MetricsConfig(_Section):
    """Prometheus metrics: the API serves them at ``/metrics``, workers and the receiver on
    ports of their own (a Celery worker has no HTTP server to add a path to)."""

    enabled: bool = Field(True, description="Serve metrics on the worker and receiver ports.")
    bind: str = Field("0.0.0.0", min_length=1, description="Address the metrics ports listen on.")
    worker_port: int = Field(9808, ge=1, le=65535)
    receiver_port: int = Field(9809, ge=1, le=65535)
    # prefetch: the HL7 listener and the scheduler count prefetch work too
    hl7_port: int = Field(9810, ge=1, le=65535)
    scheduler_port: int = Field(9811, ge=1, le=65535)


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
    tls: TlsConfig | None = Field(
        None, description="Serve DICOM TLS: cert_file and key_file required; ca_file "
        "demands client certificates signed by it.",
    )
    # Room for the PACS: what one idle or abusive peer may hold (see workers/receiver_policy).
    idle_timeout: float = Field(
        60.0, gt=0, description="Seconds an association may go without receiving data-set "
        "bytes (C-ECHOs do not count) before the receiver aborts it.",
    )
    max_associations: int = Field(
        64, ge=1, le=1024, description="Associations the receiver serves at once, in all.",
    )
    max_associations_per_address: int = Field(
        16, ge=1, description="Associations one network address may hold at once, so a "
        "misbehaving peer leaves room for the PACS.",
    )

    @field_validator("tls")
    @classmethod
    def _server_certificate(cls, value: TlsConfig | None) -> TlsConfig | None:
        if value is not None and not value.cert_file:
            raise ValueError("the receiver needs cert_file and key_file to serve TLS")
        return value


class Config(_Section):
    """The whole configuration file."""

    broker: BrokerConfig = BrokerConfig()
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    stores: dict[str, StoreConfig] = Field(default_factory=dict)
    api: ApiConfig = ApiConfig()
    worker: WorkerConfig = WorkerConfig()
    metrics: MetricsConfig = MetricsConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    hl7: Hl7Config = Hl7Config()
    jobs: JobsConfig = JobsConfig()
    audit: AuditConfig = AuditConfig()
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
    problems = check_references(config.prefetch, set(config.sources), set(config.stores))
    if problems:
        raise ConfigError(f"{source}:\n" + "\n".join(problems))
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
