"""``bench``: load against a running server (s1, s2, s3, s4, publish) and the store's own bench.

A thin adapter: the options become a :class:`~scribe_events.loadgen.target.Target` and a
:class:`~scribe_events.loadgen.Run`, a scenario of :mod:`scribe_events.loadgen` runs, and its result
is printed as one JSON object or a table. Exit code 0: PASS; 1: FAIL, or the run could not happen;
2: bad input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text
from scribe_events_cli.common import (
    console,
    dumps,
    err_console,
    fail,
    friendly,
    literal,
    load_settings,
    visible,
)

from scribe_events import loadgen
from scribe_events.config import Settings
from scribe_events.loadgen.common import P99_LIMIT_MS
from scribe_events.loadgen.fanout import fanout
from scribe_events.loadgen.idle import idle
from scribe_events.loadgen.resume import resume
from scribe_events.loadgen.summary import describe
from scribe_events.loadgen.target import BROADCAST_BODY, TARGETED_BODY, Target, specs
from scribe_events.loadgen.throughput import throughput

bench_app = typer.Typer(
    help="Benchmarks: load against a running server (s1 s2 s3 s4 publish), and the store's own (store).",
    no_args_is_help=True,
)

MAX_MESSAGES = 10_000_000  # per run: the per-seq tables of a run are arrays of this length
MAX_SEEN = 1_000_000_000  # subscribers x messages in a broadcast: a byte each to catch duplicates
TOKEN_MARGIN_S = 7200  # tokens outlive the run by this much (an expired token ends a stream)

Scenario = Callable[[loadgen.Progress | None], Coroutine[Any, Any, dict[str, Any]]]


class Ready(StrEnum):
    auto = "auto"
    headers = "headers"
    frame = "frame"


Url = Annotated[str | None, typer.Option("--url", help="Server URL (env SCRIBE_EVENTS_URL).")]
Token = Annotated[
    str | None, typer.Option("--token", help="Publisher token (env SCRIBE_EVENTS_TOKEN); default: minted.")
]
Subscribers = Annotated[int, typer.Option("--subscribers", "-n", min=1, max=100_000, help="Streams to open.")]
Users = Annotated[
    int | None,
    typer.Option(
        min=1, max=100_000, help="Distinct users u0..; subscriber i is u{i mod users} (default: one each)."
    ),
]
Duration = Annotated[float, typer.Option(min=0.1, max=3600, help="Seconds of publishing.")]
Rate = Annotated[float, typer.Option(min=0.001, max=1_000_000, help="Messages published per second.")]
Processes = Annotated[
    int,
    typer.Option(min=1, max=64, help="Worker processes the subscribers are split over (own event loops)."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")]
Pid = Annotated[
    int | None,
    typer.Option(
        "--pid",
        min=1,
        help="The server's process, for its CPU and RSS (default: the one listening on the port).",
    ),
]
Label = Annotated[str, typer.Option(help="A label for the report.")]
SubUrl = Annotated[
    str | None,
    typer.Option(
        help="Another SSE server: stream URL template ({i} subscriber index, {user}), e.g. Nchan's."
    ),
]
SubHeader = Annotated[
    list[str] | None,
    typer.Option("--sub-header", help="Stream request header 'Name: value' ({i}, {user}); repeatable."),
]
PubUrl = Annotated[
    str | None, typer.Option(help="Another server: publish URL template ({i}, {user}, {seq}, ...).")
]
PubBody = Annotated[
    str | None,
    typer.Option(help="Publish body template: {seq} {ts} (send time, ns) {sched} {i} {user} {run}."),
]
PubHeader = Annotated[
    list[str] | None, typer.Option("--pub-header", help="Publish request header 'Name: value'; repeatable.")
]
PubConns = Annotated[int, typer.Option(min=1, max=10_000, help="Keep-alive publishing connections.")]
ReadyOpt = Annotated[
    Ready,
    typer.Option(
        help="When a stream counts as connected: the 200 head, or its first frame "
        "(auto: frame for scribe-events, headers with --sub-url)."
    ),
]
Settle = Annotated[float, typer.Option(min=0, max=60, help="Pause after everyone connected, seconds.")]
Drain = Annotated[
    float, typer.Option(min=0, max=300, help="Wait for stragglers after the last publish, seconds.")
]
P99Limit = Annotated[
    float,
    typer.Option(
        "--p99-limit",
        min=1,
        max=600_000,
        help="PASS needs the corrected p99 under this, ms (ssebench's: 100).",
    ),
]


@contextmanager
def _errors() -> Iterator[None]:
    """The load generator's errors as one red line: exit code 2 for bad input, 1 otherwise."""
    try:
        yield
    except loadgen.BadInput as exc:
        raise fail(exc.message, 2) from None
    except loadgen.LoadgenError as exc:
        raise fail(exc.message) from None


