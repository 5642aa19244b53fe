"""Settings: environment, defaults, refusing weak production secrets, the generated dev secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from scribe_events.config import Settings


def test_settings_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.database_url == "sqlite+aiosqlite:///./scribe-events.db"
    assert s.redis_url is None and s.heartbeat_s == 30 and s.retention_days == 7
    assert s.is_default_setup


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRIBE_EVENTS_HEARTBEAT_S", "5")
    monkeypatch.setenv("SCRIBE_EVENTS_CORS_ORIGINS", '["https://app.example"]')
    s = Settings()
    assert s.heartbeat_s == 5 and s.cors_origins == ["https://app.example"]


def test_settings_production_refuses_weak_or_generated_secret() -> None:
    with pytest.raises(ValidationError):
        Settings(environment="production")
    with pytest.raises(ValidationError):
        Settings(environment="production", jwt_secret="short")
    assert Settings(environment="production", jwt_secret="k" * 32).jwt_secret


def test_settings_dev_secret_is_generated_once(tmp_path: Path) -> None:
    s = Settings(jwt_secret_file=str(tmp_path / "secret"))
    assert s.signing_secret() is None
    first = s.signing_secret(create=True)
    assert first and len(first) >= 32
    assert s.signing_secret(create=True) == first
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_settings_read_toml_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scribe-events.toml").write_text("heartbeat_s = 7\nretention_days = 3\n")
    (tmp_path / ".env").write_text("SCRIBE_EVENTS_RETENTION_DAYS=5\n")
    s = Settings()
    assert s.heartbeat_s == 7  # from the toml file
    assert s.retention_days == 5  # .env wins over the toml file
    monkeypatch.setenv("SCRIBE_EVENTS_RETENTION_DAYS", "9")
    assert Settings().retention_days == 9  # and the environment over both


def test_test_servers_ignore_the_runners_environment_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness import ThreadServer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCRIBE_EVENTS_POLL_INTERVAL_S", "5")
    (tmp_path / ".env").write_text("SCRIBE_EVENTS_HEARTBEAT_S=1\n")
    (tmp_path / "scribe-events.toml").write_text("retry_ms = 7\n")
    settings = ThreadServer(tmp_path / "x.db").settings()
    assert (settings.poll_interval_s, settings.heartbeat_s, settings.retry_ms) == (30, 30.0, 3000)
    assert settings.gc_freeze is False
