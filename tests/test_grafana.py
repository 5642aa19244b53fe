"""grafana/: the alert rules under promtool, and the dashboard's every query against a real
Prometheus scraping a real server under load.

Prometheus and promtool are Debian's (/usr/bin). Without them these tests skip, except with
SCRIBE_EVENTS_TEST_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scribe_events.tasks import CRASHES, spawn
from tests.conftest import REQUIRE_SERVICES, MakeServer
from tests.harness import RawStream, ThreadServer, free_port, wait_for

GRAFANA = Path(__file__).parent.parent / "grafana"
DASHBOARD = GRAFANA / "scribe-events.json"
ALERTS = GRAFANA / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# What Grafana puts in place of its variables when it sends a query (Prometheus scrapes every 1 s
# here, so a 15 s window holds about 15 samples).
GRAFANA_VALUES = {"__rate_interval": "15s", "__interval": "5s", "__range": "1m", "instance": ".*"}

# The server for the load: low thresholds so that both are exceeded, one stream per user fewer
# than the load opens for "dave" (a 429 every round), small queues so a slow reader is cut soon.
LOAD_SETTINGS: dict[str, Any] = {
    "alert_connections": 3,
    "alert_p99_latency_s": 1e-6,
    "history_interval_s": 1.0,
    "max_streams_per_user": 2,
    "max_connection_buffer": 16 * 1024,
    "max_connection_queue": 64 * 1024,
    "progress_throttle_s": 1.0,
    "coalesce_window_s": 1.0,
}


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        if REQUIRE_SERVICES:
            pytest.fail(f"{name} is required here and not installed (apt-get install prometheus)")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return [p for p in panels if p["type"] != "row"]


def _queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def _expand(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VALUES[m.group(1)], expr)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(scribe_events_\w+)", expr))


def _exported_names(text: str) -> set[str]:
    """Every sample name a /metrics text can hold, from its families (those with no sample yet too)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


# --- the alert rules --------------------------------------------------------------------------


def test_grafana_alert_rules_pass_promtool_check() -> None:
    run = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_alert_rules_fire_in_promtool_unit_tests() -> None:
    run = subprocess.run(
        [_tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=GRAFANA,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_alert_tests_cover_every_alert() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", ALERTS.read_text(), re.M))
    tested = (GRAFANA / "alerts_test.yml").read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tested))
    quiet = set(re.findall(r"alertname: (\w+), exp_alerts: \[\]", tested))
    assert alerts and fired == alerts and quiet == alerts


