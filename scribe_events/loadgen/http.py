"""The HTTP/1.1 the load generator speaks: URL templates and a tiny keep-alive client for publishing.

Raw asyncio streams rather than httpx: a publish costs a few microseconds of client CPU, so the
client cannot become what is measured. Only what a benchmark needs: one request at a time per
connection, ``Content-Length`` or chunked answers, reconnecting after ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from scribe_events.loadgen.errors import BadInput

FIELDS = ("i", "user", "seq", "ts", "sched", "run")
_FIELD = re.compile(r"\{\{(" + "|".join(FIELDS) + r")\}\}")


class Template:
    """A text with ``{i}``, ``{user}``, ``{seq}``, ``{ts}``, ``{sched}``, ``{run}`` to fill in.

    Any other brace is literal (a JSON body is full of them)."""

    __slots__ = ("_format", "fields", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        escaped = text.replace("{", "{{").replace("}", "}}")
        self.fields = frozenset(m.group(1) for m in _FIELD.finditer(escaped))
        self._format = _FIELD.sub(r"{\1}", escaped)

    def fill(self, **values: object) -> str:
        return self._format.format(**values) if self.fields else self.text


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a request goes: ``host``/``port`` to dial, ``target`` for the request line."""

    host: str
    port: int
    target: str  # path and query
    authority: str  # the Host header
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadInput(f"not an http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise BadInput(f"bad port in {url!r}") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(parts.hostname, port, target, parts.netloc, parts.scheme == "https")

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.tls else None


def parse_header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name or any(c in text for c in "\r\n") or not re.fullmatch(r"[!-9;-~]+", name):
        raise BadInput(f"not a header line 'Name: value': {text!r}")
    return name, value


def request_head(
    method: str, endpoint: Endpoint, headers: list[tuple[str, str]], length: int | None
) -> bytes:
    lines = [f"{method} {endpoint.target} HTTP/1.1", f"Host: {endpoint.authority}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HTTPError(Exception):
    """A request that got no answer (refused, reset, timed out, unreadable)."""


class Connection:
    """One keep-alive HTTP/1.1 connection; :meth:`request` sends and reads the answer."""

    def __init__(self, endpoint: Endpoint, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tls = endpoint.ssl_context()

    async def open(self) -> None:
        if self._writer is None:
            try:
                async with asyncio.timeout(self.timeout_s):
                    self._reader, self._writer = await asyncio.open_connection(
                        self.endpoint.host, self.endpoint.port, ssl=self._tls
                    )
            except (OSError, TimeoutError) as exc:
                raise HTTPError(describe(exc)) from exc

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send a whole request (head and body); the answer's status and body."""
        reused = self._writer is not None
        try:
            await self.open()
            self.write(data)
            return await self.answer()
        except HTTPError:
            if not reused:
                raise
        return await self.retry(data)

    async def retry(self, data: bytes) -> tuple[int, bytes]:
        """Once more on a fresh connection (a kept-alive one the server had closed meanwhile)."""
        self.close()
        await self.open()
        self.write(data)
        return await self.answer()

    def write(self, data: bytes) -> bool:
        """Write a request at once, without waiting for the loop; False when not connected."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(data)
        return True

    async def answer(self) -> tuple[int, bytes]:
        """Read the answer to the request written last."""
        reader = self._reader
        if reader is None:
            raise HTTPError("not connected")
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, chunked, close = _parse_head(head)
                if chunked:
                    body = await _read_chunked(reader)
                elif length is not None:
                    body = await reader.readexactly(length)
                else:
                    body, close = await reader.read(), True
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as exc:
            self.close()
            raise HTTPError(describe(exc)) from exc
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP answer: {status_line[:60]!r}")
    status = int(parts[1])
    length: int | None = None
    chunked = close = False
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if status in (204, 304) or 100 <= status < 200:
        length = 0
    return status, length, chunked, close or parts[0] == b"HTTP/1.0"


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return b"".join(out)
        out.append(await reader.readexactly(size))
        await reader.readexactly(2)


def describe(exc: BaseException) -> str:
    """A short, stable text for an error (counted by kind in the reports)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed mid-answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"[:140]
