"""Parsing ``7d``, ``12h``, ``30m``, ``90s`` and RFC 3339 times from the command line."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_duration(text: str) -> timedelta:
    """``7d`` → 7 days; a bare number is days."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 7d, 12h, 30m or 90s")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_since(text: str) -> datetime:
    """A duration ago (``2h``) or an RFC 3339 time (``2026-11-29T10:00:00Z``)."""
    try:
        return datetime.now(UTC) - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (2h) nor a time (2026-11-29T10:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
