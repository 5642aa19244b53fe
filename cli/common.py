"""What every command shares: settings, the Rich consoles, turning errors into one red line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from scribe_events.auth import mint_token
from scribe_events.config import Settings
from scribe_events.exceptions import ScribeEventsError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Domain errors become one red line and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScribeEventsError as exc:
            raise fail(exc.message) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise fail(f"configuration: {where}: {first['msg']}") from None
        except ValueError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def load_settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def client_token(settings: Settings, token: str | None, user: str, roles: list[str]) -> str:
    """The token a client command sends: given, from SCRIBE_EVENTS_TOKEN, or minted with the local secret."""
    if token:
        return token
    if settings.token:
        return settings.token
    secret = settings.signing_secret()
    if secret is None:
        raise fail(
            "no token: pass --token, set SCRIBE_EVENTS_TOKEN, or run where the server's secret file is "
            f"({settings.jwt_secret_file}) or SCRIBE_EVENTS_JWT_SECRET is set"
        )
    return mint_token(secret, user, roles=roles, audience=settings.jwt_audience, issuer=settings.jwt_issuer)
