"""The browser client (/static/scribe-events.js) in headless Chromium against a real server.

Debian's /usr/bin/chromium, driven by Playwright's Python package (never `playwright install`).
The page is served through a small proxy in front of the server, so a test can take the server
away from the browser (refusing and cutting connections, as a stopped server does) while it keeps
running for the publisher.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright import sync_api

from tests.conftest import MakeServer
from tests.harness import ThreadServer, wait_for

CHROMIUM = "/usr/bin/chromium"
REQUIRE = os.environ.get("SCRIBE_EVENTS_TEST_REQUIRE_SERVICES") == "1"

FAST = {  # short reconnect delays and poll interval, so the tests see every phase quickly
    "reconnect_initial_delay_ms": 100,
    "reconnect_max_delay_ms": 1500,
    "reconnect_max_retries": 5,
    "poll_interval_s": 1,
    "heartbeat_s": 2,
}


class FlakyProxy:
    """Forwards connections to the server; ``down()`` cuts them all and refuses new ones (accepts
    and closes at once), as a stopped server does; ``up()`` forwards again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._down = False
        self._open: set[socket.socket] = set()
        self._stalled: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src in self._stalled or dst in self._stalled:
                    continue  # swallowed: nothing arrives, nothing is closed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def down(self) -> None:
        self._down = True
        with self._lock:
            victims = list(self._open)
        for s in victims:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        self._down = False

    def stall(self) -> None:
        """The connections open now stop carrying bytes (a dead link); new ones work."""
        with self._lock:
            self._stalled |= set(self._open)

    def close(self) -> None:
        self.down()
        self.listener.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if REQUIRE:
            pytest.fail(f"{CHROMIUM} is required here (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def fast(make_server: MakeServer) -> ThreadServer:
    return make_server(**FAST)


@pytest.fixture
def proxy(fast: ThreadServer) -> Iterator[FlakyProxy]:
    p = FlakyProxy(fast.port)
    yield p
    p.close()


START = """async ({token, options}) => {
  const { ScribeEvents } = await import("/static/scribe-events.js");
  window.got = []; window.statuses = []; window.retries = [];
  window.c = new ScribeEvents({ baseUrl: "", getToken: () => token, ...(options || {}) });
  window.statuses.push(window.c.status);
  c.on("statuschange", (s) => window.statuses.push(s.status));
  c.on("retry", (r) => window.retries.push(r));
  c.on("*", (e) => window.got.push(e));
}"""


def _open_page(context: Any, base: str, token: str, **options: Any) -> Any:
    page = context.new_page()
    page.goto(base + "/health")  # same origin as the API; the module is loaded from it
    page.evaluate(START, {"token": token, "options": options})
    return page


def _status(page: Any) -> str:
    return str(page.evaluate("window.c.status"))


def _wait_status(page: Any, status: str, timeout_ms: int = 10_000) -> None:
    page.wait_for_function(f"window.c && window.c.status === {status!r}", timeout=timeout_ms)


def _got_ids(page: Any, type_: str | None = None) -> list[str]:
    return list(page.evaluate("(t) => window.got.filter((e) => !t || e.type === t).map((e) => e.id)", type_))


def _publish(server: ThreadServer, n: int, user: str = "alice", **data: Any) -> list[str]:
    return server.publish_ok(
        {
            "type": "system.notification",
            "user_id": user,
            "data": {"level": "info", "title": f"n{n}", "message": "m", **data},
        }
    )


def test_browser_connects_and_delivers_an_event(browser: Any, fast: ThreadServer) -> None:
    context = browser.new_context()
    page = _open_page(context, fast.url, fast.token("alice"))
    _wait_status(page, "open")
    assert page.evaluate("window.statuses")[:2] == ["connecting", "open"]
    ids = _publish(fast, 1)
    page.wait_for_function("window.got.length >= 1")
    assert _got_ids(page) == ids
    assert page.evaluate("window.got[0].data.title") == "n1"
    context.close()


def test_browser_reconnects_with_growing_delays_then_polls_and_recovers_losing_nothing(
    browser: Any, fast: ThreadServer, proxy: FlakyProxy
) -> None:
    context = browser.new_context()
    page = _open_page(context, proxy.url, fast.token("alice"))
    _wait_status(page, "open")
    before = _publish(fast, 1)
    page.wait_for_function("window.got.length >= 1")
    proxy.down()
    _wait_status(page, "polling", timeout_ms=15_000)
    statuses = page.evaluate("window.statuses")
    assert statuses[:3] == ["connecting", "open", "reconnecting"] and statuses[-1] == "polling"
    delays = [r["delay_ms"] for r in page.evaluate("window.retries") if r["status"] == "reconnecting"]
    assert len(delays) == FAST["reconnect_max_retries"], delays
    assert delays == sorted(delays) and delays[-1] > delays[0]  # growing (with jitter)
    away = [i for n in range(2, 6) for i in _publish(fast, n)]  # published while it was away
    proxy.up()
    _wait_status(page, "open", timeout_ms=10_000)
    page.wait_for_function(f"window.got.length >= {1 + len(away)}")
    time.sleep(0.5)
    assert _got_ids(page) == before + away  # once each, in order
    context.close()


def test_browser_push_mode_polling_holds_no_stream_and_back_to_sse_holds_one(
    browser: Any, fast: ThreadServer
) -> None:
    admin = {"Authorization": f"Bearer {fast.token('root', roles=['admin'])}"}
    context = browser.new_context()
    page = _open_page(context, fast.url, fast.token("alice"))
    _wait_status(page, "open")
    wait_for(lambda: fast.connections() == 1)
    try:
        r = httpx.put(fast.url + "/api/v1/admin/push-mode", json={"mode": "polling"}, headers=admin)
        assert r.status_code == 200, r.text
        _wait_status(page, "polling")
        wait_for(lambda: fast.connections() == 0, timeout=5)  # no stream held by the server
        assert page.evaluate("window.c._es") is None  # nor by the browser
        ids = _publish(fast, 1)
        page.wait_for_function(f"window.got.some((e) => e.id === {ids[0]!r})", timeout=5000)
        r = httpx.put(fast.url + "/api/v1/admin/push-mode", json={"mode": "sse"}, headers=admin)
        assert r.status_code == 200
        _wait_status(page, "open", timeout_ms=5000)
        wait_for(lambda: fast.connections() == 1, timeout=5)
        more = _publish(fast, 2)
        page.wait_for_function(f"window.got.some((e) => e.id === {more[0]!r})", timeout=5000)
        assert [i for i in _got_ids(page, "system.notification")] == ids + more
    finally:
        httpx.put(fast.url + "/api/v1/admin/push-mode", json={"mode": "sse"}, headers=admin)
        context.close()


def test_browser_tabs_share_one_connection_and_hand_it_over(browser: Any, fast: ThreadServer) -> None:
    context = browser.new_context()
    token = fast.token("alice")
    first = _open_page(context, fast.url, token)
    _wait_status(first, "open")
    second = _open_page(context, fast.url, token)
    _wait_status(second, "open")  # told by the leader
    time.sleep(0.3)
    assert fast.connections() == 1
    ids = [i for n in range(3) for i in _publish(fast, n)]
    for page in (first, second):
        page.wait_for_function("window.got.length >= 3")
    time.sleep(0.3)
    assert _got_ids(first) == ids and _got_ids(second) == ids  # each once
    first.close()  # the leader goes: the other tab takes over and resumes after the last id
    gap = _publish(fast, 10)
    wait_for(lambda: second.evaluate("window.c.leader"), timeout=5)
    _wait_status(second, "open")
    later = _publish(fast, 11)
    second.wait_for_function(f"window.got.length >= {len(ids) + 2}", timeout=5000)
    time.sleep(0.3)
    assert _got_ids(second) == ids + gap + later
    wait_for(lambda: fast.connections() == 1, timeout=5)
    context.close()


def test_browser_close_ends_stream_timers_and_requests(browser: Any, fast: ThreadServer) -> None:
    context = browser.new_context()
    page = _open_page(context, fast.url, fast.token("alice"))
    _wait_status(page, "open")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.evaluate("window.c.close()")
    assert _status(page) == "closed"
    wait_for(lambda: fast.connections() == 0, timeout=3)
    time.sleep(5)
    assert requests == [] and page.evaluate("window.c._timers.size") == 0
    context.close()


def test_browser_without_event_source_polls(browser: Any, fast: ThreadServer) -> None:
    context = browser.new_context()
    context.add_init_script("delete window.EventSource")
    page = _open_page(context, fast.url, fast.token("alice"))
    _wait_status(page, "polling")
    ids = _publish(fast, 1)
    page.wait_for_function("window.got.length >= 1", timeout=5000)
    assert _got_ids(page) == ids and fast.connections() == 0
    context.close()


def test_browser_offline_then_online_tries_at_once_and_misses_nothing(
    browser: Any, make_server: MakeServer
) -> None:
    server = make_server(**{**FAST, "reconnect_initial_delay_ms": 20_000, "reconnect_max_delay_ms": 30_000})
    context = browser.new_context()
    page = _open_page(context, server.url, server.token("alice"))
    _wait_status(page, "open")
    context.set_offline(True)
    proxyless_cut = server.runtime.hub  # going offline does not end a loopback stream: end it
    for conn in list(proxyless_cut.connections.values()):
        server.call(_end(proxyless_cut, conn))
    _wait_status(page, "reconnecting")  # the next try is 10-20 s away
    ids = _publish(server, 1)
    context.set_offline(False)
    t0 = time.monotonic()
    _wait_status(page, "open", timeout_ms=3000)
    assert time.monotonic() - t0 < 1.5
    page.wait_for_function("window.got.length >= 1", timeout=3000)
    assert _got_ids(page) == ids
    context.close()


async def _end(hub: Any, conn: Any) -> None:
    hub.end(conn, "test")


def test_demo_page_shows_tasks_from_the_demo(browser: Any, fast: ThreadServer, tmp_path: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(fast.url + "/")
    page.fill("#token", fast.token("demo"))
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('status').dataset.status === 'open'")
    fast.publish_ok(
        {
            "type": "task.progress-started",
            "task_id": "p1",
            "data": {"task_id": "p1", "owner": "demo", "title": "Chapter <b>1</b>"},
        }
    )
    fast.publish_ok(
        {"type": "task.progress-updated", "task_id": "p1", "data": {"task_id": "p1", "progress": 42}}
    )
    page.wait_for_function("document.querySelector('[data-task-id=p1] .note') !== null")
    page.wait_for_function("document.querySelector('[data-task-id=p1]').textContent.includes('42%')")
    title = page.evaluate("document.querySelector('[data-task-id=p1] .title span').textContent")
    assert title == "Chapter <b>1</b>"  # shown as text, never as markup
    context.close()


def test_browser_a_stream_without_heartbeats_is_dead_and_replaced(
    browser: Any, fast: ThreadServer, proxy: FlakyProxy
) -> None:
    context = browser.new_context()
    page = _open_page(context, proxy.url, fast.token("alice"))
    _wait_status(page, "open")
    proxy.stall()  # heartbeats every 2 s stop arriving; the socket stays open
    t0 = time.monotonic()
    page.wait_for_function("window.statuses.includes('reconnecting')", timeout=10_000)
    assert time.monotonic() - t0 >= 2 * FAST["heartbeat_s"] - 0.5  # two intervals, not sooner
    _wait_status(page, "open", timeout_ms=5000)
    ids = _publish(fast, 1)
    page.wait_for_function("window.got.length >= 1", timeout=5000)
    assert _got_ids(page) == ids
    context.close()


def test_browser_batches_handler_calls_per_frame_and_keeps_a_hidden_tab_streaming(
    browser: Any, fast: ThreadServer
) -> None:
    context = browser.new_context()
    page = _open_page(context, fast.url, fast.token("alice"), batch="frame")
    page.evaluate(
        "() => { window.batches = []; window.c.on('batch', (b) => window.batches.push(b.length)); }"
    )
    _wait_status(page, "open")
    # The tab is hidden: the stream stays (R5.4).
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {value: true});"
        "Object.defineProperty(document, 'visibilityState', {value: 'hidden'});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    body = {"events": [{"type": "custom.tick", "user_id": "alice", "data": {"n": n}} for n in range(30)]}
    page.evaluate("() => { window.c.on('custom.tick', () => {}); }")  # custom types: listened to once handled
    ids = fast.publish_ok(body)
    page.wait_for_function("window.got.length >= 30", timeout=5000)
    assert _got_ids(page) == ids and _status(page) == "open"
    batches = page.evaluate("window.batches")
    assert sum(batches) == 30 and len(batches) < 30  # delivered in a few frames, not one call each
    context.close()


def test_demo_page_dev_token_and_the_demo_command(
    browser: Any, make_server: MakeServer, tmp_path: Any
) -> None:
    """In development, on the generated secret, the page's button gets a token; the demo's tasks
    then show as progress bars that end completed (one failed once and was retried)."""
    import asyncio

    from scribe_events.demo import DemoPlan, run_demo
    from scribe_events.sdk import EventPublisher

    server = make_server(jwt_secret=None, jwt_secret_file=str(tmp_path / "dev.secret"))
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.click("#devtoken")
    page.wait_for_function("document.getElementById('status').dataset.status === 'open'")
    secret = (tmp_path / "dev.secret").read_text().strip()
    from scribe_events.auth import mint_token

    async def demo() -> None:
        async with EventPublisher(server.url, token=mint_token(secret, "w", roles=["publisher"])) as events:
            await run_demo(events, DemoPlan(tasks=2, step_s=0.002, seed=3), report=lambda _: None)

    worker = threading.Thread(target=asyncio.run, args=(demo(),))  # Playwright's loop owns this thread
    worker.start()
    worker.join(30)
    page.wait_for_function("document.querySelectorAll('.task.completed').length === 2", timeout=10_000)
    # The novel and both chapters (the second may be held for the coalescing window).
    page.wait_for_function("document.querySelectorAll('#chapters li').length >= 3", timeout=5000)
    assert "Draft ready" in page.evaluate("document.getElementById('notifications').textContent")
    r = httpx.post(
        server.url + "/api/v1/dev/token", json={"user_id": "x"}, headers={"X-Forwarded-For": "8.8.8.8"}
    )
    assert r.status_code == 200  # loopback peer; forwarded headers are not trusted
    context.close()


def test_dev_token_is_refused_outside_development_on_a_configured_secret(fast: ThreadServer) -> None:
    r = httpx.post(fast.url + "/api/v1/dev/token", json={"user_id": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_browser_tabs_without_web_locks_elect_a_leader_over_broadcast_channel(
    browser: Any, fast: ThreadServer
) -> None:
    context = browser.new_context()
    context.add_init_script("Object.defineProperty(navigator, 'locks', {value: undefined})")
    token = fast.token("alice")
    first = _open_page(context, fast.url, token)
    _wait_status(first, "open")
    second = _open_page(context, fast.url, token)
    second.wait_for_function("window.c.status === 'open'", timeout=5000)
    time.sleep(1.5)  # several election rounds: still one leader
    assert fast.connections() == 1
    assert [first.evaluate("window.c.leader"), second.evaluate("window.c.leader")].count(True) == 1
    ids = _publish(fast, 1)
    for page in (first, second):
        page.wait_for_function("window.got.length >= 1")
    leader, other = (first, second) if first.evaluate("window.c.leader") else (second, first)
    leader.close()
    wait_for(lambda: other.evaluate("window.c.leader"), timeout=6)
    more = _publish(fast, 2)
    other.wait_for_function("window.got.length >= 2", timeout=5000)
    assert _got_ids(other) == ids + more
    wait_for(lambda: fast.connections() == 1, timeout=5)
    context.close()


def test_browser_timers_stay_few_however_many_events_arrive(browser: Any, fast: ThreadServer) -> None:
    """Regression (review): every event re-armed the stall timer and left the old one's id in
    the timer set, which grew by one entry an event."""
    context = browser.new_context()
    page = _open_page(context, fast.url, fast.token("alice"))
    _wait_status(page, "open")
    page.evaluate("() => { window.c.on('custom.tick', () => {}); }")
    for _ in range(4):
        fast.publish_ok({"events": [{"type": "custom.tick", "user_id": "alice"} for _ in range(50)]})
    page.wait_for_function("window.got.length >= 200", timeout=5000)
    assert page.evaluate("window.c._timers.size") <= 3
    context.close()


def test_browser_a_tab_that_saw_nothing_takes_over_without_missing_events(
    browser: Any, fast: ThreadServer
) -> None:
    """Regression (review): a follower that had seen no event yet took over 'from now' and missed
    what was published while the leader was gone; the leader now tells followers where it is.
    (Without Web Locks the takeover waits out the leader's silence, so the gap is certain.)"""
    context = browser.new_context()
    context.add_init_script("Object.defineProperty(navigator, 'locks', {value: undefined})")
    token = fast.token("alice")
    first = _open_page(context, fast.url, token)
    _wait_status(first, "open")
    second = _open_page(context, fast.url, token)
    _wait_status(second, "open")
    time.sleep(1.5)
    assert first.evaluate("window.c.leader")
    first.close()
    gap = _publish(fast, 1)  # nobody holds a stream right now
    wait_for(lambda: second.evaluate("window.c.leader"), timeout=5)
    second.wait_for_function("window.got.length >= 1", timeout=5000)
    assert _got_ids(second) == gap
    context.close()


def test_browser_comes_back_when_a_restarting_server_says(browser: Any, make_server: MakeServer) -> None:
    """A server that stops tells each stream when to come back (spread over drain_window_s): the
    client waits that long, as a planned restart (not a failure, no growing backoff), then resumes
    on whichever instance now answers."""
    first = make_server("a.db", drain_window_s=1.5, **FAST)
    second = make_server("b.db", **FAST)
    proxy = FlakyProxy(first.port)
    try:
        context = browser.new_context()
        page = _open_page(context, proxy.url, first.token("alice"))
        _wait_status(page, "open")
        proxy.target = second.port  # the load balancer's next choice
        started = time.monotonic()
        first.stop()
        page.wait_for_function("window.retries.length >= 1", timeout=5_000)
        [retry] = page.evaluate("window.retries")
        assert retry["attempt"] == 0 and 0 <= retry["delay_ms"] <= 1500, retry
        _wait_status(page, "open", timeout_ms=5_000)
        assert time.monotonic() - started >= retry["delay_ms"] / 1000 - 0.05  # not before it was told
        assert page.evaluate("window.statuses").count("reconnecting") == 1
        context.close()
    finally:
        proxy.close()
