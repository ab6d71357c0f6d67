"""Typed settings for every process (server, worker, CLI).

Why one class: the server and the workers must agree on the database, the Redis queue name and
the timing knobs, and an operator should find every knob in one table (README "Settings").
Values come from ``PROMO_*`` environment variables, then from an optional TOML file named by
``PROMO_CONFIG_FILE`` (environment wins), then from the defaults below.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from config.tls_files import check_server_files
from core.secret_box import SecretBox, parse_keys

ROLES = frozenset({"admin", "runtime", "listener"})
DEFAULT_UP_METRICS_PORT = 9464  # `promo up`'s metrics endpoint when PROMO_METRICS_PORT is unset
MIN_API_KEY_LENGTH = 16


class ApiKeyConfig(BaseModel):
    """One API key: who it is (name, for logs), what it may do (roles), and the secret.

    Give either the plain ``key`` or its ``key_sha256`` (hex), so a config file need not hold the
    secret itself. Only the hash is kept in memory after loading. Error messages name the
    entry (its name is no secret: it appears in logs) and never the key or its hash.
    """

    name: str = Field(min_length=1, max_length=100)
    roles: list[str] = Field(min_length=1)
    key: SecretStr | None = None
    key_sha256: str | None = None

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; known roles are {sorted(ROLES)}")
        return roles

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of 'key' or 'key_sha256'")
        if self.key is not None:
            if self.key.get_secret_value() != self.key.get_secret_value().strip():
                # A caller's key is stripped when presented (server/auth.py): this one could
                # never match.
                raise ValueError(f"API key {self.name!r}: a key must not start or end with "
                                 "whitespace")
            if len(self.key.get_secret_value()) < MIN_API_KEY_LENGTH:
                raise ValueError(f"API key {self.name!r}: a key must be at least "
                                 f"{MIN_API_KEY_LENGTH} characters")
            self.key_sha256 = hash_api_key(self.key.get_secret_value())
            self.key = None
        assert self.key_sha256 is not None
        self.key_sha256 = self.key_sha256.lower()
        if len(self.key_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.key_sha256):
            # Not hex: a digest no key can ever have, so a key that could never authenticate.
            raise ValueError(f"API key {self.name!r}: key_sha256 must be 64 hex characters")
        return self


class SecretKeysSettingError(Exception):
    """PROMO_SECRET_ENCRYPTION_KEYS is malformed. Deliberately not a ValueError: pydantic would
    wrap that in a ValidationError that prints the raw input, i.e. the keys themselves; this
    passes through Settings() as is, naming only the position of the bad key."""


def hash_api_key(key: str) -> str:
    """The stored form of an API key (keys are long random strings, so a plain SHA-256 suffices)."""
    return hashlib.sha256(key.encode()).hexdigest()


# Upper bounds: a duration past them is a typo (or a unit mistake), and would overflow a date.
MAX_DAYS_SECONDS = 30 * 86400  # clearance lead, webhook deadline, secret grace
MAX_RETENTION_DAYS = 3650


class Settings(BaseSettings):
    """Every setting of the service; see the README's settings table for the same list."""

    # No inf or nan: an infinite duration passes every lower bound and overflows a timedelta later.
    model_config = SettingsConfigDict(env_prefix="PROMO_", extra="ignore", frozen=True,
                                      allow_inf_nan=False)

    # Services. Empty means "none configured": `promo up` then starts embedded ones.
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path(".promo-data")
    embedded_pg_user: str | None = None

    # gRPC server.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=3600)
    # Admission control (server/admission.py): calls beyond this many in flight in one server
    # process are refused at once with RESOURCE_EXHAUSTED SERVER_OVERLOADED instead of queued.
    max_calls_in_flight: int = Field(default=500, ge=1, le=100_000)
    # Decoded by _api_keys_json, not by pydantic-settings: its JSON error would stop the load
    # before any other setting is checked (and hide every other bad one).
    api_keys: Annotated[list[ApiKeyConfig], NoDecode] = Field(default_factory=list)

    # PostgreSQL.
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_command_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)
    migrate_on_start: bool = True
    # GetReward group commit (server/grant_batcher.py): grants of one promotion arriving while
    # earlier ones are in the database go together, at most this many per transaction (1: each
    # grant alone), with at most grant_batches_in_flight such transactions per promotion.
    grant_batch_max: int = Field(default=32, ge=1, le=60)
    grant_batches_in_flight: int = Field(default=2, ge=1, le=16)

    # Workers.
    queue_name: str = "promo:queue"
    worker_max_jobs: int = Field(default=20, ge=1)
    job_max_tries: int = Field(default=8, ge=1)
    job_retry_base_seconds: float = Field(default=1.0, gt=0, le=3600)
    job_retry_max_seconds: float = Field(default=300.0, gt=0, le=86400)
    sweeper_interval_seconds: int = Field(default=30, ge=1, le=3600)
    job_lease_seconds: int = Field(default=300, ge=5, le=86400)
    # Dynamic bonuses: requests pile up this long and are computed together (seed 004).
    bonus_batch_window_seconds: int = Field(default=300, ge=1, le=86400)

    # Campaigns.
    clearance_lead_seconds: float = Field(default=1800.0, ge=0, le=MAX_DAYS_SECONDS)

    # Webhooks.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # 30 attempts, the waits doubling from PROMO_JOB_RETRY_BASE_SECONDS up to an hour: the
    # retries span 9-18 hours, inside the 24-hour deadline (12 attempts capped at 5 minutes,
    # the old defaults, gave up after 9-19 minutes: a listener down for a deploy lost events).
    webhook_max_attempts: int = Field(default=30, ge=1, le=100)
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0, le=86400)
    webhook_deadline_seconds: int = Field(default=86400, ge=1, le=MAX_DAYS_SECONDS)
    webhook_secret_grace_seconds: int = Field(default=86400, ge=0, le=MAX_DAYS_SECONDS)
    # One worker job claims up to this many due deliveries and sends them together.
    webhook_batch_size: int = Field(default=100, ge=1, le=1000)
    # Sends (HTTP POSTs and e-mails) one worker process has in flight at once.
    webhook_concurrency: int = Field(default=32, ge=1, le=1000)
    # Listener secrets at rest (core/secret_box.py): comma-separated base64 AES-256 keys, the
    # first seals, all open. Unset: secrets are stored in clear (one warning at startup).
    secret_encryption_keys: SecretStr | None = None
    # E-mail listeners: an SMTP relay. No host: the e-mail channel is off.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = True
    smtp_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    smtp_from: str | None = Field(default=None, validate_default=True)

    # Retention (storage/retention.py, run hourly by the workers): days a row is kept once it
    # is finished; 0 keeps it forever. Live rows (a pending delivery, an unfinished job) stay.
    webhook_event_retention_days: int = Field(default=30, ge=0, le=MAX_RETENTION_DAYS)
    webhook_delivery_retention_days: int = Field(default=30, ge=0, le=MAX_RETENTION_DAYS)
    webhook_attempt_retention_days: int = Field(default=30, ge=0, le=MAX_RETENTION_DAYS)
    outbox_job_retention_days: int = Field(default=7, ge=0, le=MAX_RETENTION_DAYS)
    # The idempotency code has no expiry of its own (a key answered retries forever); 30 days
    # is far beyond any client's retry window. A retry with an older request id runs again.
    idempotency_key_retention_days: int = Field(default=30, ge=0, le=MAX_RETENTION_DAYS)
    # Dynamic-bonus results, finished requests and batch records: the vendor keeps the approval
    # queue's history 30 days. The bonus ledger (what was issued) is never purged.
    bonus_result_retention_days: int = Field(default=30, ge=0, le=MAX_RETENTION_DAYS)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_json(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("is not valid JSON") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _distinct_keys(cls, keys: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
        seen: dict[str | None, str] = {}
        for entry in keys:
            if entry.key_sha256 in seen:
                # Only one entry could ever match (the server keys them by hash): the other's
                # roles would be silently lost.
                raise ValueError(f"API keys {seen[entry.key_sha256]!r} and {entry.name!r} are "
                                 "the same key; give each entry its own key")
            seen[entry.key_sha256] = entry.name
        return keys

    @field_validator("database_url", "redis_url")
    @classmethod
    def _service_url(cls, value: str | None, info: Any) -> str | None:
        if value is None or not value.strip():
            return None
        _check_url(value, *_URL_FORMS[info.field_name])
        return value

    @field_validator("smtp_host", "smtp_username", "secret_encryption_keys", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("secret_encryption_keys")
    @classmethod
    def _keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                parse_keys(value.get_secret_value())
            except ValueError as exc:
                raise SecretKeysSettingError(f"PROMO_SECRET_ENCRYPTION_KEYS: {exc}") from None
        return value

    def secret_box(self) -> SecretBox:
        """The box that seals and opens listener secrets (no keys: secrets stay in clear)."""
        keys = self.secret_encryption_keys
        return SecretBox.from_setting(keys.get_secret_value() if keys else None)

    @field_validator("smtp_from")
    @classmethod
    def _smtp_complete(cls, value: str | None, info: Any) -> str | None:
        value = value.strip() if value and value.strip() else None
        if info.data.get("smtp_host") is None:
            given = [name for name, set_ in (
                ("PROMO_SMTP_USERNAME", info.data.get("smtp_username") is not None),
                ("PROMO_SMTP_PASSWORD", info.data.get("smtp_password") is not None),
                ("PROMO_SMTP_FROM", value is not None)) if set_]
            if given:
                # Most likely a misspelt or forgotten host: the e-mail channel would be off.
                raise ValueError(f"{' and '.join(given)} set without PROMO_SMTP_HOST: set the "
                                 "host of the SMTP relay too (or unset them)")
            return value
        if value is None:
            raise ValueError("PROMO_SMTP_HOST is set: set PROMO_SMTP_FROM too (the sender "
                             "address of alert e-mails, e.g. promo-alerts@example.com)")
        address = value.rpartition("<")[2].removesuffix(">").strip()  # "Name <a@b>" or "a@b"
        if "@" not in address or " " in address or any(ch in value for ch in "\r\n"):
            raise ValueError("PROMO_SMTP_FROM is not an e-mail address (expected "
                             "name@domain or 'Name <name@domain>')")
        if (info.data.get("smtp_username") is None) != (info.data.get("smtp_password") is None):
            raise ValueError("set both PROMO_SMTP_USERNAME and PROMO_SMTP_PASSWORD, or neither")
        return value

    # Prometheus metrics over HTTP (GET /metrics). Unset or 0: off; `promo up` uses
    # DEFAULT_UP_METRICS_PORT when unset. `promo worker` serves on worker_metrics_port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        """Checks across settings. Their messages name settings and files, never a value:
        pydantic's own rendering of this error would carry the whole raw input (API keys,
        SMTP password), which is why the CLI prints only ``loc: msg`` (cli/settings_loader)."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both PROMO_TLS_CERT_FILE and PROMO_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("PROMO_TLS_CLIENT_CA_FILE needs PROMO_TLS_CERT_FILE and KEY_FILE")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("PROMO_DB_POOL_MIN_SIZE must not exceed PROMO_DB_POOL_MAX_SIZE")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            check_server_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PROMO_CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise ValueError(f"PROMO_CONFIG_FILE={config_file} is not a readable file")
            try:
                toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"PROMO_CONFIG_FILE={config_file} is not valid TOML: "
                                 f"{exc}") from None
            unknown = sorted(set(toml.toml_data) - set(settings_cls.model_fields))
            if unknown:  # a misspelt name would silently keep its default
                raise ValueError(f"PROMO_CONFIG_FILE={config_file}: unknown setting(s) "
                                 f"{unknown}; names are the PROMO_ variables' in lower case "
                                 "without the prefix (README \"Settings\")")
            sources.append(toml)
        return tuple(sources)


# Per URL setting: the schemes its client library takes, and an example for the message.
_URL_FORMS: dict[str, tuple[tuple[str, ...], str]] = {
    "database_url": (("postgresql", "postgres"), "postgresql://user:password@host:5432/db"),
    "redis_url": (("redis", "rediss", "unix"), "redis://host:6379/0"),
}


def _check_url(value: str, schemes: tuple[str, ...], example: str) -> None:
    """Refuse a URL the client library could not parse, naming the problem, never the URL
    (it may hold a password)."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(f"is not a URL like {example} (bad port or address)") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"is not a URL like {example} (the scheme must be "
                         f"{' or '.join(s + '://' for s in schemes)})")
    if parts.scheme.lower() != "unix" and not parts.hostname and not parts.path.strip("/") \
            and "host=" not in parts.query:
        raise ValueError(f"is not a URL like {example} (no host)")


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and config file), with explicit overrides on top."""
    return Settings(**overrides)
