"""What users, publishers and the server send is shown literally: never read as Rich markup, and no
control or bidi character reaches the operator's terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from tests.harness import SECRET, ThreadServer, cli, wait_for
from tests.test_cli import _end, _lines_of

# Anything a terminal acts on; output lines end in "\n", so that one is allowed.
_RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

EVIL = "\x1b]0;pwned\x07 \x1b[2J \u202e [bold red]x[/] :smile: \x9b1m"
EVIL_SHOWN = r"\x1b]0;pwned\x07 \x1b[2J \u202e [bold red]x[/] :smile: \x9b1m"


def _env(server: ThreadServer) -> dict[str, str]:
    # TTY_COMPATIBLE=0: Rich's own colour codes stay out even where FORCE_COLOR is set.
    return {"SCRIBE_EVENTS_JWT_SECRET": SECRET, "SCRIBE_EVENTS_URL": server.url, "TTY_COMPATIBLE": "0"}


def _assert_clean(text: str) -> None:
    found = _RAW_CONTROL.search(text)
    assert found is None, f"raw {found.group()!r} in {text!r}"
    assert "Traceback" not in text


def _tail(server: ThreadServer, cwd: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_EVENTS_")}
    env.update(_env(server), COLUMNS="200", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scribe_events_cli", "tail", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
    )
    out: list[str] = []
    _lines_of(proc, out)
    return proc, out


def test_visible_escapes_controls_and_bidi_and_keeps_the_rest() -> None:
    from scribe_events_cli.common import dumps, visible

    assert visible("a\tb\nc\x00\x7f\x9b\u202e\u2066\ud800") == r"a\x09b\x0ac\x00\x7f\x9b\u202e\u2066\ud800"
    assert visible("[bold]小説 é ✓[/]") == "[bold]小説 é ✓[/]"
    assert visible(42) == "42"
    line = dumps({"t": "\x1b\x9b\u202e小説\ud800"})
    assert json.loads(line) == {"t": "\x1b\x9b\u202e小説\ud800"}
    assert _RAW_CONTROL.search(line) is None and "小説" in line


def test_connections_shows_markup_session_and_user_agent_literally(
    server: ThreadServer, tmp_path: Path
) -> None:
    # Ids refuse control characters (C0, DEL, C1), but markup and bidi overrides are valid.
    session = "[/x]\u202e"
    # The HTTP parser refuses C0 controls such as ESC in a header; TAB and bytes >= 0x80 get through,
    # and the server reads the header as Latin-1: U+009B (the C1 CSI) arrives after an "Â".
    agent = "[/bold] :smile:\t[red]ua \x9b31m"
    stream = server.stream(
        "ana", path="/api/v1/events/stream?session_id=" + quote(session), headers={"User-Agent": agent}
    )
    try:
        stream.read_count(1, event="connection.established")
        out = cli("connections", cwd=tmp_path, env=_env(server))
        assert out.returncode == 0, out.stderr
        _assert_clean(out.stdout + out.stderr)
        assert "1 live connection(s)" in out.stdout
        assert r"[/x]\u202e" in out.stdout
        assert r"[/bold] :smile:\x09[red]ua Â\x9b31m" in out.stdout

        as_json = cli("connections", "--json", cwd=tmp_path, env=_env(server))
        assert as_json.returncode == 0, as_json.stderr
        _assert_clean(as_json.stdout)
        [row] = json.loads(as_json.stdout)["connections"]
        assert row["session_id"] == session
        assert row["user_agent"] == agent.encode().decode("latin-1")
    finally:
        stream.close()


def test_tail_shows_event_data_literally(server: ThreadServer, tmp_path: Path) -> None:
    tail, lines = _tail(server, tmp_path, "--user", "ana")
    try:
        wait_for(lambda: any("connection.established" in line for line in lines), timeout=10)
        server.publish_ok(
            {"type": "content.novel-created", "user_id": "ana", "data": {"novel_id": "n1", "title": EVIL}}
        )
        server.publish_ok({"type": "custom.x", "user_id": "ana", "data": {"[/]": ["\x9b", "\u2066"]}})
        wait_for(lambda: any("custom.x" in line for line in lines), timeout=10)
    finally:
        _end(tail)
    text = "".join(lines)
    _assert_clean(text)
    [novel] = [line for line in lines if "content.novel-created" in line]
    assert f"title={EVIL_SHOWN}" in novel
    [custom] = [line for line in lines if "custom.x" in line]
    assert r'[/]=["\x9b", "\u2066"]' in custom


def test_tail_json_lines_are_valid_and_carry_no_raw_controls(server: ThreadServer, tmp_path: Path) -> None:
    tail, lines = _tail(server, tmp_path, "--user", "ana", "--json")
    try:
        wait_for(lambda: any("connection.established" in line for line in lines), timeout=10)
        data = {"s": EVIL, "nested": ["\x9b", "\u2066", "小説"]}
        server.publish_ok({"type": "custom.x", "user_id": "ana", "data": data})
        wait_for(lambda: any("custom.x" in line for line in lines), timeout=10)
    finally:
        _end(tail)
    _assert_clean("".join(lines))
    events = [json.loads(line) for line in lines]
    [custom] = [e for e in events if e["type"] == "custom.x"]
    assert custom["data"] == data
    assert any("小説" in line for line in lines)  # non-ASCII text stays readable


def test_server_error_with_markup_is_one_literal_red_line(server: ThreadServer, tmp_path: Path) -> None:
    banned = cli(
        "ban", "add", "--user", "mallory", "--reason", "[/] \x1b[2J [bold]x", cwd=tmp_path, env=_env(server)
    )
    assert banned.returncode == 0, banned.stderr
    out = cli("tail", "--user", "mallory", cwd=tmp_path, env=_env(server), timeout=15)
    assert out.returncode == 1
    _assert_clean(out.stdout + out.stderr)
    # "code: message" (client.error_from), but not twice: the server's message is "banned: <reason>".
    assert out.stderr == "error: banned: [/] \\x1b[2J [bold]x\n"


def test_ban_list_shows_target_and_reason_literally(server: ThreadServer, tmp_path: Path) -> None:
    user, reason = "[/b]\u202e", "[red]r[/red] \x1b]0;t\x07 :smile:"
    added = cli("ban", "add", "--user", user, "--reason", reason, cwd=tmp_path, env=_env(server))
    assert added.returncode == 0, added.stderr
    _assert_clean(added.stdout + added.stderr)
    assert r"banned [/b]\u202e until lifted" in added.stdout

    out = cli("ban", "list", cwd=tmp_path, env=_env(server))
    assert out.returncode == 0, out.stderr
    _assert_clean(out.stdout + out.stderr)
    assert r"user [/b]\u202e" in out.stdout
    assert r"[red]r[/red] \x1b]0;t\x07 :smile:" in out.stdout

    as_json = cli("ban", "list", "--json", cwd=tmp_path, env=_env(server))
    _assert_clean(as_json.stdout)
    [ban] = json.loads(as_json.stdout)["bans"]
    assert ban["user_id"] == user and ban["reason"] == reason
