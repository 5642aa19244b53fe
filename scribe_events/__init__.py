"""scribe-events: the real-time event service of InfiniteScribe (Server-Sent Events)."""

from __future__ import annotations

__version__ = "0.1.0"
