"""Configuration: one frozen pydantic-settings model, from a TOML file plus ``WEBHOOKD_*`` env.

Precedence: environment (``WEBHOOKD_SECTION__KEY``) over the file over the defaults. Relative
paths in the file are resolved against the file's directory. Every problem is reported with its
key path (:class:`~webhookd.errors.ConfigError`); nothing starts half-configured.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from webhookd.catalogue import CataloguePolicy, SchemaMismatchAction
from webhookd.errors import ConfigError
from webhookd.routing import pattern_problem

CONFIG_ENV_VAR = "WEBHOOKD_CONFIG"
# systemd's LoadCredential= puts secrets in this directory; secret_file = "%d/NAME" reads one.
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
CREDENTIAL_PREFIXES = ("%d/", "$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/")

DEFAULT_DATABASE_PATH = "webhookd.db"
DEFAULT_BUSY_TIMEOUT_SECONDS = 5.0
DEFAULT_PG_POOL_SIZE = 10
DEFAULT_PG_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_PG_LEASE_MARGIN_SECONDS = 15.0
DEFAULT_LISTEN = "127.0.0.1:9180"
DEFAULT_READY_MAX_LAG_SECONDS = 300.0
DEFAULT_MAX_ENDPOINT_LABELS = 200
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_TIMEOUT_SECONDS = 15.0
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_MAX_CONCURRENCY_PER_ENDPOINT = 10
DEFAULT_RESPONSE_EXCERPT_BYTES = 1024
DEFAULT_HEADER_PREFIX = "X-BookingScheduler"
DEFAULT_INITIAL_DELAY_SECONDS = 5.0
DEFAULT_MULTIPLIER = 3.0
DEFAULT_MAX_DELAY_SECONDS = 4 * 3600.0
DEFAULT_JITTER = 0.2
DEFAULT_MAX_ATTEMPTS = 14
DEFAULT_MAX_AGE_SECONDS = 3 * 24 * 3600.0
DEFAULT_POLL_INTERVAL_SECONDS = 0.01
DEFAULT_FANOUT_BATCH_SIZE = 500
# express.json() refuses bodies over 100 kB by default; stay well inside it.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_RETENTION_SUCCEEDED_SECONDS = 7 * 24 * 3600.0
# Dead letters are kept longer, so that they can still be inspected and replayed.
DEFAULT_RETENTION_FAILED_SECONDS = 30 * 24 * 3600.0
DEFAULT_RETENTION_OUTBOX_SECONDS = 7 * 24 * 3600.0
DEFAULT_PRUNE_BATCH_SIZE = 500
DEFAULT_PRUNE_INTERVAL_SECONDS = 60.0
DEFAULT_CHECKPOINT_IDLE_SECONDS = 5.0
# Retry-After on 429/503 pauses the endpoint at most this long.
DEFAULT_RETRY_AFTER_MAX_SECONDS = 3600.0
DEFAULT_BREAKER_FAILURE_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN_SECONDS = 30.0
DEFAULT_BREAKER_COOLDOWN_MULTIPLIER = 2.0
DEFAULT_BREAKER_MAX_COOLDOWN_SECONDS = 3600.0
DEFAULT_BREAKER_DISABLE_AFTER_SECONDS = 5 * 24 * 3600.0
# Upper bounds of the delays: each must still be a date (the daemon logs and stores them).
MAX_RETRY_DELAY_SECONDS = 30 * 24 * 3600.0
MAX_RETRY_AGE_SECONDS = 365 * 24 * 3600.0
MAX_BREAKER_COOLDOWN_SECONDS = 7 * 24 * 3600.0
MAX_BREAKER_DISABLE_AFTER_SECONDS = 365 * 24 * 3600.0

ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    path: Path = Field(
        default=Path(DEFAULT_DATABASE_PATH),
        description="SQLite database file shared with the application (when url is '').",
    )
    busy_timeout_seconds: float = Field(default=DEFAULT_BUSY_TIMEOUT_SECONDS, gt=0, le=600)
    url: str = Field(
        default="",
        description="'' = the SQLite file at path; 'postgresql://user@host:port/db' = PostgreSQL "
        "(several webhookd replicas may share it). Never logged with its password.",
    )
    password_file: Path | None = Field(
        default=None,
        description="PostgreSQL: a file holding the password, e.g. '%d/pg-password' (systemd "
        "LoadCredential=). Else the URL's password, PGPASSWORD or ~/.pgpass.",
    )
    pool_size: int = Field(
        default=DEFAULT_PG_POOL_SIZE, ge=2, le=1000, description="PostgreSQL connections at most."
    )
    connect_timeout_seconds: float = Field(default=DEFAULT_PG_CONNECT_TIMEOUT_SECONDS, gt=0, le=600)
    lease_margin_seconds: float = Field(
        default=DEFAULT_PG_LEASE_MARGIN_SECONDS,
        ge=1,
        le=3600,
        description="PostgreSQL: a delivery's lease lasts delivery.timeout_seconds plus this; "
        "a killed replica's deliveries are sent again by the others after that long.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # Never echo the value: it may hold a password.
        if value == "":
            return value
        scheme, sep, _ = value.partition("://")
        if not sep or scheme not in ("postgresql", "postgres"):
            raise ValueError(
                "must be '' (SQLite at database.path) or a 'postgresql://user@host:port/dbname' "
                "URL ('postgres://' works too)"
            )
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises on a port that is not a number
        except ValueError:
            raise ValueError("is not a valid postgresql:// URL (check the port)") from None
        return value

    @field_validator("password_file", mode="before")
    @classmethod
    def _check_password_file(cls, value: object) -> object:
        if value is None:
            return None
        text = str(value)
        resolved = resolve_secret_path(text, Path.cwd())
        if not text.startswith(CREDENTIAL_PREFIXES) and not Path(text).expanduser().is_absolute():
            raise ValueError("must be an absolute path or '%d/NAME' (a systemd credential)")
        read_secret_file(Path(resolved))  # fails now, with the reason, not at connect time
        return resolved

    @property
    def is_postgres(self) -> bool:
        return self.url != ""

    def postgres_password(self) -> str | None:
        """The password from password_file (None: the URL's, PGPASSWORD or ~/.pgpass)."""
        return None if self.password_file is None else read_secret_file(self.password_file)


class HttpSettings(_Section):
    listen: str = Field(
        default=DEFAULT_LISTEN,
        description="host:port for /healthz, /readyz and /metrics; '' disables the port.",
    )
    ready_max_lag_seconds: float = Field(
        default=DEFAULT_READY_MAX_LAG_SECONDS,
        gt=0,
        description="/readyz fails when the oldest unprocessed outbox row is older than this.",
    )
    max_endpoint_labels: int = Field(
        default=DEFAULT_MAX_ENDPOINT_LABELS,
        ge=1,
        le=100_000,
        description="Endpoints beyond this many share the metrics label '_other'.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value == "":
            return value
        parse_listen(value)
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError with a clear message."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("listen must look like '127.0.0.1:9180' or '[::1]:9180'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, int(port_text)


class DeliverySettings(_Section):
    connect_timeout_seconds: float = Field(default=DEFAULT_CONNECT_TIMEOUT_SECONDS, gt=0, le=300)
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS, gt=0, le=600, description="Total time for one attempt."
    )
    max_inflight: int = Field(
        default=DEFAULT_MAX_INFLIGHT, ge=1, le=10_000, description="Global in-flight cap."
    )
    max_concurrency_per_endpoint: int = Field(
        default=DEFAULT_MAX_CONCURRENCY_PER_ENDPOINT, ge=1, le=1000
    )
    response_excerpt_bytes: int = Field(default=DEFAULT_RESPONSE_EXCERPT_BYTES, ge=0, le=65536)
    allow_http: bool = Field(
        default=False, description="Accept plain http:// endpoint URLs (https only otherwise)."
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Let deliveries connect to loopback, private (RFC 1918, fc00::/7) and CGNAT "
        "addresses. Link-local ones (the cloud metadata service) stay blocked unless listed in "
        "allowed_networks.",
    )
    allowed_networks: tuple[str, ...] = Field(
        default=(),
        description="CIDRs deliveries may connect to although they are not public "
        "(SSRF protection allows public addresses only), e.g. ['10.20.0.0/16'].",
    )
    ca_bundle: Path | None = Field(
        default=None,
        description="PEM file of the CAs to trust for https:// endpoints instead of the "
        "system's; an endpoint's own ca_bundle wins.",
    )
    header_prefix: str = Field(default=DEFAULT_HEADER_PREFIX, pattern=r"^[A-Za-z0-9-]{1,64}$")
    sender_processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Child processes that make the HTTP requests, beside the daemon (0: the "
        "daemon makes them itself). A request costs about as much CPU as the rest of a "
        "delivery's work; with spare cores and many requests at once, 2 let one daemon send "
        "1.3-1.5x as fast on the 2-core benchmark machine. Takes effect at restart.",
    )
    retry_after_max_seconds: float = Field(
        default=DEFAULT_RETRY_AFTER_MAX_SECONDS,
        ge=0,
        le=7 * 24 * 3600,
        description="A Retry-After on 429/503 pauses the whole endpoint, but at most this long "
        "(never less than the retry schedule); 0 ignores Retry-After.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems, networks = [], []
        for text in value:
            try:
                networks.append(str(ipaddress.ip_network(text.strip())))
            except ValueError:
                try:
                    fixed = ipaddress.ip_network(text.strip(), strict=False)
                except ValueError:
                    problems.append(f"{text!r} is not a CIDR such as '10.0.0.0/8' or 'fd00::/8'")
                else:
                    problems.append(f"{text!r} has host bits set; did you mean '{fixed}'?")
        if problems:
            raise ValueError("; ".join(problems))
        return tuple(networks)

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        return _checked_ca_bundle(value)


class RetrySettings(_Section):
    initial_delay_seconds: float = Field(
        default=DEFAULT_INITIAL_DELAY_SECONDS, ge=0, le=MAX_RETRY_DELAY_SECONDS
    )
    multiplier: float = Field(default=DEFAULT_MULTIPLIER, ge=1, le=100)
    max_delay_seconds: float = Field(
        default=DEFAULT_MAX_DELAY_SECONDS, ge=0, le=MAX_RETRY_DELAY_SECONDS
    )
    jitter: float = Field(
        default=DEFAULT_JITTER, ge=0, le=1, description="Each delay varies by ± this fraction."
    )
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=1000)
    max_age_seconds: float = Field(default=DEFAULT_MAX_AGE_SECONDS, gt=0, le=MAX_RETRY_AGE_SECONDS)


class BreakerSettings(_Section):
    """The per-endpoint circuit breaker: an endpoint that keeps failing is backed off as a
    whole (its deliveries wait, one probe at a time tests it), and disabled in the end."""

    failure_threshold: int = Field(
        default=DEFAULT_BREAKER_FAILURE_THRESHOLD,
        ge=1,
        le=10_000,
        description="Consecutive failed attempts that back the endpoint off as a whole.",
    )
    cooldown_seconds: float = Field(
        default=DEFAULT_BREAKER_COOLDOWN_SECONDS,
        gt=0,
        le=MAX_BREAKER_COOLDOWN_SECONDS,
        description="Wait before the first probe; each failed probe multiplies it.",
    )
    cooldown_multiplier: float = Field(default=DEFAULT_BREAKER_COOLDOWN_MULTIPLIER, ge=1, le=100)
    max_cooldown_seconds: float = Field(
        default=DEFAULT_BREAKER_MAX_COOLDOWN_SECONDS,
        gt=0,
        le=MAX_BREAKER_COOLDOWN_SECONDS,
        description="The longest wait between two probes.",
    )
    disable_after_seconds: float = Field(
        default=DEFAULT_BREAKER_DISABLE_AFTER_SECONDS,
        ge=0,
        le=MAX_BREAKER_DISABLE_AFTER_SECONDS,
        description="An endpoint failing continuously this long is disabled (its deliveries "
        "are kept); 0 never disables it.",
    )


class OutboxSettings(_Section):
    poll_interval_seconds: float = Field(
        default=DEFAULT_POLL_INTERVAL_SECONDS,
        gt=0,
        le=60,
        description="How often PRAGMA data_version is checked for new commits.",
    )
    batch_size: int = Field(default=DEFAULT_FANOUT_BATCH_SIZE, ge=1, le=10_000)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=64, le=16 * 1024 * 1024)


