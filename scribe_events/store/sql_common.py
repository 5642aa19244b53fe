"""What the SQL store's modules share: the event columns read, the lock namespace, error mapping."""

from __future__ import annotations

from scribe_events.exceptions import StoreUnavailable
from scribe_events.store.schema import events

# First key of the advisory locks (pg_advisory_xact_lock(int, int) for writers, +1 for the publish
# lock); the second is the schema's hash.
LOCK_NAMESPACE = 0x5CE1

EVENT_COLUMNS = (
    events.c.id,
    events.c.type,
    events.c.time_ms,
    events.c.user_id,
    events.c.session_id,
    events.c.broadcast,
    events.c.task_id,
    events.c.novel_id,
    events.c.sensitive,
    events.c.key_id,
    events.c.data,
)


def fail(action: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the store could not {action}: {type(exc).__name__}")
