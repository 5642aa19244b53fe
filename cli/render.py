"""How ``tail`` shows a message to a person: one coloured line each, every part of it shown literally."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from scribe_events_cli.common import visible

from scribe_events.client import Message

_COLOURS = {
    "task": "cyan",
    "content": "green",
    "workflow": "magenta",
    "system": "yellow",
    "connection": "blue",
    "replay": "bold red",
    "heartbeat": "dim",
}


def _colour(event: str) -> str:
    if event == "system.error":
        return "bold red"
    return _COLOURS.get(event.split(".", 1)[0], "white")


def _summary(data: Any, limit: int = 160) -> str:
    if isinstance(data, dict):
        text = "  ".join(
            f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}"
            for k, v in data.items()
        )
    else:
        text = json.dumps(data, ensure_ascii=False)
    return str(visible(text if len(text) <= limit else text[: limit - 1] + "…"))


def render_message(message: Message) -> Text:
    try:
        payload = message.json()
    except ValueError:
        payload = message.data
    line = Text()
    event = visible(message.event)
    if isinstance(payload, dict) and {"id", "type", "time", "data"} <= set(payload):
        line.append(visible(str(payload["time"])[11:23]) + "  ", style="dim")
        line.append(f"{event:<26}", style=_colour(message.event))
        line.append(f" #{visible(payload['id']):<8} ", style="bold")
        line.append(_summary(payload["data"]))
        return line
    line.append(f"{'':14}{event:<26}", style=_colour(message.event))
    line.append(" " + _summary(payload), style="dim" if message.event == "heartbeat" else "")
    return line
