"""The durable event store. One interface; SQLAlchemy implements it on SQLite and PostgreSQL."""

from __future__ import annotations

from scribe_events.config import Settings
from scribe_events.store.base import EventStore, IdempotencyRecord

__all__ = ["EventStore", "IdempotencyRecord", "make_store"]


def make_store(settings: Settings) -> EventStore:
    from scribe_events.store.sql import SQLEventStore

    return SQLEventStore(settings.database_url)
