"""``scribe-events bench s1|s2|s3|s4|publish``: each scenario briefly against a real server, a server
that drops an event, refused input; and the receiver's read path byte by byte.

The scenarios run in this process (typer's runner: no interpreter start-up per run), against
uvicorn on a real socket in a thread; the exit codes a shell sees are checked as a subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scribe_events_cli.main import app
from typer.testing import CliRunner

from scribe_events.loadgen import stats
from scribe_events.loadgen.receiver import BROADCAST, Accounting, Subscriber, Tally
from tests.harness import SECRET, ThreadServer, cli


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``bench(*args)``: the CLI in this process, in an empty folder with the test server's secret."""
    for name in list(os.environ):
        if name.startswith("SCRIBE_EVENTS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SCRIBE_EVENTS_JWT_SECRET", SECRET)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(app, ["bench", *args])

    yield run
    gc.unfreeze()  # a run freezes the collector after connecting: right for its own process only


def _result(outcome: Any) -> dict[str, Any]:
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), outcome.exception
    result: dict[str, Any] = json.loads(outcome.stdout)
    return result


def _latency_ok(p: dict[str, Any], count: int) -> None:
    assert p["count"] == count
    assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"]


def test_loadgen_s1_broadcast_delivers_every_event_to_every_subscriber(
    server: ThreadServer, bench: Any
) -> None:
    out = bench(
        "s1",
        "--url",
        server.url,
        "-n",
        "20",
        "--rate",
        "20",
        "--duration",
        "1.5",
        "--settle",
        "0.2",
        "--p99-limit",
        "60000",  # this checks what arrived, not how fast: the suite's machine is busy
        "--json",
    )
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    assert result["pass"] and result["connect"]["connected"] == 20
    assert result["publish"]["ok"] == 30 and result["publish"]["rate_held"]
    assert result["expected"] == result["received"] == 20 * 30
    assert result["lost"] == result["duplicated"] == result["misrouted"] == 0
    _latency_ok(result["latency"], 600)
    _latency_ok(result["latency_corrected"], 600)
    assert result["latency_corrected"]["p50_ms"] >= result["latency"]["p50_ms"] * 0.9
    assert result["other_events"] == 20  # one connection.established each, not counted as ours
    assert result["server"]["pid"] == os.getpid()  # found by its listening socket (a thread here)
    assert result["loadgen"]["cpu_s"] > 0


def test_loadgen_s2_targeted_over_two_processes_reaches_only_the_addressee(
    server: ThreadServer, bench: Any
) -> None:
    out = bench(
        "s2",
        "--url",
        server.url,
        "-n",
        "20",
        "--rate",
        "40",
        "--duration",
        "1.5",
        "--processes",
        "2",
        "--settle",
        "0.2",
        "--p99-limit",
        "60000",
        "--json",
    )
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    assert result["processes"] == 2 and result["loadgen"]["processes"] == 2
    assert result["expected"] == result["received"] == 60
    assert result["lost"] == result["misrouted"] == result["duplicated"] == 0
    _latency_ok(result["latency_corrected"], 60)


def test_loadgen_s3_idle_holds_every_stream_and_weighs_them(server: ThreadServer, bench: Any) -> None:
    out = bench("s3", "--url", server.url, "-n", "50", "--hold", "1", "--settle", "0.2", "--json")
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    assert result["connected"] == result["held_at_end"] == result["held_min"] == 50
    assert result["failed"] == 0 and result["seconds_to_connect_all"] > 0
    assert server.connections() == 0  # all closed again
    memory = result["server_memory"]
    assert memory["rss_mib_before"] > 0 and "kib_per_connection" in memory


def test_loadgen_s4_resume_gets_every_missed_event_once_in_order(server: ThreadServer, bench: Any) -> None:
    out = bench(
        "s4",
        "--url",
        server.url,
        "-n",
        "3",
        "--before",
        "2",
        "--missed",
        "10",
        "--batch",
        "4",
        "--settle",
        "0.1",
        "--away",
        "0.1",
        "--json",
    )
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    assert result["received_before"] == result["expected_before"] == 6
    assert result["expected"] == result["received"] == 30
    assert result["lost"] == result["duplicated"] == result["out_of_order_subscribers"] == 0
    assert result["live_after_missing"] == 0 and result["without_last_event_id"] == 0
    assert result["publish"]["ok"] == 3 * 1 + 3 * 3 + 3  # before, missed in batches of 4, live
    _latency_ok(result["resume"], 3)