class DaemonSettings(_Section):
    grace_seconds: float = Field(
        default=DEFAULT_GRACE_SECONDS,
        ge=0,
        le=3600,
        description="On SIGTERM, how long in-flight requests may take to finish.",
    )


class RetentionSettings(_Section):
    """How long finished work is kept, and how pruning and WAL checkpoints run. For the three
    retention periods, 0 keeps those rows forever."""

    succeeded_seconds: float = Field(
        default=DEFAULT_RETENTION_SUCCEEDED_SECONDS,
        ge=0,
        description="Succeeded deliveries and their attempts are deleted this long after they "
        "succeeded; 0 keeps them forever.",
    )
    failed_seconds: float = Field(
        default=DEFAULT_RETENTION_FAILED_SECONDS,
        ge=0,
        description="Failed deliveries (dead letters) and their attempts are deleted this long "
        "after they failed; 0 keeps them forever.",
    )
    outbox_seconds: float = Field(
        default=DEFAULT_RETENTION_OUTBOX_SECONDS,
        ge=0,
        description="Outbox rows, events without deliveries and quarantine rows are deleted "
        "this long after they were fanned out; 0 keeps them forever.",
    )
    batch_size: int = Field(
        default=DEFAULT_PRUNE_BATCH_SIZE,
        ge=1,
        le=10_000,
        description="Rows deleted per write transaction (deliveries take their attempts along).",
    )
    interval_seconds: float = Field(
        default=DEFAULT_PRUNE_INTERVAL_SECONDS,
        gt=0,
        le=24 * 3600,
        description="How often to prune.",
    )
    checkpoint_idle_seconds: float = Field(
        default=DEFAULT_CHECKPOINT_IDLE_SECONDS,
        ge=0,
        le=24 * 3600,
        description="Checkpoint and truncate the WAL once nothing was written for this long; "
        "0 leaves the WAL to SQLite's automatic checkpoints.",
    )