def _target(
    settings: Settings,
    *,
    sub_url: str | None = None,
    sub_header: list[str] | None = None,
    pub_url: str | None = None,
    pub_body: str | None = None,
    pub_header: list[str] | None = None,
    token: str | None = None,
    ready: Ready = Ready.auto,
) -> Target:
    return Target(
        settings,
        sub_url=sub_url,
        sub_headers=tuple(sub_header or ()),
        pub_url=pub_url,
        pub_body=pub_body,
        pub_headers=tuple(pub_header or ()),
        token=token,
        ready=None if ready is Ready.auto else ready.value,
    )


def _specs(target: Target, **kw: Any) -> tuple[loadgen.SubscriberSpec, loadgen.PublishSpec]:
    with _errors():
        return specs(target, **kw)


def _go(as_json: bool, counting: str, scenario: Scenario) -> None:
    """Run a scenario (a transient progress bar on a terminal's stderr), print its result, and exit
    1 when it failed."""
    with _errors():
        if as_json or not err_console.is_terminal:
            result = loadgen.run(scenario(None))
        else:
            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[clock]}"),
                TextColumn("{task.fields[received]:,} " + counting),
            )
            with Progress(*columns, console=err_console, transient=True) as bar:
                task = bar.add_task("connecting", total=None, received=0, clock="")

                def progress(elapsed: float, planned: float, received: int) -> None:
                    bar.update(
                        task,
                        description="running",
                        completed=min(elapsed, planned),
                        total=planned,
                        received=received,
                        clock=f"{min(elapsed, planned):.0f}/{planned:.0f} s",
                    )

                result = loadgen.run(scenario(progress))
    if as_json:
        print(dumps(result))
    else:
        title, rows = describe(result)
        table = Table(title=literal(title), show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        for name, text in rows:
            table.add_row(name, literal(text))
        console.print(table)
        verdict = Text("PASS", style="bold green") if result["pass"] else Text("FAIL", style="bold red")
        reasons = "; ".join(result["fail_reasons"])
        console.print(Text.assemble(verdict, f"  {visible(reasons)}" if reasons else ""), soft_wrap=True)
    if not result["pass"]:
        raise typer.Exit(1)


def _check_size(subscribers: int, messages: float, broadcast: bool) -> None:
    if messages > MAX_MESSAGES:
        raise fail(f"that plans {messages:,.0f} messages; at most {MAX_MESSAGES:,} a run", 2)
    if broadcast and messages * subscribers > MAX_SEEN:
        raise fail(f"{subscribers:,} subscribers x {messages:,.0f} messages is too much to track", 2)


def _max_batch(settings: Settings, batch: int) -> None:
    if batch > settings.max_batch_events:
        raise fail(
            f"--batch {batch} is more than the server takes per request ({settings.max_batch_events})", 2
        )


@bench_app.command("s1")
@friendly
def s1(
    subscribers: Subscribers = 1000,
    rate: Rate = 50.0,
    duration: Duration = 15.0,
    users: Users = None,
    processes: Processes = 1,
    pub_conns: PubConns = 32,
    url: Url = None,
    token: Token = None,
    sub_url: SubUrl = None,
    sub_header: SubHeader = None,
    pub_url: PubUrl = None,
    pub_body: PubBody = None,
    pub_header: PubHeader = None,
    ready: ReadyOpt = Ready.auto,
    settle: Settle = 1.0,
    drain: Drain = 5.0,
    p99_limit: P99Limit = P99_LIMIT_MS,
    pid: Pid = None,
    label: Label = "",
    as_json: AsJson = False,
) -> None:
    """S1 broadcast: N subscribers; publish at --rate msg/s to all of them; every one must get every message.

    PASS when nothing is lost or failed, the publish rate held (98 %) and the p99 latency from each
    message's scheduled time is under 100 ms (ssebench's rule; --p99-limit to change it).

    Exit code 0: PASS; 1: FAIL, or the run could not happen (server unreachable, nobody connected); 2: bad input.
    """
    _fanout(True, locals())


@bench_app.command("s2")
@friendly
def s2(
    subscribers: Subscribers = 1000,
    rate: Rate = 2000.0,
    duration: Duration = 15.0,
    processes: Processes = 1,
    pub_conns: PubConns = 32,
    url: Url = None,
    token: Token = None,
    sub_url: SubUrl = None,
    sub_header: SubHeader = None,
    pub_url: PubUrl = None,
    pub_body: PubBody = None,
    pub_header: PubHeader = None,
    ready: ReadyOpt = Ready.auto,
    settle: Settle = 1.0,
    drain: Drain = 5.0,
    p99_limit: P99Limit = P99_LIMIT_MS,
    pid: Pid = None,
    label: Label = "",
    as_json: AsJson = False,
) -> None:
    """S2 targeted: N subscribers, each its own user; each message to one random subscriber, once.

    PASS as for s1, and no event may reach a subscriber it was not addressed to.

    Exit code 0: PASS; 1: FAIL, or the run could not happen (server unreachable, nobody connected); 2: bad input.
    """
    _fanout(False, {**locals(), "users": None})


def _fanout(broadcast: bool, o: dict[str, Any]) -> None:
    settings = load_settings(url=o["url"])
    n = o["subscribers"]
    _check_size(n, o["rate"] * o["duration"], broadcast)
    keys = ("sub_url", "sub_header", "pub_url", "pub_body", "pub_header", "token", "ready")
    sub, pub = _specs(
        _target(settings, **{k: o[k] for k in keys}),
        users=o["users"] or n,
        default_body=BROADCAST_BODY if broadcast else TARGETED_BODY,
        ttl_s=int(o["duration"]) + TOKEN_MARGIN_S,
        connections=o["pub_conns"],
    )

    def scenario(progress: loadgen.Progress | None) -> Coroutine[Any, Any, dict[str, Any]]:
        run = loadgen.Run(
            sub, pub, n, o["processes"], o["label"], o["pid"], o["settle"], o["drain"], progress=progress
        )
        return fanout(
            run, broadcast=broadcast, rate=o["rate"], duration_s=o["duration"], p99_limit_ms=o["p99_limit"]
        )

    _go(o["as_json"], "events", scenario)


@bench_app.command("s3")
@friendly
def s3(
    subscribers: Subscribers = 1000,
    hold: Annotated[float, typer.Option(min=0, max=3600, help="Seconds to hold the streams open.")] = 10.0,
    users: Users = None,
    processes: Processes = 1,
    url: Url = None,
    sub_url: SubUrl = None,
    sub_header: SubHeader = None,
    ready: ReadyOpt = Ready.auto,
    settle: Settle = 1.0,
    pid: Pid = None,
    label: Label = "",
    as_json: AsJson = False,
) -> None:
    """S3 idle: open N streams, time until all are connected, hold them; the server's KiB per stream.

    PASS when every stream connected and was still open at the end.

    Exit code 0: PASS; 1: FAIL, or the run could not happen (server unreachable, nobody connected); 2: bad input.
    """
    settings = load_settings(url=url)
    sub, pub = _specs(
        _target(settings, sub_url=sub_url, sub_header=sub_header, ready=ready),
        users=users or subscribers,
        default_body=BROADCAST_BODY,
        ttl_s=int(hold) + TOKEN_MARGIN_S,
        publishing=False,
    )

    def scenario(progress: loadgen.Progress | None) -> Coroutine[Any, Any, dict[str, Any]]:
        run = loadgen.Run(sub, pub, subscribers, processes, label, pid, settle, progress=progress)
        return idle(run, hold_s=hold)

    _go(as_json, "streams open", scenario)


@bench_app.command("s4")
@friendly
def s4(
    subscribers: Annotated[
        int, typer.Option("--subscribers", "-n", min=1, max=10_000, help="Subscribers, each its own user.")
    ] = 10,
    before: Annotated[
        int, typer.Option(min=1, max=100_000, help="Events each receives before disconnecting.")
    ] = 5,
    missed: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Events published to each while it is away.")
    ] = 20,
    batch: Annotated[
        int | None,
        typer.Option(
            min=1, max=100_000, help="Events per publish request (default: the server's max batch)."
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option(min=0.1, max=3600, help="Seconds to wait for the missed events.")
    ] = 60.0,
    away: Annotated[float, typer.Option(min=0, max=60, help="Pause after disconnecting, seconds.")] = 0.5,
    pub_conns: PubConns = 10,
    url: Url = None,
    token: Token = None,
    sub_url: SubUrl = None,
    sub_header: SubHeader = None,
    pub_url: PubUrl = None,
    pub_body: PubBody = None,
    pub_header: PubHeader = None,
    ready: ReadyOpt = Ready.auto,
    settle: Settle = 0.5,
    pid: Pid = None,
    label: Label = "",
    as_json: AsJson = False,
) -> None:
    """S4 resume: receive --before events, disconnect, --missed are published meanwhile, reconnect
    with Last-Event-ID; time until all missed events arrived.

    Missed events go in batches ({"events": [...]}) to scribe-events, one at a time with --pub-url.
    PASS when each subscriber got every missed event once and in order, nothing it had seen came
    again, and a live event after them arrived too.

    Exit code 0: PASS; 1: FAIL, or the run could not happen (server unreachable, nobody connected); 2: bad input.
    """
    settings = load_settings(url=url)
    _check_size(subscribers, subscribers * (before + missed), False)
    if pub_url is not None and batch not in (None, 1):
        raise fail('--batch needs scribe-events\' {"events": [...]}; not with --pub-url', 2)
    size = 1 if pub_url is not None else batch or settings.max_batch_events
    _max_batch(settings, size)
    target = _target(
        settings,
        sub_url=sub_url,
        sub_header=sub_header,
        pub_url=pub_url,
        pub_body=pub_body,
        pub_header=pub_header,
        token=token,
        ready=ready,
    )
    sub, pub = _specs(
        target,
        users=subscribers,
        default_body=TARGETED_BODY,
        ttl_s=int(wait) + TOKEN_MARGIN_S,
        connections=pub_conns,
    )

    def scenario(progress: loadgen.Progress | None) -> Coroutine[Any, Any, dict[str, Any]]:
        run = loadgen.Run(sub, pub, subscribers, 1, label, pid, settle, progress=progress)
        return resume(run, before=before, missed=missed, batch=size, wait_s=wait, away_s=away)

    _go(as_json, "missed events back", scenario)


@bench_app.command("publish")
@friendly
def publish(
    concurrency: Annotated[
        int, typer.Option(min=1, max=10_000, help="Keep-alive publishing connections.")
    ] = 32,
    batch: Annotated[
        int, typer.Option(min=1, max=100_000, help='Events per request (more than 1: {"events": [...]}).')
    ] = 1,
    duration: Duration = 10.0,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, max=1_000_000, help="Events/s in total (default: as fast as answers come)."),
    ] = None,
    subscribers: Annotated[
        int,
        typer.Option("--subscribers", "-n", min=0, max=100_000, help="Also deliver to this many streams."),
    ] = 0,
    users: Annotated[
        int, typer.Option(min=1, max=100_000, help="Users the events go to, when there are no subscribers.")
    ] = 100,
    processes: Processes = 1,
    url: Url = None,
    token: Token = None,
    sub_url: SubUrl = None,
    sub_header: SubHeader = None,
    pub_url: PubUrl = None,
    pub_body: PubBody = None,
    pub_header: PubHeader = None,
    ready: ReadyOpt = Ready.auto,
    settle: Settle = 1.0,
    drain: Drain = 5.0,
    pid: Pid = None,
    label: Label = "",
    as_json: AsJson = False,
) -> None:
    """Publish throughput: --concurrency connections send single events (or --batch K) as fast as
    they are answered, or at --rate; accepted requests/s and events/s, statuses, latency.

    With --subscribers, event seq goes to subscriber seq mod N and must arrive there once.
    PASS when every request was accepted (and the rate held, and nothing was lost).

    Exit code 0: PASS; 1: FAIL, or the run could not happen (server unreachable, nobody connected); 2: bad input.
    """
    settings = load_settings(url=url)
    if pub_url is None:
        _max_batch(settings, batch)
    if rate is not None:
        _check_size(subscribers, rate * duration, False)
    target = _target(
        settings,
        sub_url=sub_url,
        sub_header=sub_header,
        pub_url=pub_url,
        pub_body=pub_body,
        pub_header=pub_header,
        token=token,
        ready=ready,
    )
    sub, pub = _specs(
        target,
        users=subscribers or users,
        default_body=TARGETED_BODY,
        ttl_s=int(duration) + TOKEN_MARGIN_S,
        connections=concurrency,
        subscribing=subscribers > 0,
    )

    def scenario(progress: loadgen.Progress | None) -> Coroutine[Any, Any, dict[str, Any]]:
        run = loadgen.Run(sub, pub, subscribers, processes, label, pid, settle, drain, progress=progress)
        return throughput(run, batch=batch, duration_s=duration, rate=rate)

    _go(as_json, "events delivered" if subscribers else "events accepted", scenario)