def test_grafana_example_prometheus_config_is_valid() -> None:
    run = subprocess.run(
        [_tool("promtool"), "check", "config", "prometheus.yml"],
        cwd=GRAFANA,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --- the dashboard ----------------------------------------------------------------------------


def test_grafana_dashboard_is_importable_with_a_datasource_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["id"] is None
    [ds_input] = dashboard["__inputs"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${" + ds_input["name"] + "}"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    assert instance["definition"] == "label_values(scribe_events_connections, instance)"
    assert instance["includeAll"] and instance["allValue"] == ".*"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_every_panel_uses_the_datasource_variable() -> None:
    panels = _panels()
    assert {p["type"] for p in panels} == {"timeseries", "stat"}
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its {matchers}) of every selector in a query."""
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)|\[[^]]*\]", "", expr)  # no grouping, no ranges
    found = re.findall(r"([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", bare)
    return [(name, matchers) for name, matchers in found if name not in PROMQL_FUNCTIONS]


PROMQL_FUNCTIONS = {"sum", "max", "min", "rate", "increase", "histogram_quantile"}


def test_grafana_every_query_selects_by_the_instance_variable() -> None:
    for title, expr in _queries():
        selectors = _selectors(expr)
        assert selectors, (title, expr)
        for name, matchers in selectors:
            assert name.startswith("scribe_events_"), (title, name)
            assert 'instance=~"$instance"' in matchers, (title, expr)
        _expand(expr)  # names only variables Grafana has


def test_grafana_dashboard_and_alerts_name_only_metrics_the_server_exports(server: ThreadServer) -> None:
    exported = _exported_names(httpx.get(server.url + "/metrics").text)
    used = {name for _, expr in _queries() for name in _metric_names(expr)}
    used |= _metric_names(ALERTS.read_text())
    assert used - exported == set()


# --- a real Prometheus scraping a server under load -------------------------------------------


class Prometheus:
    """Prometheus in a subprocess on its own port and data folder, scraping ``targets`` every second."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> Prometheus:
        self.workdir.mkdir(parents=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "scribe-events", "static_configs": [{"targets": self.targets}]},
            ],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        with (self.workdir / "prometheus.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, timeout, 0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("prometheus exited:\n" + self.log())
        try:
            return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"])

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    """Start Prometheus scraping the given targets; stopped at the end of the test."""
    binary = _tool("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        instance = Prometheus(binary, tmp_path / f"prometheus-{len(started)}", targets)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.stop()


async def _crash_a_task() -> None:
    async def boom() -> None:
        raise RuntimeError("a crash for the dashboard's crash panel")

    spawn(boom(), "grafana-test")


class Load:
    """Traffic of every kind the dashboard shows, from a background thread until the block ends:
    open streams, events of every family (progress updates fast enough to be throttled, chapter
    updates to be coalesced), replays, refused credentials, a 429, a banned user, a request head
    too large (a socket rejected before any route), a slow reader that is cut off, and one crashed
    background task."""

    ROUNDS_S = 0.25

    def __init__(self, server: ThreadServer, max_s: float = 60.0) -> None:
        self.server = server
        self.max_s = max_s  # bounded whatever happens
        self.client = httpx.Client(base_url=server.url, timeout=10)
        self.publisher = {"Authorization": f"Bearer {server.publisher()}"}
        self.held: list[RawStream] = []
        self.errors: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        for user in ("alice", "bob", "carol", "dave", "dave"):
            stream = self.server.stream(user)
            stream.read_count(1, event="connection.established")
            self.held.append(stream)
        self._ban("mallory")
        self._slow_reader("slowpoke")
        self.server.call(_crash_a_task())
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(15)
        for stream in self.held:
            stream.close()
        self.client.close()
        CRASHES.pop("grafana-test", None)  # the process-wide count: leave it as it was

    def _publish(self, events: list[dict[str, Any]]) -> list[str]:
        r = self.client.post("/api/v1/events", json={"events": events}, headers=self.publisher)
        if r.status_code != 202:
            self.errors.append(f"publish: {r.status_code} {r.text}")
            return []
        return list(r.json()["ids"])

    def _ban(self, user: str) -> None:
        with self.server.stream(user) as stream:
            stream.read_count(1, event="connection.established")
            admin = {"Authorization": f"Bearer {self.server.token('ops', roles=['admin'])}"}
            r = self.client.post(
                "/api/v1/admin/bans", json={"user_id": user, "reason": "load"}, headers=admin
            )
            assert r.status_code == 201, r.text
            stream.wait_closed()

    def _slow_reader(self, user: str) -> None:
        """A reader that never reads: its queue fills, a newer progress update replaces an older
        one there, and it is cut off with events owed (failed deliveries)."""
        before = self.server.connections()
        stream = self.server.stream(user, rcvbuf=4096)
        stream.read_count(1, event="connection.established")
        blob = {"type": "custom.big", "user_id": user, "data": {"blob": "z" * 16_000}}
        progress = [
            {"type": "task.progress-updated", "user_id": user, "data": {"task_id": "t-slow", "progress": p}}
            for p in (10, 20, 30)
        ]
        deadline = time.monotonic() + 10
        try:
            while self.server.connections() > before and time.monotonic() < deadline:
                self._publish([blob] * 32)
                self._publish(progress)
        finally:
            stream.close()
        if self.server.connections() > before:
            self.errors.append("the slow reader was not cut off")

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < self.max_s:
            try:
                self._round()
            except Exception as exc:  # reported by the test, not lost in the thread
                self.errors.append(repr(exc))
            self.rounds += 1
            self._stop.wait(self.ROUNDS_S)

    def _round(self) -> None:
        n = self.rounds
        task = f"t{n}"
        ids = self._publish(
            [
                {"type": "custom.load", "user_id": "alice", "data": {"n": n}},
                {
                    "type": "task.progress-started",
                    "user_id": "alice",
                    "data": {"task_id": task, "title": "load"},
                },
                *(
                    {
                        "type": "task.progress-updated",
                        "user_id": "alice",
                        "data": {"task_id": task, "progress": p},
                    }
                    for p in (10, 40, 70)
                ),
                {"type": "task.progress-completed", "user_id": "alice", "data": {"task_id": task}},
                {
                    "type": "content.novel-created",
                    "user_id": "bob",
                    "data": {"novel_id": f"n{n}", "title": "A"},
                },
                *(
                    {
                        "type": "content.chapter-updated",
                        "user_id": "bob",
                        "data": {"novel_id": "n", "chapter_id": "c"},
                    }
                    for _ in range(3)
                ),
                {
                    "type": "workflow.status-changed",
                    "user_id": "carol",
                    "data": {"workflow_id": "w", "old_status": "a", "new_status": "b"},
                },
                {
                    "type": "system.notification",
                    "broadcast": True,
                    "data": {"level": "info", "title": "load", "message": f"round {n}"},
                },
            ]
        )
        for stream in self.held:
            stream.idle(0.01)  # keep reading: these are the healthy clients
        # refused: no token, a bad one, an expired one, a reader publishing, a banned user, a 429
        self._expect(self.client.get("/api/v1/events"), 401)
        self._expect(self.client.get("/api/v1/events", headers={"Authorization": "Bearer nope"}), 401)
        expired = self.server.token("alice", ttl_s=-60)
        self._expect(self.client.get("/api/v1/events", headers={"Authorization": f"Bearer {expired}"}), 401)
        reader = {"Authorization": f"Bearer {self.server.token('alice')}"}
        self._expect(self.client.post("/api/v1/events", json={"type": "custom.x"}, headers=reader), 403)
        for user, status in (("mallory", 403), ("dave", 429)):
            with self.server.stream(user) as refused:
                if refused.status != status:
                    self.errors.append(f"stream of {user}: {refused.status}, not {status}")
        # a head past max_header_bytes: the protocol answers 431 and closes, before any route
        self._expect(httpx.get(self.server.url + "/health", headers={"X-Pad": "x" * 40_000}, timeout=10), 431)
        # a stream that resumes from an earlier event (a replay), then closes
        if ids:
            with self.server.stream("alice", headers={"Last-Event-ID": ids[0]}) as resumed:
                resumed.read_count(1)

    def _expect(self, r: httpx.Response, status: int) -> None:
        if r.status_code != status:
            self.errors.append(f"{r.request.method} {r.request.url.path}: {r.status_code}, not {status}")


THRESHOLD_ALERTS = {"ScribeEventsConnectionsThreshold", "ScribeEventsP99LatencyThreshold"}


def _alerts(prom: Prometheus) -> set[str]:
    return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}


def test_grafana_every_panel_query_returns_data_from_a_real_prometheus(
    make_server: MakeServer, prometheus: Callable[[list[str]], Prometheus]
) -> None:
    server = make_server(**LOAD_SETTINGS)
    target = f"127.0.0.1:{server.port}"
    prom = prometheus([target])
    with Load(server) as load:
        # enough scrapes that a 15 s rate() window holds several samples of the load
        wait_for(
            lambda: any(
                float(r["value"][1]) >= 8 for r in prom.query("count_over_time(scribe_events_up_seconds[1m])")
            ),
            timeout=20,
            interval=0.5,
        )
        results = {(title, expr): prom.query(_expand(expr)) for title, expr in _queries()}
        instances = prom.api("label/instance/values", **{"match[]": "scribe_events_connections"})
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        rejected = prom.query('sum(scribe_events_connections_rejected_total{reason="headers_too_large"})')
        # (a threshold may be crossed just before this: Prometheus notices at its next evaluation)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: _alerts(prom) >= THRESHOLD_ALERTS, timeout=15, interval=0.5)
        alerts = _alerts(prom)
    assert load.errors == [] and load.rounds > 5
    empty = [f"{title}: {expr}" for (title, expr), result in results.items() if not result]
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    assert instances == [target]  # the dashboard's instance variable
    assert rejected and float(rejected[0]["value"][1]) > 0  # the load's oversized heads, by reason
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    # both thresholds are exceeded under this load: their alerts are pending (for: 5m)
    assert alerts >= THRESHOLD_ALERTS
