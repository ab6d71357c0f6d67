"""Typed settings for every process (server, worker, CLI).

Why one class: the server and the workers must agree on the database, the Redis queue name and
the timing knobs, and an operator should find every knob in one table (README "Settings").
Values come from ``PROMO_*`` environment variables, then from an optional TOML file named by
``PROMO_CONFIG_FILE`` (environment wins), then from the defaults below.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
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


class Settings(BaseSettings):
    """Every setting of the service; see the README's settings table for the same list."""

    model_config = SettingsConfigDict(env_prefix="PROMO_", extra="ignore", frozen=True)

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
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)

    # PostgreSQL.
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_command_timeout_seconds: float = Field(default=30.0, gt=0)
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
    job_retry_base_seconds: float = Field(default=1.0, gt=0)
    job_retry_max_seconds: float = Field(default=300.0, gt=0)
    sweeper_interval_seconds: int = Field(default=30, ge=1, le=3600)
    job_lease_seconds: int = Field(default=300, ge=5)
    # Dynamic bonuses: requests pile up this long and are computed together (seed 004).
    bonus_batch_window_seconds: int = Field(default=300, ge=1, le=86400)

    # Campaigns.
    clearance_lead_seconds: float = Field(default=1800.0, ge=0)

    # Webhooks.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # 30 attempts, the waits doubling from PROMO_JOB_RETRY_BASE_SECONDS up to an hour: the
    # retries span 9-18 hours, inside the 24-hour deadline (12 attempts capped at 5 minutes,
    # the old defaults, gave up after 9-19 minutes: a listener down for a deploy lost events).
    webhook_max_attempts: int = Field(default=30, ge=1, le=100)
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_deadline_seconds: int = Field(default=86400, ge=1)
    webhook_secret_grace_seconds: int = Field(default=86400, ge=0)
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
    webhook_event_retention_days: int = Field(default=30, ge=0)
    webhook_delivery_retention_days: int = Field(default=30, ge=0)
    webhook_attempt_retention_days: int = Field(default=30, ge=0)
    outbox_job_retention_days: int = Field(default=7, ge=0)
    # The idempotency code has no expiry of its own (a key answered retries forever); 30 days
    # is far beyond any client's retry window. A retry with an older request id runs again.
    idempotency_key_retention_days: int = Field(default=30, ge=0)
    # Dynamic-bonus results, finished requests and batch records: the vendor keeps the approval
    # queue's history 30 days. The bonus ledger (what was issued) is never purged.
    bonus_result_retention_days: int = Field(default=30, ge=0)

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
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and config file), with explicit overrides on top."""
    return Settings(**overrides)
