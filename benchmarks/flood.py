"""10,000 stream attempts from one address and one user, while another user connects and receives.

    .venv/bin/python benchmarks/flood.py [attempts=10000] [concurrency=500]

Starts ``scribe-events serve`` on the embedded defaults in a throw-away folder (loopback only),
then one user ("mallory") opens streams as fast as it can, holding the ones it gets, while another
("alice") connects once the flood is under way and must receive an event. Prints one JSON line:
how many of mallory's attempts were accepted and refused (429), how long alice waited for her
stream and for her event, and the server's RSS. Bounded: it stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scribe_events.auth import mint_token

SECRET = "flood-secret-" + "x" * 48
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _open(port: int, token: str) -> tuple[int, asyncio.StreamWriter | None]:
    """Open a stream; returns its status and, if 200, the writer to keep it open."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    writer.write(
        f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return status, writer
    writer.close()
    return status, None


async def _alice(port: int, base: str, publisher: str, started: asyncio.Event) -> dict[str, float]:
    await started.wait()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    token = mint_token(SECRET, "alice", ttl_s=600)
    writer.write(
        f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    connected = time.monotonic() - t0
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    await asyncio.wait_for(reader.readuntil(b"connection.established"), 30)
    async with httpx.AsyncClient() as client:
        t1 = time.monotonic()
        r = await client.post(
            base + "/api/v1/events",
            json={"type": "custom.hello", "user_id": "alice", "data": {}},
            headers={"Authorization": f"Bearer {publisher}"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
    await asyncio.wait_for(reader.readuntil(b"custom.hello"), 30)
    received = time.monotonic() - t1
    writer.close()
    return {"alice_connect_s": round(connected, 3), "alice_event_s": round(received, 3)}


async def flood(port: int, attempts: int, concurrency: int) -> dict[str, object]:
    base = f"http://127.0.0.1:{port}"
    token = mint_token(SECRET, "mallory", ttl_s=600)
    publisher = mint_token(SECRET, "worker", roles=["publisher"], ttl_s=600)
    statuses: dict[str, int] = {}
    held: list[asyncio.StreamWriter] = []
    started = asyncio.Event()
    gate = asyncio.Semaphore(concurrency)
    alice = asyncio.ensure_future(_alice(port, base, publisher, started))

    async def one(n: int) -> None:
        async with gate:
            if n == attempts // 10:
                started.set()  # alice comes in while the flood is under way
            try:
                status, writer = await _open(port, token)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if writer is not None:
                held.append(writer)

    t0 = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(attempts)))
    seconds = time.monotonic() - t0
    result = await asyncio.wait_for(alice, 60)
    for w in held:
        w.close()
    return {"attempts": attempts, "statuses": statuses, "flood_s": round(seconds, 2), **result}


def main() -> None:
    attempts = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")},
        "SCRIBE_EVENTS_JWT_SECRET": SECRET,
        "SCRIBE_EVENTS_ACCESS_LOG": "false",
        "SCRIBE_EVENTS_LOG_LEVEL": "error",
        "SCRIBE_EVENTS_PORT": str(port),
    }
    with tempfile.TemporaryDirectory() as work:
        server = subprocess.Popen(
            [str(ROOT / ".venv/bin/scribe-events"), "serve"],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            rss_before = _rss_kib(server.pid)
            out = asyncio.run(flood(port, attempts, concurrency))
            out["server_rss_kib_before"] = rss_before
            out["server_rss_kib_after"] = _rss_kib(server.pid)
            print(json.dumps(out))
        finally:
            server.terminate()
            server.wait(15)


if __name__ == "__main__":
    main()
