"""Overload one instance with task progress and see what adaptive load does for the events that matter.

    .venv/bin/python benchmarks/overload.py [adaptive=on|off] [seconds=20] [streams=600] [publishers=6]

Starts ``scribe-events serve`` on the embedded defaults in a throw-away folder (loopback only, the
server on CPU 0 when ``taskset`` exists). ``streams`` users hold a stream each; each of 30 tasks is
read by ``streams / 30`` of them. ``publishers`` workers publish progress updates of every task as
fast as the server takes them (30 per request), while a broadcast ``system.notification`` carrying
its send time goes out every 100 ms: the important event, whose latency and loss are measured at
every stream. At the end every task completes with progress 100, and each reader must have seen
the completion and, before it, the latest progress. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scribe_events.auth import mint_token

SECRET = "overload-secret-" + "x" * 48
ROOT = Path(__file__).resolve().parent.parent
TASKS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reader:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.notes: set[int] = set()
        self.progress: dict[str, float] = {}
        self.last_before_done: dict[str, float] = {}
        self.completed: set[str] = set()
        self.updates = 0


async def _read(port: int, user: str, reader_state: Reader, ready: asyncio.Event) -> None:
    token = mint_token(SECRET, user, ttl_s=3600)
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    w.write(
        f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await r.readuntil(b"\r\n\r\n")
    ready.set()
    event = ""
    try:
        while line := await r.readline():
            if line.startswith(b"event: "):
                event = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                if event == "system.notification":
                    data = json.loads(line[6:])["data"]
                    reader_state.latencies.append(time.time() - data["sent"])
                    reader_state.notes.add(data["n"])
                elif event == "task.progress-updated":
                    data = json.loads(line[6:])["data"]
                    reader_state.progress[data["task_id"]] = data["progress"]
                    reader_state.updates += 1
                elif event == "task.progress-completed":
                    task = json.loads(line[6:])["data"]["task_id"]
                    reader_state.completed.add(task)
                    reader_state.last_before_done[task] = reader_state.progress.get(task, -1)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def main(adaptive: bool, seconds: float, streams: int, publishers: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {
            **os.environ,
            "SCRIBE_EVENTS_JWT_SECRET": SECRET,
            "SCRIBE_EVENTS_PORT": str(port),
            "SCRIBE_EVENTS_ACCESS_LOG": "false",
            "SCRIBE_EVENTS_LOG_LEVEL": "warning",
            "SCRIBE_EVENTS_ADAPTIVE_LOAD": "true" if adaptive else "false",
            "SCRIBE_EVENTS_RATE_LIMIT_STREAMS_PER_IP": "none",
        }
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        proc = subprocess.Popen([*pin, str(ROOT / ".venv/bin/scribe-events"), "serve"], cwd=tmp, env=env)
        base = f"http://127.0.0.1:{port}"
        pub = {"Authorization": f"Bearer {mint_token(SECRET, 'worker', roles=['publisher'], ttl_s=3600)}"}
        try:
            async with httpx.AsyncClient(base_url=base, headers=pub, timeout=60) as http:
                for _ in range(100):
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
                per_task = streams // TASKS
                starts = [
                    {
                        "type": "task.progress-started",
                        "task_id": f"t{t}",
                        "data": {
                            "task_id": f"t{t}",
                            "owner": f"u{t * per_task}",
                            "readers": [f"u{t * per_task + i}" for i in range(1, per_task)],
                        },
                    }
                    for t in range(TASKS)
                ]
                assert (await http.post("/api/v1/events", json={"events": starts})).status_code == 202
                states = [Reader() for _ in range(streams)]
                readies = [asyncio.Event() for _ in range(streams)]
                readers = [
                    asyncio.create_task(_read(port, f"u{i}", states[i], readies[i])) for i in range(streams)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
                stop = time.monotonic() + seconds
                sent_notes = 0
                progress = [0.0]
                published = [0]
                refused: dict[int, int] = {}

                async def flood() -> None:
                    while time.monotonic() < stop:
                        progress[0] = min(99.0, progress[0] + 0.01)
                        p = round(progress[0], 2)
                        batch = [
                            {
                                "type": "task.progress-updated",
                                "task_id": f"t{t}",
                                "data": {"task_id": f"t{t}", "progress": p},
                            }
                            for t in range(TASKS)
                        ]
                        r = await http.post("/api/v1/events", json={"events": batch})
                        if r.status_code == 202:
                            published[0] += TASKS
                        else:
                            refused[r.status_code] = refused.get(r.status_code, 0) + 1
                            await asyncio.sleep(0.05)

                async def notes() -> None:
                    nonlocal sent_notes
                    while time.monotonic() < stop:
                        data = {
                            "level": "info",
                            "title": "tick",
                            "message": "m",
                            "n": sent_notes,
                            "sent": time.time(),
                        }
                        r = await http.post(
                            "/api/v1/events",
                            json={"type": "system.notification", "broadcast": True, "data": data},
                        )
                        assert r.status_code == 202, r.text
                        sent_notes += 1
                        await asyncio.sleep(0.1)

                cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
                await asyncio.gather(notes(), *(flood() for _ in range(publishers)))
                cpu = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
                metrics = (await http.get("/metrics")).text
                level_changes = [
                    x for x in metrics.splitlines() if x.startswith("scribe_events_load_level_changes_total")
                ]
                done = [
                    {"type": "task.progress-completed", "task_id": f"t{t}", "data": {"task_id": f"t{t}"}}
                    for t in range(TASKS)
                ]
                final = [
                    {
                        "type": "task.progress-updated",
                        "task_id": f"t{t}",
                        "data": {"task_id": f"t{t}", "progress": 100},
                    }
                    for t in range(TASKS)
                ]
                assert (await http.post("/api/v1/events", json={"events": final})).status_code == 202
                assert (await http.post("/api/v1/events", json={"events": done})).status_code == 202
                await asyncio.sleep(3)
                for t in readers:
                    t.cancel()
                lat = sorted(x for s in states for x in s.latencies)
                missing_notes = sum(sent_notes - len(s.notes) for s in states)
                incomplete = sum(1 - len(s.completed) for s in states)  # each reads one task
                wrong_last = sum(1 for s in states for v in s.last_before_done.values() if v != 100)
                return {
                    "adaptive": adaptive,
                    "seconds": seconds,
                    "streams": streams,
                    "progress_published_per_s": round(published[0] / seconds),
                    "progress_delivered_per_s": round(sum(s.updates for s in states) / seconds),
                    "refused_publishes": refused,
                    "notifications_sent": sent_notes,
                    "notifications_missing": missing_notes,
                    "notification_latency_ms": {
                        "p50": round(lat[len(lat) // 2] * 1000, 1),
                        "p99": round(lat[int(len(lat) * 0.99)] * 1000, 1),
                        "max": round(lat[-1] * 1000, 1),
                    },
                    "completions_missing": incomplete,
                    "last_progress_not_100": wrong_last,
                    "server_cpu": round(cpu * 100, 1),
                    "load_level_changes": level_changes[0].rsplit(" ", 1)[1] if level_changes else None,
                }
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    args = sys.argv[1:]
    on = (args[0] if args else "on") == "on"
    print(
        json.dumps(
            asyncio.run(
                main(
                    on,
                    float(args[1]) if len(args) > 1 else 20.0,
                    int(args[2]) if len(args) > 2 else 600,
                    int(args[3]) if len(args) > 3 else 6,
                )
            )
        )
    )