class EventsSettings(_Section):
    """What fan-out does with the event catalogue (``webhookd events list``)."""

    schema_mismatch: SchemaMismatchAction = Field(
        default="warn",
        description="A row whose data does not match its catalogue entry: 'deliver' it, "
        "'warn' (deliver, log event_schema_mismatch and count it) or 'quarantine' it.",
    )
    allow_unknown_types: bool = Field(
        default=True,
        description="Deliver event types outside the catalogue; false quarantines them.",
    )

    def policy(self) -> CataloguePolicy:
        return CataloguePolicy(
            schema_mismatch=self.schema_mismatch, allow_unknown_types=self.allow_unknown_types
        )


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "logfmt"] = "json"


class EndpointSettings(_Section):
    """A static endpoint from ``[[endpoints]]``."""

    id: str = Field(pattern=ENDPOINT_ID_PATTERN)
    url: str
    secret: SecretStr | None = None
    secret_file: Path | None = None
    events: tuple[str, ...] = ("*",)
    tenant: str | None = Field(default=None, min_length=1, max_length=200)
    max_concurrency: int | None = Field(default=None, ge=1, le=1000)
    enabled: bool = True
    description: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    signature_schemes: tuple[Literal["seed", "standard"], ...] = Field(
        default=("seed",),
        min_length=1,
        description="Signature headers to send: the seed's, Standard Webhooks', or both.",
    )
    previous_secret: SecretStr | None = Field(
        default=None, description="A rotated-out secret that still signs until it expires."
    )
    previous_secret_file: Path | None = None
    previous_secret_expires_at: AwareDatetime | None = None
    ca_bundle: Path | None = Field(
        default=None,
        description="PEM file of the CAs to trust for this endpoint instead of the system's.",
    )

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        return _checked_ca_bundle(value)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from webhookd.endpoints import url_problem

        problem = url_problem(value, allow_http=True)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("secret must not be empty")
        return value

    @field_validator("signature_schemes")
    @classmethod
    def _check_schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("signature_schemes lists a scheme twice")
        return value

    @field_validator("secret_file", "previous_secret_file")
    @classmethod
    def _check_secret_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_secret_file(value)
        return value

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("events must list at least one pattern, e.g. ['*']")
        problems = [p for p in (pattern_problem(v) for v in value) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        from webhookd.endpoints import header_problem

        problems = [p for p in (header_problem(k, v) for k, v in value.items()) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def secret_value(self) -> str:
        """The signing secret, from ``secret`` or read from ``secret_file``."""
        if self.secret is not None:
            return self.secret.get_secret_value()
        assert self.secret_file is not None  # enforced by check_settings
        return read_secret_file(self.secret_file)

    def previous_secret_value(self) -> str | None:
        if self.previous_secret is not None:
            return self.previous_secret.get_secret_value()
        if self.previous_secret_file is not None:
            return read_secret_file(self.previous_secret_file)
        return None


def _checked_ca_bundle(value: Path | None) -> Path | None:
    if value is not None:
        from webhookd.endpoints import ca_bundle_problem

        problem = ca_bundle_problem(str(value))
        if problem:
            raise ValueError(problem)
    return value


def read_secret_file(path: Path) -> str:
    if str(path).startswith(CREDENTIAL_PREFIXES):
        raise ValueError(
            f"secret file {str(path)!r} names a systemd credential, but "
            f"${CREDENTIALS_DIRECTORY_ENV} is not set: run under systemd with LoadCredential=, "
            "or set it to the directory"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {str(path)!r} is not UTF-8 text") from None
    secret = text.strip()
    if not secret:
        raise ValueError(f"secret file {str(path)!r} is empty")
    return secret


class Settings(BaseSettings):
    """All of webhookd's configuration. Built once by the CLI and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="WEBHOOKD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    delivery: DeliverySettings = DeliverySettings()
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    outbox: OutboxSettings = OutboxSettings()
    daemon: DaemonSettings = DaemonSettings()
    retention: RetentionSettings = RetentionSettings()
    events: EventsSettings = EventsSettings()
    log: LogSettings = LogSettings()
    endpoints: tuple[EndpointSettings, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the environment must win over them.
        return (env_settings, init_settings)


def load_settings(path: Path | str | None = None) -> Settings:
    """Read the TOML file at ``path``, apply ``WEBHOOKD_*`` from the environment, validate.

    Raises :class:`ConfigError` listing every problem with its key path.
    """
    data: dict[str, Any] = {}
    source = "defaults and environment"
    base_dir = Path.cwd()
    if path is not None:
        config_path = Path(path)
        source = str(config_path)
        data = _read_toml(config_path)
        base_dir = config_path.resolve().parent
        _resolve_relative_paths(data, base_dir)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        # Also report the problems across keys, as far as the raw file shows them, so that the
        # user gets every problem in one go; a key that already has an error is not repeated.
        problems = format_validation_errors(exc)
        failed = {_format_loc(e["loc"]) for e in exc.errors()}
        for loc, message in cross_key_problems(data):
            # A key with an error of its own is not reported twice; a problem of a whole
            # endpoint ("endpoints[0]: ...") is reported even when one of its keys has an error.
            nested = any(f.startswith((loc + ".", loc + "[")) for f in failed)
            if loc not in failed and (loc.endswith("]") or not nested):
                problems.append(f"{loc}: {message}")
        raise ConfigError(problems, source) from None
    problems = check_settings(settings)
    if problems:
        raise ConfigError(problems, source)
    if not settings.database.path.is_absolute():
        database = settings.database.model_copy(update={"path": base_dir / settings.database.path})
        settings = settings.model_copy(update={"database": database})
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"config file {str(path)!r} does not exist"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror or exc}"], str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None


def _resolve_relative_paths(data: dict[str, Any], base_dir: Path) -> None:
    database = data.get("database")
    if isinstance(database, dict) and isinstance(database.get("path"), str):
        database["path"] = str(base_dir / Path(database["path"]).expanduser())
    delivery = data.get("delivery")
    if isinstance(delivery, dict) and isinstance(delivery.get("ca_bundle"), str):
        delivery["ca_bundle"] = str(base_dir / Path(delivery["ca_bundle"]).expanduser())
    endpoints = data.get("endpoints")
    if isinstance(endpoints, list):
        for item in endpoints:
            for key in ("secret_file", "previous_secret_file"):
                if isinstance(item, dict) and isinstance(item.get(key), str):
                    item[key] = resolve_secret_path(item[key], base_dir)
            if isinstance(item, dict) and isinstance(item.get("ca_bundle"), str):
                item["ca_bundle"] = str(base_dir / Path(item["ca_bundle"]).expanduser())


def resolve_secret_path(value: str, base_dir: Path) -> str:
    """A secret file's path: ``%d/NAME`` or ``$CREDENTIALS_DIRECTORY/NAME`` is NAME in systemd's
    credentials directory (``LoadCredential=``); other relative paths are against ``base_dir``.
    Without ``$CREDENTIALS_DIRECTORY`` the value is kept, and reading it says why it fails."""
    for prefix in CREDENTIAL_PREFIXES:
        if value.startswith(prefix):
            directory = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
            return str(Path(directory) / value[len(prefix) :]) if directory else value
    return str(base_dir / Path(value).expanduser())


# Values of these keys are never echoed in errors: secrets, and URLs (they may hold credentials).
_UNECHOED_KEYS = frozenset({"secret", "previous_secret", "url", "headers"})


def format_validation_errors(exc: ValidationError) -> list[str]:
    """One ``key.path: message`` line per problem; secret values are never echoed."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config.example.toml)"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif not _UNECHOED_KEYS.intersection(str(p) for p in err["loc"]):
            value = err.get("input")
            if isinstance(value, str | int | float | bool) and not isinstance(value, dict):
                shown = repr(value)
                message += f" (got {shown[:80]})"
        lines.append(f"{loc}: {message}")
    return lines


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def check_settings(settings: Settings) -> list[str]:
    """Problems that involve more than one key, as ``key.path: message`` lines."""
    return [f"{loc}: {message}" for loc, message in cross_key_problems(settings.model_dump())]


def cross_key_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key path, message) for rules that span keys. Works on validated settings dumped to a
    dict and on a raw, possibly invalid, file: values of the wrong type are skipped."""
    from webhookd.endpoints import reserved_header_problem, url_problem

    delivery = data.get("delivery")
    allow_http = isinstance(delivery, Mapping) and delivery.get("allow_http") is True
    prefix = delivery.get("header_prefix") if isinstance(delivery, Mapping) else None
    if not isinstance(prefix, str):
        prefix = DEFAULT_HEADER_PREFIX
    endpoints = data.get("endpoints")
    if not isinstance(endpoints, list | tuple):
        return []
    problems = []
    seen: set[str] = set()
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, Mapping):
            continue
        where = f"endpoints[{i}]"
        ep_id = ep.get("id")
        if isinstance(ep_id, str):
            if ep_id in seen:
                problems.append((f"{where}.id", f"duplicate endpoint id {ep_id!r}"))
            seen.add(ep_id)
        if (ep.get("secret") is None) == (ep.get("secret_file") is None):
            problems.append((where, "set exactly one of 'secret' or 'secret_file'"))
        problems += [(where, p) for p in _secret_problems(ep)]
        url = ep.get("url")
        if isinstance(url, str):
            problem = url_problem(url, allow_http=allow_http)
            if problem:
                problems.append((f"{where}.url", problem))
        headers = ep.get("headers")
        if isinstance(headers, Mapping):
            for name in headers:
                problem = reserved_header_problem(str(name), prefix)
                if problem:
                    problems.append((f"{where}.headers", problem))
    return problems


def _secret_problems(ep: Mapping[str, Any]) -> list[str]:
    """Rotation keys go together, and the standard scheme needs whsec_ secrets."""
    from webhookd.signing import standard_key

    problems = []
    has_previous = (
        ep.get("previous_secret") is not None or ep.get("previous_secret_file") is not None
    )
    if ep.get("previous_secret") is not None and ep.get("previous_secret_file") is not None:
        problems.append("set at most one of 'previous_secret' or 'previous_secret_file'")
    if has_previous != (ep.get("previous_secret_expires_at") is not None):
        problems.append(
            "'previous_secret' (or 'previous_secret_file') and 'previous_secret_expires_at' "
            "go together"
        )
    schemes = ep.get("signature_schemes")
    if isinstance(schemes, list | tuple) and "standard" in schemes:
        # Only the current secret must be a whsec_ key: a previous secret from before the
        # endpoint used Standard Webhooks keeps signing the seed header only.
        for key in ("secret", "secret_file"):
            value = ep.get(key)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif key.endswith("_file"):
                if not isinstance(value, str | Path):
                    continue  # a wrong type is reported by the field's own check
                try:
                    text = read_secret_file(Path(value))
                except ValueError:
                    continue  # an unreadable file is reported by the field's own check
            else:
                text = str(value)
            try:
                standard_key(text)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
    return problems