# --- the store's own benchmark ---------------------------------------------------------------


@bench_app.command("store")
@friendly
def bench_store(
    database_url: Annotated[
        str | None, typer.Option(help="A PostgreSQL or SQLite URL (default: a temp SQLite file).")
    ] = None,
    lone: Annotated[int, typer.Option(min=1, help="Events published one at a time.")] = 500,
    events: Annotated[int, typer.Option(min=1, help="Events published under load.")] = 20_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent publishers under load.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Events/s stored with group commit: a lone publisher, and many at once (on a throw-away database)."""
    from scribe_events.bench import store_bench

    result = asyncio.run(store_bench(database_url, lone=lone, events=events, concurrency=concurrency))
    if as_json:
        print(dumps(result))
        return
    table = Table(title=literal(f"group commit on {result['store']}"))
    for column in ("load", "events", "events/s", "p50 ms", "p99 ms", "events/batch"):
        table.add_column(column, justify="right")
    a, b = result["lone"], result["loaded"]
    table.add_row(
        "lone (1 at a time)",
        str(a["events"]),
        f"{a['events_per_s']:,.0f}",
        f"{a['p50_ms']:.2f}",
        f"{a['p99_ms']:.2f}",
        "1",
    )
    table.add_row(
        f"{b['concurrency']} concurrent",
        str(b["events"]),
        f"{b['events_per_s']:,.0f}",
        f"{b['p50_ms']:.2f}",
        f"{b['p99_ms']:.2f}",
        f"{b['events_per_batch']:.1f}",
    )
    console.print(table)
