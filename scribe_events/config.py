"""Settings: one typed object read from ``SCRIBE_EVENTS_*``, ``.env`` and ``scribe-events.toml``."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./scribe-events.db"
DEFAULT_SECRET_FILE = "./scribe-events.secret"
MIN_SECRET_BYTES = 32


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Settings(BaseSettings):
    """Everything the service can be told. Field names map to ``SCRIBE_EVENTS_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="SCRIBE_EVENTS_",
        env_file=".env",
        extra="ignore",
        toml_file="scribe-events.toml",
    )

    environment: Literal["development", "production"] = "development"
    database_url: str = DEFAULT_DATABASE_URL
    # PostgreSQL schema to use (its search_path); unset: the server's default.
    database_schema: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Run migrations at start-up. Unset: only on SQLite (PostgreSQL: `scribe-events db upgrade`).
    auto_migrate: bool | None = None
    redis_url: str | None = None
    # Prefix of every Redis key and channel (several deployments, or tests, can share one Redis).
    redis_prefix: str = "scribe-events:"

    jwt_secret: str | None = None
    jwt_secret_file: str = DEFAULT_SECRET_FILE
    jwt_public_key: str | None = None
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    ticket_ttl_s: int = 30

    heartbeat_s: float = Field(30.0, gt=0)
    retry_ms: int = Field(3000, ge=0)
    retention_days: int = Field(7, ge=1)
    # Purge earlier than retention_days when the events take more than this (0: no size limit).
    max_store_mb: int = Field(0, ge=0)
    retention_interval_s: float = Field(3600.0, gt=0)
    # Comma-separated AES-256 keys (URL-safe base64); the first encrypts, all decrypt (R7.7).
    encryption_keys: str | None = None
    cors_origins: list[str] = Field(default_factory=list)

    max_event_bytes: int = 64 * 1024
    max_request_bytes: int = 1024 * 1024
    max_batch_events: int = 1000
    # Bytes a connection may have queued in its socket's write buffer before it is cut off as slow.
    max_connection_buffer: int = 256 * 1024
    replay_page: int = 500
    publish_queue: int = 10_000
    publish_batch: int = 1000

    poll_interval_s: int = 30
    reconnect_max_retries: int = 5
    reconnect_initial_delay_ms: int = 1000
    reconnect_max_delay_ms: int = 30_000

    instance_id: str = Field(default_factory=_default_instance)
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = "http://127.0.0.1:8000"
    token: str | None = None
    log_level: str = "info"
    access_log: bool = True
    # Freeze start-up objects out of the garbage collector's view (shorter full collections).
    gc_freeze: bool = True
    # Fault injection for the test suite (e.g. "kill_after_commit"); never set in production.
    faults: list[str] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _refuse_weak_production(self) -> Settings:
        if self.environment == "production" and self.jwt_public_key is None:
            if not self.jwt_secret:
                raise ValueError("production needs SCRIBE_EVENTS_JWT_SECRET (no generated secret)")
            if len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"SCRIBE_EVENTS_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return self

    @property
    def is_default_setup(self) -> bool:
        """True when nothing points the service elsewhere: the embedded defaults are in use."""
        return (
            self.database_url == DEFAULT_DATABASE_URL
            and self.redis_url is None
            and self.jwt_secret is None
            and self.jwt_public_key is None
        )

    def signing_secret(self, create: bool = False) -> str | None:
        """The HS256 secret: configured, or the generated dev secret file (made when ``create``)."""
        if self.jwt_secret:
            return self.jwt_secret
        path = Path(self.jwt_secret_file)
        if path.exists():
            return path.read_text().strip()
        if not create or self.environment == "production":
            return None
        secret = secrets.token_urlsafe(48)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        return secret
