"""Settings: one typed object read from ``SCRIBE_EVENTS_*``, ``.env`` and ``scribe-events.toml``."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
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
    # Connections of an instance's Redis command pool (the broker's subscription has its own).
    redis_max_connections: int = Field(50, ge=2, le=10_000)

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
    # Bytes in a connection's socket write buffer past which further deliveries wait in the
    # connection's own queue (where system.error jumps the line and a newer progress update of a
    # task replaces an older one); past max_connection_queue bytes there, the client is cut off
    # as slow (it resumes with Last-Event-ID).
    max_connection_buffer: int = Field(256 * 1024, ge=1024)
    max_connection_queue: int = Field(1024 * 1024, ge=1024)
    replay_page: int = 500
    publish_queue: int = 10_000
    # Bytes of event data waiting in the publish queue; past it publishers get 503 (retry).
    publish_queue_bytes: int = Field(64 * 1024 * 1024, gt=0)
    publish_batch: int = 1000
    # How deeply event data may nest (objects and lists).
    max_data_depth: int = Field(32, ge=1, le=200)
    # Globs in one ``types=`` filter.
    max_type_globs: int = Field(50, ge=1, le=500)

    # Hostile or careless clients. A request's head (request line and headers) may hold at most
    # max_header_bytes (431 past it) and must arrive within header_timeout_s (408); a body must
    # arrive within body_timeout_s. Past max_connections open sockets, new ones get 503.
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(30_000, ge=1)
    # Open streams on this instance per user and per address (429 past them; admins exempt). The
    # per-address default lets a whole office behind one NAT in.
    max_streams_per_user: int = Field(32, ge=1)
    max_streams_per_ip: int = Field(15_000, ge=1)
    # Tickets a user may hold unredeemed at once (429 past it).
    max_tickets_per_user: int = Field(100, ge=1)
    # Failed-delivery records kept per user (older ones are not replaced; new ones are dropped).
    max_failed_per_user: int = Field(1000, ge=1)
    # End a stream when its token expires (the client resumes with a fresh ticket, missing nothing).
    end_stream_at_token_expiry: bool = True

    # Rate limits (R8.5), in the limits library's notation ("60/minute", "5 per second"; "none"):
    # per user on opening streams, minting tickets, polling and publishing (a publisher is a trusted
    # service: its default is far above the throughput targets), per address on all but publishing
    # (high enough for a whole office behind one NAT), and one for admins. Counted in Redis when
    # configured (they hold across instances). Past one: 429 rate_limited with Retry-After.
    rate_limits: bool = True
    rate_limit_streams_per_user: str = "120/minute"
    rate_limit_tickets_per_user: str = "240/minute"
    rate_limit_polling_per_user: str = "240/minute"
    rate_limit_publish_per_user: str = "1200000/minute"
    rate_limit_streams_per_ip: str = "30000/minute"
    rate_limit_tickets_per_ip: str = "60000/minute"
    rate_limit_polling_per_ip: str = "60000/minute"
    rate_limit_publish_per_ip: str = "1200000/minute"
    rate_limit_admin: str = "12000/minute"

    # Automatic bans: the auto_ban_failures-th failed authentication (a forged, malformed or badly
    # signed token; not an expired token or a spent ticket, which honest clients send too) from one
    # address within auto_ban_window_s bans that address for auto_ban_s, on every instance
    # (0: off). Trusted proxies are never banned this way.
    auto_ban_failures: int = Field(6, ge=0)
    auto_ban_window_s: int = Field(60, ge=1)
    auto_ban_s: int = Field(600, ge=1, le=10 * 365 * 86_400)

    # Proxies whose Forwarded / X-Forwarded-For headers are believed (addresses or CIDR blocks, e.g.
    # ["127.0.0.1", "10.0.0.0/8"]); from any other peer those headers are ignored.
    trusted_proxies: list[str] = Field(default_factory=list, max_length=1000)
    # The one header those proxies write (the other is never believed: a client could send it).
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"

    # Adaptive load (R8.6): past adaptive_busy_lag_s of event-loop lag (or with a twentieth of the
    # streams queued) the progress throttle and coalescing windows double and store batches may
    # double; past adaptive_overload_lag_s (or a fifth queued) x5 and x4; back once the load drops.
    adaptive_load: bool = True
    adaptive_busy_lag_s: float = Field(0.1, gt=0)
    adaptive_overload_lag_s: float = Field(0.5, gt=0)

    # Restarts (SIGTERM): every open stream is told to come back after a random delay within
    # drain_window_s (its retry:, and a connection.closing event), then ended; the process exits
    # once its connections are gone, or after drain_deadline_s.
    drain_window_s: float = Field(10.0, ge=0, le=3600)
    drain_deadline_s: float = Field(30.0, ge=1, le=3600)

    # Tasks (R3, R4.6). A task's progress updates reach a client at most once per
    # progress_throttle_s (a burst coalesces to its latest value); a task silent for
    # task_heartbeat_s gets a task.progress-heartbeat, with stalled: true once silent for
    # task_stall_s; content.chapter-updated of one novel within coalesce_window_s arrive as one.
    progress_throttle_s: float = Field(1.0, ge=0)
    task_heartbeat_s: float = Field(60.0, gt=0)
    task_stall_s: float = Field(300.0, gt=0)
    coalesce_window_s: float = Field(1.0, ge=0)

    # Thresholds (R8.2, R8.3): past alert_connections open streams on this instance, or a p99
    # publish-to-write latency over alert_p99_latency_s in one history interval, a warning is
    # logged, scribe_events_threshold_exceeded is 1 and the users in alert_notify_users get a
    # system.notification.
    alert_connections: int = Field(20_000, ge=1)
    alert_p99_latency_s: float = Field(0.5, gt=0)
    alert_notify_users: list[str] = Field(default_factory=list, max_length=100)
    # Metric snapshots for `scribe-events report`: one per instance every history_interval_s,
    # kept history_keep_s (in Redis when configured, else in the store).
    history_interval_s: float = Field(10.0, ge=0.2)
    history_keep_s: float = Field(86_400.0, gt=0)

    poll_interval_s: int = 30
    reconnect_max_retries: int = 5
    reconnect_initial_delay_ms: int = 1000
    reconnect_max_delay_ms: int = 30_000

    instance_id: str = Field(default_factory=_default_instance, min_length=1, max_length=200)
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = "http://127.0.0.1:8000"
    token: str | None = None
    log_level: str = "info"
    access_log: bool = True
    # Freeze start-up objects out of the garbage collector's view (shorter full collections).
    gc_freeze: bool = True
    # Fault injection for the test suite ("kill_after_commit", "pause_before_commit",
    # "pause_after_commit"); refused in production.
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

    @field_validator(
        "rate_limit_streams_per_user",
        "rate_limit_tickets_per_user",
        "rate_limit_polling_per_user",
        "rate_limit_publish_per_user",
        "rate_limit_streams_per_ip",
        "rate_limit_tickets_per_ip",
        "rate_limit_polling_per_ip",
        "rate_limit_publish_per_ip",
        "rate_limit_admin",
    )
    @classmethod
    def _rate(cls, value: str) -> str:
        from scribe_events.ratelimit import parse_limit

        parse_limit(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from scribe_events.proxies import parse_networks

        parse_networks(value)  # a ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _refuse_weak_production(self) -> Settings:
        if self.environment == "production" and self.faults:
            raise ValueError("SCRIBE_EVENTS_FAULTS is for the test suite and refused in production")
        if self.environment == "production" and self.jwt_public_key is None:
            if not self.jwt_secret:
                raise ValueError("production needs SCRIBE_EVENTS_JWT_SECRET (no generated secret)")
            if len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"SCRIBE_EVENTS_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return self

    def deployment_problem(self) -> str | None:
        """Why the server cannot run with this configuration, or None. (Not a validator: client
        commands read the same settings and may legitimately name only Redis.)"""
        if self.redis_url and self.database_url.startswith("sqlite"):
            return (
                "SCRIBE_EVENTS_REDIS_URL is set but the store is SQLite: several instances need "
                "PostgreSQL (its publish lock keeps their events in order); unset the Redis URL to run "
                "one instance on SQLite"
            )
        return None

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
