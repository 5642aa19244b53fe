"""Identifiers: one rule for each kind, always checked against the whole value (``fullmatch``).

``re.match(r"^…$")`` is not enough: in Python ``$`` also matches before a trailing newline, so
``"custom.x\\n"`` would pass. Every check here is a full match, and text ids refuse what cannot be
stored or sent: control characters (C0, DEL, C1) and lone surrogates (not encodable as UTF-8).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from scribe_events.exceptions import ValidationFailed

MAX_ID_CHARS = 200

# User, session, task and novel ids: 1-200 characters, none of them a control character or a
# lone surrogate.
TEXT_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,200}")
# Event types: dotted names such as ``content.novel-created``.
TYPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9][A-Za-z0-9_-]*)+")
# One glob of a ``types=`` filter.
TYPE_GLOB = re.compile(r"[A-Za-z0-9_.*?-]{1,200}")
# Idempotency-Key header values: visible ASCII.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")

ID_RULE = f"a non-empty string of at most {MAX_ID_CHARS} characters, without control characters"


def is_text_id(value: Any) -> bool:
    return isinstance(value, str) and TEXT_ID.fullmatch(value) is not None


def check_text_id(value: Any, field: str) -> str:
    """``value`` if it is a valid text id, else 422 naming ``field``."""
    if not is_text_id(value):
        raise ValidationFailed(f"must be {ID_RULE}", field=field)
    return str(value)


def optional_text_id(value: Any, field: str) -> str | None:
    return None if value is None else check_text_id(value, field)


def check_ip(value: Any, field: str = "ip") -> str:
    """An IPv4 or IPv6 address in its normal form (as the server sees peers), else 422."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValidationFailed("must be an IPv4 or IPv6 address", field=field) from None
