"""What every command shares: settings, the Rich consoles, turning errors into one red line."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from scribe_events.auth import mint_token
from scribe_events.config import Settings
from scribe_events.exceptions import ScribeEventsError

console = Console(highlight=False, emoji=False)
err_console = Console(stderr=True, highlight=False, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])

# What a terminal acts on instead of showing: C0, DEL and C1 controls (ESC, CSI, OSC, BEL, ...), bidi
# marks, embeddings, overrides and isolates, line and paragraph separators, and lone surrogates (from
# JSON's "\ud800"; they cannot even be encoded). Server, publisher and user text can hold any of them.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def visible(value: object) -> str:
    """``value`` as text to show: every control or bidi character becomes an escape like ``\\x1b``."""
    return _UNSAFE.sub(_shown, value if isinstance(value, str) else str(value))


def literal(value: object, style: str = "") -> Text:
    """``value`` shown as is (never read as Rich markup), with :func:`visible`'s escapes."""
    return Text(visible(value), style=style)


def dumps(value: Any) -> str:
    """One line of JSON for stdout: non-ASCII stays readable, but nothing a terminal would act on.

    ``json.dumps`` escapes C0 controls only; the rest of ``_UNSAFE`` occurs only inside strings
    (JSON's own syntax is printable ASCII), where ``\\uXXXX`` is the same character.
    """
    return _UNSAFE.sub(_json_escape, json.dumps(value, ensure_ascii=False))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` literally as one red line on stderr; the caller raises the Exit."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", visible(message)), soft_wrap=True)
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
