"""How the reconnections of N clients spread over time when the instance they are on restarts.

    .venv/bin/python benchmarks/drain.py [clients=2000] [window_s=10]

Starts two ``scribe-events serve`` instances on the embedded defaults in a throw-away folder
(loopback only; the same secret). N clients hold a stream on the first, as the browser client does:
each reads its frames, and when the stream ends it waits for what the server said
(``connection.closing``'s ``reconnect_after_ms``, else 0) and reconnects to the second with its
Last-Event-ID. The first is sent SIGTERM. Prints one JSON line: how long the first took to exit,
when the clients came back (seconds after SIGTERM: p50, p99, max) and the most reconnections in any
100 ms, with SCRIBE_EVENTS_DRAIN_WINDOW_S as given (0: the old behaviour, everyone at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scribe_events.auth import mint_token

SECRET = "drain-secret-" + "x" * 48
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(folder: Path, port: int, window_s: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
        "SCRIBE_EVENTS_PORT": str(port),
        "SCRIBE_EVENTS_ACCESS_LOG": "false",
        "SCRIBE_EVENTS_LOG_LEVEL": "warning",
        "SCRIBE_EVENTS_DRAIN_WINDOW_S": str(window_s),
        "SCRIBE_EVENTS_RATE_LIMIT_STREAMS_PER_IP": "none",  # every client comes from 127.0.0.1
    }
    folder.mkdir()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/scribe-events"), "serve"], cwd=folder, env=env)
    for _ in range(100):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not start")


async def _stream(
    port: int, token: str, last_id: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    writer.write(
        f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{resume}\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
    return reader, writer


async def _client(i: int, first: int, second: int, ready: asyncio.Event, back: list[float]) -> None:
    token = mint_token(SECRET, f"u{i}", ttl_s=3600)
    reader, writer = await _stream(first, token, None)
    ready.set()
    after_ms, last_id = 0, None
    while line := await reader.readline():  # chunk sizes and frames alike; enough to find fields
        text = line.decode("utf-8", "replace").strip()
        if text.startswith("data: ") and '"reconnect_after_ms"' in text:
            after_ms = int(json.loads(text[6:])["reconnect_after_ms"])
        elif text.startswith("data: ") and '"last_event_id"' in text:
            last_id = json.loads(text[6:]).get("last_event_id")
    writer.close()
    await asyncio.sleep(after_ms / 1000)
    _, writer = await _stream(second, token, last_id)
    back.append(time.monotonic())
    writer.close()


async def main(clients: int, window_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        first, second = _free_port(), _free_port()
        a = _serve(Path(tmp) / "a", first, window_s)
        b = _serve(Path(tmp) / "b", second, window_s)
        try:
            back: list[float] = []
            readies = [asyncio.Event() for _ in range(clients)]
            tasks = []
            for i in range(clients):
                tasks.append(asyncio.create_task(_client(i, first, second, readies[i], back)))
                if i % 200 == 199:
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
            await asyncio.sleep(0.5)
            sigterm = time.monotonic()
            a.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), window_s + 60)
            exit_s = await asyncio.to_thread(a.wait, 60)
            exited = time.monotonic() - sigterm
            times = sorted(t - sigterm for t in back)
            buckets: dict[int, int] = {}
            for t in times:
                buckets[int(t * 10)] = buckets.get(int(t * 10), 0) + 1
            return {
                "clients": clients,
                "drain_window_s": window_s,
                "reconnected": len(times),
                "first_exit_code": exit_s,
                "first_exited_after_s": round(exited, 2),
                "back_p50_s": round(times[len(times) // 2], 2),
                "back_p99_s": round(times[int(len(times) * 0.99) - 1], 2),
                "back_max_s": round(times[-1], 2),
                "most_in_100ms": max(buckets.values()),
                "per_second": [
                    sum(n for k, n in buckets.items() if k // 10 == s) for s in range(int(times[-1]) + 1)
                ],
            }
        finally:
            for proc in (a, b):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    print(json.dumps(asyncio.run(main(n, window))))
