"""The command line as a newcomer uses it: serve on the embedded defaults, curl, publish, tail."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest

from tests.harness import ProcessServer, cli, wait_for


def _lines_of(proc: subprocess.Popen[str], into: list[str]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _spawn(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out: list[str] = []
    _lines_of(proc, out)
    return proc, out


def _end(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def test_cli_first_run_curl_line_shows_stream_and_published_events(tmp_path: Path) -> None:
    server = ProcessServer(tmp_path, args=["--heartbeat", "0.5"]).start()  # on a socket we hold
    port = server.port
    try:
        text = server.text()
        assert f"http://127.0.0.1:{port}/" in text
        curl_line = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl -N"))
        assert (tmp_path / "scribe-events.db").exists() and (tmp_path / "scribe-events.secret").exists()

        curl, curl_out = _spawn(["bash", "-c", f"exec {curl_line}"], tmp_path)
        url = ["--url", server.url]
        tail, tail_out = _spawn(
            [sys.executable, "-m", "scribe_events_cli", "tail", "--user", "demo", "--json", *url], tmp_path
        )
        try:
            wait_for(lambda: any("connection.established" in line for line in tail_out), timeout=10)
            wait_for(lambda: sum("event: heartbeat" in line for line in curl_out) >= 2, timeout=10)
            published = cli(
                "publish",
                "system.notification",
                "--user",
                "demo",
                "--data",
                '{"level": "info", "title": "Hello", "message": "It works"}',
                *url,
                cwd=tmp_path,
            )
            assert published.returncode == 0, published.stderr
            event_id = re.search(r"id=(\d+)", published.stdout).group(1)  # type: ignore[union-attr]
            wait_for(lambda: any("system.notification" in line for line in curl_out), timeout=5)
            wait_for(lambda: any("system.notification" in line for line in tail_out), timeout=5)
        finally:
            _end(curl)
            _end(tail)
        body = "".join(curl_out)
        assert body.startswith("retry: 3000\nevent: connection.established\ndata: {")
        assert f"id: {event_id}\nevent: system.notification\n" in body
        events = [json.loads(line) for line in tail_out]
        assert events[0]["type"] == "connection.established"
        [note] = [e for e in events if e["type"] == "system.notification"]
        assert note["id"] == event_id and note["data"]["title"] == "Hello"
    finally:
        server.stop()
        server.close()


def test_cli_tail_resumes_with_last_event_id_across_a_restart(tmp_path: Path) -> None:
    server = ProcessServer(tmp_path).start()  # the test holds the socket: the restart gets it back
    url = ["--url", server.url]
    tail, tail_out = _spawn(
        [sys.executable, "-m", "scribe_events_cli", "tail", "--user", "demo", "--json", *url], tmp_path
    )
    try:
        wait_for(lambda: any("connection.established" in line for line in tail_out), timeout=10)
        assert (
            cli(
                "publish", "custom.step", "--user", "demo", "--data", '{"n": 1}', *url, cwd=tmp_path
            ).returncode
            == 0
        )
        wait_for(lambda: any('"n": 1' in line for line in tail_out), timeout=5)
        server.stop()
        server.start()
        # Published before tail is back: it must arrive by replay, exactly once.
        for n in (2, 3):
            assert (
                cli(
                    "publish", "custom.step", "--user", "demo", "--data", f'{{"n": {n}}}', *url, cwd=tmp_path
                ).returncode
                == 0
            )
        wait_for(lambda: any('"n": 3' in line for line in tail_out), timeout=15)
        time.sleep(0.3)
    finally:
        _end(tail)
        server.stop()
        server.close()
    steps = [json.loads(line)["data"]["n"] for line in tail_out if '"custom.step"' in line]
    assert steps == [1, 2, 3]
    hellos = [json.loads(line)["data"] for line in tail_out if "connection.established" in line]
    assert len(hellos) == 2 and hellos[1]["resumed_from"] is not None


def test_cli_token_mints_with_the_local_secret(tmp_path: Path) -> None:
    (tmp_path / "scribe-events.secret").write_text("s" * 64 + "\n")
    out = cli("token", "--user", "ana", "--session", "s9", "--role", "publisher", "--ttl", "60", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), "s" * 64, algorithms=["HS256"])
    assert claims["sub"] == "ana" and claims["sid"] == "s9" and claims["roles"] == ["publisher"]
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "--user", "u", "--role", "wizard"], "unknown role"),
        (["token", "--user", "u"], "no secret"),
        (["publish", "custom.a", "--user", "u", "--data", "{oops", "--token", "t"], "not valid JSON"),
        (
            ["publish", "custom.a", "--user", "u", "--token", "t", "--url", "http://127.0.0.1:9"],
            "cannot reach",
        ),
    ],
)
def test_cli_errors_are_one_red_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert message in out.stderr


def test_cli_publish_and_tail_report_server_refusals(tmp_path: Path) -> None:
    server = ProcessServer(tmp_path).start()
    url = ["--url", server.url]
    try:
        bad_type = cli("publish", "system.bogus", "--broadcast", *url, cwd=tmp_path)
        assert bad_type.returncode == 1 and "validation_error" in bad_type.stderr
        assert "Traceback" not in bad_type.stderr
        refused = cli("tail", "--user", "u", "--token", "not-a-token", *url, cwd=tmp_path, timeout=10)
        assert refused.returncode == 1 and "invalid_token" in refused.stderr
    finally:
        server.stop()
        server.close()


def test_cli_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "scribe_events_cli", "--help"], capture_output=True, text=True
    )
    for command in ("serve", "token", "publish", "tail"):
        assert command in out.stdout


def test_cli_commands_start_without_the_store_and_metrics_libraries() -> None:
    """`publish`, `tail`, `token`… load only what they use: SQLAlchemy and Alembic (about 0.6 s of
    start-up), prometheus_client and redis are imported by the commands that need them."""
    probe = (
        "import sys, scribe_events_cli.main as m; "
        "print(','.join(x for x in ('sqlalchemy', 'alembic', 'prometheus_client', 'redis', 'fastapi', "
        "'uvicorn') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_serve_sigterm_ends_streams_cleanly(tmp_path: Path) -> None:
    from tests.harness import SECRET, RawStream

    server = ProcessServer(tmp_path, env={"SCRIBE_EVENTS_JWT_SECRET": SECRET}).start()
    from scribe_events.auth import mint_token

    stream = RawStream(
        server.port, "/api/v1/events/stream", {"Authorization": f"Bearer {mint_token(SECRET, 'u')}"}
    )
    try:
        stream.read_count(1, event="connection.established")
        started = time.monotonic()
        code = server.stop(sig=15)
        stream.wait_closed(timeout=5)
        assert code in (0, -15)  # uvicorn re-raises the signal after its graceful shutdown
        assert "Application shutdown complete" in server.text()
        assert stream.ended
        assert time.monotonic() - started < 4
        assert "reason=shutdown" in server.text()
    finally:
        stream.close()
        server.close()


def test_cli_serve_refuses_an_unmigrated_postgresql_schema_with_one_line(
    tmp_path: Path, pg_schema: str
) -> None:
    from tests.conftest import PG_URL

    out = cli(
        "serve",
        "--port",
        "0",  # never bound: it refuses first
        cwd=tmp_path,
        env={
            "SCRIBE_EVENTS_DATABASE_URL": PG_URL,
            "SCRIBE_EVENTS_DATABASE_SCHEMA": pg_schema,
            "SCRIBE_EVENTS_JWT_SECRET": "s" * 40,
        },
    )
    assert out.returncode == 1
    assert "run `scribe-events db upgrade`" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_serve_refuses_a_bad_setting_with_one_line(tmp_path: Path) -> None:
    out = cli("serve", cwd=tmp_path, env={"SCRIBE_EVENTS_HEARTBEAT_S": "-1"})
    assert out.returncode == 1 and "heartbeat_s" in out.stderr and "Traceback" not in out.stderr
