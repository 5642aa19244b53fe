"""SSE wire encoding, byte for byte, and the client's parser against it."""

from __future__ import annotations

import pytest

from scribe_events import sse
from scribe_events.client import Message, SSEParser


def test_sse_frame_all_fields() -> None:
    assert (
        sse.frame('{"a":1}', event="x.y", id="42", retry=3000)
        == b'retry: 3000\nid: 42\nevent: x.y\ndata: {"a":1}\n\n'
    )


def test_sse_frame_data_only() -> None:
    assert sse.frame("hello") == b"data: hello\n\n"


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb", "a\rb"])
def test_sse_frame_splits_line_breaks_into_data_lines(text: str) -> None:
    assert sse.frame(text, event="e") == b"event: e\ndata: a\ndata: b\n\n"


def test_sse_frame_cannot_be_ended_early_by_data() -> None:
    encoded = sse.frame("x\n\nevent: forged\ndata: y", event="real")
    assert encoded == b"event: real\ndata: x\ndata: \ndata: event: forged\ndata: data: y\n\n"
    assert SSEParser().feed(encoded.decode()) == [Message("real", "x\n\nevent: forged\ndata: y", None)]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_sse_frame_refuses_line_breaks_in_fields(bad: str) -> None:
    with pytest.raises(ValueError):
        sse.frame("d", id=bad)
    with pytest.raises(ValueError):
        sse.frame("d", event=bad)


def test_sse_chunk_roundtrip() -> None:
    payload = "data: 龙\n\n".encode()
    assert sse.chunk(payload) == b"%x\r\n" % len(payload) + payload + b"\r\n"
    assert sse.unchunk(sse.chunk(payload)) == payload
    assert sse.CHUNK_END == b"0\r\n\r\n"


def test_parser_handles_split_reads_and_crlf_across_reads() -> None:
    p = SSEParser()
    out = []
    for piece in ["id: 7\r", "\nevent: a\r\nda", "ta: x\r", "\n", "data: y\r\n\r\n", ": comment\n\n"]:
        out += p.feed(piece)
    assert out == [Message("a", "x\ny", "7")]
    assert p.last_event_id == "7"


def test_parser_retry_and_default_event() -> None:
    assert SSEParser().feed("retry: 1500\ndata: z\n\n") == [Message("message", "z", None, 1500)]
