"""The HTTP surface: the app factory, the stream, publishing, polling and operations routes."""

from __future__ import annotations

from scribe_events.web.app import ScribeApp, create_app

__all__ = ["ScribeApp", "create_app"]