def test_loadgen_publish_counts_answers_and_checks_delivery(server: ThreadServer, bench: Any) -> None:
    out = bench(
        "publish",
        "--url",
        server.url,
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--batch",
        "5",
        "-n",
        "5",
        "--settle",
        "0.2",
        "--json",
    )
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    ok = result["requests_ok"]
    assert ok > 0 and result["statuses"] == {"202": ok} and result["requests_failed"] == 0
    assert result["events_accepted"] == 5 * ok == result["expected"] == result["received"]
    assert result["lost"] == result["misrouted"] == 0
    assert result["events_per_s"] == pytest.approx(5 * result["requests_per_s"], rel=0.01)
    _latency_ok(result["latency"], ok)


def test_loadgen_publish_alone_needs_no_subscriber_tokens(server: ThreadServer, bench: Any) -> None:
    out = bench(
        "publish", "--url", server.url, "--concurrency", "2", "--duration", "0.5", "--rate", "40", "--json"
    )
    result = _result(out)
    assert out.exit_code == 0, result["fail_reasons"]
    assert result["requests_ok"] == 20 and result["rate_held"]
    _latency_ok(result["latency_corrected"], 20)


class DroppingServer:
    """A generic SSE server, not scribe-events: ``GET /sub/<i>`` streams (no chunking, CRLF line
    ends), ``POST /pub`` sends its body as ``data:`` to every stream, ``delay_s`` later, except the
    event with seq ``drop`` (3 unless told; None: every event)."""

    def __init__(self, drop: int | None = 3, delay_s: float = 0.0) -> None:
        self.drop = drop  # the seq not sent on
        self.delay_s = delay_s  # before each event is sent on
        self.loop = asyncio.new_event_loop()
        self.streams: set[asyncio.StreamWriter] = set()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> DroppingServer:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop
        ).result(5)
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        return self

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            self._server.close()
            for w in self.streams:
                w.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method = head.split(" ", 1)[0]
                if method == "GET":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hello\r\n\r\n")
                    self.streams.add(writer)
                    await reader.read()
                    return
                length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
                body = await reader.readexactly(length)
                if json.loads(body)["seq"] != self.drop:
                    await asyncio.sleep(self.delay_s)
                    for stream in self.streams:
                        stream.write(b"data: " + body + b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.streams.discard(writer)
            writer.close()


def test_loadgen_counts_an_event_a_server_drops_as_lost_and_fails(tmp_path: Path) -> None:
    with DroppingServer() as other:
        base = f"http://127.0.0.1:{other.port}"
        out = cli(
            "bench",
            "s1",
            "--sub-url",
            base + "/sub/{i}",
            "--pub-url",
            base + "/pub",
            "-n",
            "5",
            "--rate",
            "20",
            "--duration",
            "0.5",
            "--settle",
            "0.1",
            "--drain",
            "0.5",
            "--json",
            cwd=tmp_path,
        )
    assert out.returncode == 1, out.stderr
    result = json.loads(out.stdout)
    assert not result["pass"] and "5 events lost" in result["fail_reasons"]
    assert result["expected"] == 50 and result["received"] == 45 and result["lost"] == 5
    assert result["comment_lines"] == 5 and result["duplicated"] == 0
    assert "Traceback" not in out.stderr


def test_loadgen_p99_limit_decides_the_verdict(tmp_path: Path) -> None:
    """Every event arrives 40 ms late: under --p99-limit 1000 that passes, under 20 not (1000, not
    ssebench's 100, so that a busy machine's own delays cannot turn the passing run into a failure)."""
    outs = []
    for limit in ("1000", "20"):
        with DroppingServer(drop=None, delay_s=0.04) as other:
            base = f"http://127.0.0.1:{other.port}"
            outs.append(
                cli(
                    "bench", "s1", "--sub-url", base + "/sub/{i}", "--pub-url", base + "/pub",
                    "-n", "3", "--rate", "10", "--duration", "0.5", "--settle", "0.1", "--drain", "0.5",
                    "--p99-limit", limit, "--json",
                    cwd=tmp_path,
                )
            )  # fmt: skip
    passed, failed = (json.loads(o.stdout) for o in outs)
    assert outs[0].returncode == 0 and passed["pass"], passed["fail_reasons"]
    assert passed["latency_corrected"]["p50_ms"] >= 40
    assert outs[1].returncode == 1 and not failed["pass"]
    assert [r for r in failed["fail_reasons"] if r.startswith("corrected p99")] == [
        f"corrected p99 {failed['latency_corrected']['p99_ms']:.1f} ms >= 20 ms"
    ]
    assert failed["lost"] == 0


def test_loadgen_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    out = cli(
        "bench",
        "s1",
        "--url",
        "http://127.0.0.1:9",
        "-n",
        "2",
        "--duration",
        "1",
        cwd=tmp_path,
        env={"SCRIBE_EVENTS_JWT_SECRET": SECRET},
    )
    assert out.returncode == 1
    assert "cannot reach 127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s1", "-n", "0"], "Invalid value"),
        (["s1", "--rate", "0"], "Invalid value"),
        (["s1", "--processes", "65"], "Invalid value"),
        (["s3", "--hold", "4000"], "Invalid value"),
        (["s1", "--rate", "1000000", "--duration", "3600"], "at most 10,000,000"),
        (["s1", "--sub-url", "http://127.0.0.1:9/sub/{i}"], "--pub-url"),
        (["s1", "--pub-body", '{"type":"bench.tick","broadcast":true}'], "{seq} and {ts}"),
        (["s1", "--sub-url", "ftp://x/{i}", "--pub-url", "http://x/p"], "not an http(s) URL"),
        (["s2", "--sub-header", "no colon here"], "not a header line"),
        (["publish", "--batch", "5000"], "more than the server takes"),
        (["s4", "--sub-url", "http://x/{i}", "--pub-url", "http://x/p", "--batch", "10"], "--batch"),
    ],
)
def test_loadgen_refuses_bad_input_with_exit_2(bench: Any, args: list[str], message: str) -> None:
    out = bench(*args, "--json")
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output
    assert not out.stdout.strip()  # no JSON: nothing ran


