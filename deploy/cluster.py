"""A local cluster: three scribe-events instances on PostgreSQL and Redis, Debian's nginx in front,
all on loopback.

    .venv/bin/python deploy/cluster.py [--instances 3] [--port 8100]

Needs PostgreSQL (SCRIBE_EVENTS_DATABASE_URL, default the local ``test`` database; a schema of its
own is made for the run), Redis (SCRIBE_EVENTS_REDIS_URL, default 127.0.0.1:6379, with a key prefix
of its own) and ``nginx`` on the PATH or in /usr/sbin. Prints the URL, an admin and a user token;
Ctrl-C stops everything and drops the schema. ``tests/test_deploy.py`` drives the same class.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import asyncpg
import httpx
import redis

from scribe_events.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).with_name("nginx.conf.template")
PG_URL = os.environ.get("SCRIBE_EVENTS_DATABASE_URL", "postgresql+asyncpg://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SCRIBE_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Cluster:
    """``instances`` servers behind nginx; ``restart(i)`` is a deploy of instance i (SIGTERM, start)."""

    def __init__(self, instances: int = 3, port: int | None = None, drain_window_s: float = 10.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = secrets.token_urlsafe(48)
        self.schema = "cluster_" + secrets.token_hex(6)
        self.prefix = f"cluster-{secrets.token_hex(4)}:"
        self.ports = [free_port() for _ in range(instances)]
        self.drain_window_s = drain_window_s
        self.folder = Path(tempfile.mkdtemp(prefix="scribe-cluster-"))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * instances
        self.nginx: subprocess.Popen[bytes] | None = None

    def env(self, i: int) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")},
            "SCRIBE_EVENTS_DATABASE_URL": PG_URL,
            "SCRIBE_EVENTS_DATABASE_SCHEMA": self.schema,
            "SCRIBE_EVENTS_REDIS_URL": REDIS_URL,
            "SCRIBE_EVENTS_REDIS_PREFIX": self.prefix,
            "SCRIBE_EVENTS_JWT_SECRET": self.secret,
            "SCRIBE_EVENTS_INSTANCE_ID": f"instance-{i}",
            "SCRIBE_EVENTS_PORT": str(self.ports[i]),
            "SCRIBE_EVENTS_TRUSTED_PROXIES": '["127.0.0.1"]',  # nginx
            "SCRIBE_EVENTS_DRAIN_WINDOW_S": str(self.drain_window_s),
            "SCRIBE_EVENTS_ACCESS_LOG": "false",
            "SCRIBE_EVENTS_LOG_LEVEL": "warning",
        }

    def token(self, user: str, roles: list[str] | None = None) -> str:
        return mint_token(self.secret, user, roles=roles or [], ttl_s=24 * 3600)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    def start(self) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        asyncio.run(_pg(f'CREATE SCHEMA "{self.schema}"'))
        se = str(ROOT / ".venv/bin/scribe-events")
        subprocess.run(
            [se, "db", "upgrade"], env=self.env(0), cwd=self.folder, check=True, capture_output=True
        )
        for i in range(len(self.ports)):
            self.start_instance(i)
        upstreams = "\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in self.ports
        )
        conf = (
            TEMPLATE.read_text()
            .replace("@PREFIX@", str(self.folder))
            .replace("@UPSTREAMS@", upstreams)
            .replace("@LISTEN@", f"127.0.0.1:{self.port}")
        )
        (self.folder / "nginx.conf").write_text(conf)
        with open(self.folder / "nginx.log", "ab") as log:
            self.nginx = subprocess.Popen(
                [binary, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"), "-g", "daemon off;"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait(self.url + "/health")

    def start_instance(self, i: int) -> None:
        with open(self.folder / f"instance-{i}.log", "ab") as log:  # the process keeps its own copy
            self.procs[i] = subprocess.Popen(
                [str(ROOT / ".venv/bin/scribe-events"), "serve"],
                env=self.env(i),
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait(f"http://127.0.0.1:{self.ports[i]}/health/ready")

    def restart(self, i: int, timeout: float = 60) -> float:
        """A deploy of instance i: SIGTERM, wait for it to exit, start it again; seconds it was away."""
        proc = self.procs[i]
        assert proc is not None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
        self.start_instance(i)
        return time.monotonic() - started

    def instance_of(self, name: str) -> int:
        return int(name.rsplit("-", 1)[1])

    def stop(self) -> None:
        for proc in [*self.procs, self.nginx]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.procs, self.nginx]:
            if proc is not None:
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(_pg(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
            for key in client.scan_iter(match=self.prefix + "*"):
                client.delete(key)
            client.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _wait(url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    with Cluster(args.instances, args.port) as cluster:
        print(f"nginx on {cluster.url} in front of instances on ports {', '.join(map(str, cluster.ports))}")
        print(f"admin token: {cluster.token('admin', ['admin'])}")
        print(
            f"try: curl -N -H 'Authorization: Bearer {cluster.token('alice')}' {cluster.url}/api/v1/events/stream"
        )
        print("Ctrl-C stops the cluster.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    sys.exit(main())
