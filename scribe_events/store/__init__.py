"""The durable event store. One interface; SQLAlchemy implements it on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scribe_events.config import Settings
from scribe_events.store.base import EventStore, FailedDelivery, IdempotencyRecord, Page

if TYPE_CHECKING:
    from scribe_events.store.sql import SQLEventStore

__all__ = ["EventStore", "FailedDelivery", "IdempotencyRecord", "Page", "make_store"]


def make_store(settings: Settings) -> SQLEventStore:
    from scribe_events.crypto import Cipher
    from scribe_events.store.sql import SQLEventStore

    cipher = Cipher(settings.encryption_keys) if settings.encryption_keys else None
    return SQLEventStore(
        settings.database_url,
        schema=settings.database_schema,
        auto_migrate=settings.auto_migrate,
        cipher=cipher,
    )
