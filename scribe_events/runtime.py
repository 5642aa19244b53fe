"""The running service's parts, built by the app's lifespan and handed to every request."""

from __future__ import annotations

from dataclasses import dataclass

from scribe_events.admission import Admission
from scribe_events.auth import TokenVerifier
from scribe_events.broker import Broker
from scribe_events.config import Settings
from scribe_events.control import Control
from scribe_events.failures import FailureRecorder
from scribe_events.hub import Hub
from scribe_events.live_tasks import LiveTasks
from scribe_events.metrics import RequestStats
from scribe_events.monitor import Monitor
from scribe_events.publisher import Publisher
from scribe_events.registry import Registry
from scribe_events.service import EventService
from scribe_events.state import SharedState
from scribe_events.store import EventStore


@dataclass
class Runtime:
    """Everything a request needs, built by the lifespan."""

    settings: Settings
    verifier: TokenVerifier
    admission: Admission
    state: SharedState
    control: Control
    registry: Registry
    store: EventStore
    broker: Broker
    hub: Hub
    publisher: Publisher
    recorder: FailureRecorder
    live: LiveTasks
    service: EventService
    monitor: Monitor
    requests: RequestStats
    started_at: float