def test_loadgen_help_names_the_exit_codes(bench: Any) -> None:
    out = bench("s1", "--help")
    assert out.exit_code == 0 and "Exit code 0: PASS; 1: FAIL" in " ".join(out.stdout.split())


# --- the read path, byte by byte ---------------------------------------------------------------


def _frame(seq: int, ts: int) -> bytes:
    data = b'{"id":"%d","type":"bench.tick","data":{"ts":%d,"seq":%d,"run":77}}' % (seq, ts, seq)
    if seq == 2:  # another layout: another order, spaces, a number in a string
        data = b'{"seq": "%d", "run": 77, "ts": %d}' % (seq, ts)
    return b"id: %d\nevent: bench.tick\ndata: %s\n\n" % (seq, data)


def _chunked(payload: bytes) -> bytes:
    return b"%x;ext=1\r\n" % len(payload) + payload + b"\r\n"


def _feed(wire: bytes, cuts: list[list[int]]) -> list[Tally]:
    """Feed ``wire`` to a fresh subscriber once per way of cutting it into reads."""

    async def run() -> list[Tally]:
        tallies = []
        for cut in cuts:
            tally = Tally(run_digits=b"77")
            tally.start(Accounting(BROADCAST, time.time_ns(), 1e6, 1, b"", limit=10))
            sub = Subscriber(0, b"", tally, ready_on_head=False, track=True)
            for a, b in itertools.pairwise([0, *cut, len(wire)]):
                sub.data_received(wire[a:b])
            assert sub.error is None and sub.ready.done(), cut
            assert sub.seqs == [0, 1, 2, 3, 3] and sub.last_id == "3", cut
            tallies.append(tally)
        return tallies

    return asyncio.run(run())


def test_loadgen_receiver_reads_a_stream_cut_anywhere() -> None:
    ts = time.time_ns()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    payloads = [b"retry: 3000\nevent: connection.established\ndata: {}\n\n", b": ping\n\n"]
    payloads += [_frame(s, ts) for s in (0, 1)] + [_frame(2, ts) + _frame(3, ts) + _frame(3, ts)]
    wire = head + b"".join(_chunked(p) for p in payloads)
    rng = random.Random(7)
    cuts = [[], list(range(1, len(wire)))]
    cuts += [[c] for c in range(1, len(wire))]
    cuts += [sorted(rng.sample(range(1, len(wire)), 12)) for _ in range(40)]
    for tally in _feed(wire, cuts):
        assert (tally.received, tally.duplicated, tally.other, tally.comments) == (5, 1, 1, 1)
        assert list(tally.counts[:4]) == [1, 1, 1, 1]


def test_loadgen_receiver_reads_crlf_line_ends_unchunked() -> None:
    ts = time.time_ns()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    body = b"".join(_frame(s, ts) for s in (0, 1, 2, 3, 3)).replace(b"\n", b"\r\n")
    wire = head + body
    for tally in _feed(wire, [[cut] for cut in range(1, len(wire))] + [list(range(1, len(wire)))]):
        assert (tally.received, tally.duplicated) == (5, 1)


def test_loadgen_histogram_percentiles_are_within_a_bucket_of_exact() -> None:
    rng = random.Random(3)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)]
    h = stats.Histogram()
    for v in values:
        h.add(v)
    merged = stats.Histogram.from_wire(stats.Histogram().to_wire())
    merged.merge(h)
    summary = merged.summary()
    ordered = sorted(values)
    for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        exact = ordered[int(q * len(ordered) + 0.5) - 1] / 1000
        assert summary[name] == pytest.approx(exact, rel=0.003, abs=0.001)
    assert summary["max_ms"] == max(values) / 1000 and summary["count"] == len(values)
