"""Events/s through the publisher SDK's batches (``EventPublisher.publish``: one request, an
Idempotency-Key, retries) against a running scribe-events; one JSON line of results.

    taskset -c 1 .venv/bin/python benchmarks/sdk_batch.py [URL] [batch=1000] [concurrency=4] [seconds=10]

The publisher token is minted with the local secret (SCRIBE_EVENTS_JWT_SECRET or the secret file).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from scribe_events.auth import ROLE_PUBLISHER, mint_token
from scribe_events.config import Settings
from scribe_events.sdk import EventPublisher


async def main(url: str, batch: int, concurrency: int, seconds: float) -> dict[str, object]:
    secret = Settings().signing_secret(create=False)
    if secret is None:
        raise SystemExit("no JWT secret: set SCRIBE_EVENTS_JWT_SECRET")
    token = mint_token(secret, "bench-sdk", roles=[ROLE_PUBLISHER], ttl_s=3600)
    latencies: list[float] = []
    sent = 0

    async def worker(w: int, events: EventPublisher) -> None:
        nonlocal sent
        seq = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            body = [
                {"type": "bench.sdk", "user_id": f"u{(seq + i) % 1000}", "data": {"w": w, "seq": seq + i}}
                for i in range(batch)
            ]
            started = time.perf_counter()
            ids = await events.publish(body)
            latencies.append(time.perf_counter() - started)
            sent += len(ids)
            seq += batch

    async with EventPublisher(url, token=token) as events:
        await events.publish([{"type": "bench.sdk", "broadcast": True}])  # warm: connect, verify once
        started = time.perf_counter()
        await asyncio.gather(*(worker(w, events) for w in range(concurrency)))
        took = time.perf_counter() - started
    latencies.sort()
    return {
        "label": "sdk batches",
        "batch": batch,
        "concurrency": concurrency,
        "events": sent,
        "seconds": round(took, 2),
        "events_per_s": round(sent / took),
        "requests": len(latencies),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "retries": events.retries,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    result = asyncio.run(
        main(
            args[0] if args else "http://127.0.0.1:8000",
            int(args[1]) if len(args) > 1 else 1000,
            int(args[2]) if len(args) > 2 else 4,
            float(args[3]) if len(args) > 3 else 10.0,
        )
    )
    print(json.dumps(result))
