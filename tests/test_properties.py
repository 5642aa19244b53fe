"""Hypothesis properties: what the publish validator accepts can be framed, stored and sent, and
SSE frames round-trip through a WHATWG-conformant parser whatever the text.

The default run is derandomized (the same examples every time, so the normal suite is stable);
the ``slow`` variants (``make fuzz``) draw fresh random examples, many more of them. Every known
defect also has an explicit ``@example``, so the default run always tries it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scribe_events import sse
from scribe_events.client import Message, SSEParser
from scribe_events.crypto import Cipher, new_key
from scribe_events.events import Event
from scribe_events.exceptions import ScribeEventsError
from scribe_events.store.sql import SQLEventStore
from scribe_events.vocabulary import RESERVED_PREFIXES, ROUTING_FIELDS, TYPES, parse_publish

MAX_EVENT_BYTES = 65536

DEFAULT = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(DEFAULT, max_examples=3000, derandomize=False)

# --- strategies ---------------------------------------------------------------------------------

# Text that breaks naive code: line breaks of every kind, NUL, lone surrogates (UTF-8 cannot carry
# them), other separators Python's str.splitlines() knows, a BOM, an escape, a forged frame.
SPECIAL = [
    "",
    " ",
    "\n",
    "\r",
    "\r\n",
    "\n\r",
    "\x00",
    "\ud800",
    "\udfff",
    "\ud83d",
    "\u2028",
    "\u0085",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x7f",
    "\ufeff",
    "\x1b[31m",
    "data: forged\n\n",
    "id: 9\r\n",
    "é",
    "龙",
    "😀",
]
any_char = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates too
safe_char = st.characters(codec="utf-8")  # every code point UTF-8 can carry
texts = st.one_of(
    st.text(any_char, max_size=24),
    st.sampled_from(SPECIAL),
    st.lists(st.sampled_from(SPECIAL) | st.text(any_char, max_size=4), max_size=6).map("".join),
)
plain_texts = st.one_of(
    st.text(safe_char, max_size=24),
    st.sampled_from([t for t in SPECIAL if not re.search(r"[\ud800-\udfff]", t)]),
)
long_texts = st.builds(lambda s, n: s * n, st.text(any_char, min_size=1, max_size=8), st.integers(1, 20_000))

segment = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,6}", fullmatch=True)
dotted = st.lists(segment, min_size=2, max_size=4).map(".".join)
plain_type_names = st.sampled_from(sorted(TYPES)) | dotted
wild_type_names = st.one_of(
    st.tuples(dotted, st.sampled_from(SPECIAL)).map("".join),  # "custom.x\n" and friends
    st.tuples(st.sampled_from(SPECIAL), dotted).map("".join),
    st.tuples(st.sampled_from(RESERVED_PREFIXES), segment).map("".join),
    st.builds(lambda n: "a." + "b" * n, st.integers(190, 210)),  # around the 200-character limit
    plain_type_names,
    texts,
)
plain_ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1, max_size=12) | (
    st.sampled_from(["u", "user-1", "s1", "龙", "x" * 200])
)
wild_ids = st.one_of(
    st.text(any_char, min_size=1, max_size=12),
    st.sampled_from(["", "x" * 201, *SPECIAL]),
    st.tuples(st.sampled_from(["u", "s"]), st.sampled_from(SPECIAL)).map("".join),  # "u\n", "s\ud800"
    plain_ids,
)
big_ints = st.sampled_from([2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30, 10**400, 10**4000])
DATA_KEYS = ["owner", "readers", "task_id", "novel_id"]


def json_values_of(
    strings: st.SearchStrategy[str], floats: st.SearchStrategy[float]
) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), big_ints, floats, strings)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(strings | st.sampled_from(DATA_KEYS), inner, max_size=4)
        ),
        max_leaves=16,
    )


plain_json = json_values_of(plain_texts, st.floats(allow_nan=False, allow_infinity=False))
wild_json = json_values_of(texts, st.floats())  # NaN and infinities too: JSON cannot carry them


def nest(depth: int, leaf: Any = 0, *, as_dict: bool = False) -> Any:
    """``depth`` levels of lists (or objects) around ``leaf``, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


deep_values = st.builds(nest, st.integers(1, 1200), st.integers() | texts, as_dict=st.booleans())


def shaped_data(
    type_: str, strings: st.SearchStrategy[str], json_: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Data shaped for ``type_``'s required and optional fields (when it is a built-in type)."""
    extra = st.dictionaries(strings | st.sampled_from(ROUTING_FIELDS), json_, max_size=3)
    spec = TYPES.get(type_)
    if spec is None:
        return extra
    # Values likely to satisfy a built-in type's field checks, mixed with anything at all.
    field = st.one_of(
        strings,
        st.integers(-5, 105),
        st.floats(-1, 101),
        st.booleans(),
        st.sampled_from(["info", "warning", "critical", "loud", "sse", "polling"]),
        st.fixed_dictionaries({"code": strings, "message": strings}),
        st.fixed_dictionaries({"retryable": st.booleans()}),
        json_,
    )
    shaped = st.fixed_dictionaries(
        dict.fromkeys(spec.required, field), optional=dict.fromkeys(spec.optional, field)
    )
    return st.tuples(shaped, extra).map(lambda parts: {**parts[1], **parts[0]})


def audiences_of(ids: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.fixed_dictionaries({"user_id": ids}),
        st.fixed_dictionaries({"user_id": ids, "session_id": ids}),
        st.just({"broadcast": True}),
    )


wild_audiences = audiences_of(wild_ids) | st.fixed_dictionaries(
    {},
    optional={
        "user_id": wild_ids | wild_json,
        "session_id": wild_ids,
        "broadcast": wild_json,
        "task_id": wild_ids,
    },
)


@st.composite
def publish_bodies(draw: st.DrawFn) -> Any:
    """Publish bodies: two thirds plausible (valid types, audiences, encodable text), a third wild."""
    wild = draw(st.integers(0, 2)) == 0
    if not wild:
        type_ = draw(plain_type_names)
        body: dict[str, Any] = {"type": type_, **draw(audiences_of(plain_ids))}
        data = draw(shaped_data(type_, plain_texts, plain_json))
    else:
        if draw(st.integers(0, 9)) == 0:
            return draw(wild_json)  # not even an object, usually
        type_ = draw(wild_type_names)
        body = {"type": type_, **draw(wild_audiences)}
        data = draw(st.one_of(shaped_data(type_, texts, wild_json), deep_values, wild_json))
    if draw(st.booleans()):
        body["data"] = data
    flags = st.booleans() | wild_json if wild else st.booleans()
    optional = {"sensitive": flags, "persist": flags, **({"surprise": wild_json} if wild else {})}
    body.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return body


# --- 1. accepted events can be framed, stored and sent ------------------------------------------

_C0_C1_SURROGATE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_DOTTED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9][A-Za-z0-9_-]*)+")


def _check_accepted_fields(raw: dict[str, Any], event: Event) -> None:
    """What the validator accepted meets the rules it states in its own error messages."""
    assert _DOTTED.fullmatch(event.type) and len(event.type) <= 200, f"accepted type {event.type!r}"
    for name in ("user_id", "session_id"):
        value = raw.get(name)
        if value is not None:
            assert 1 <= len(value) <= 200 and not _C0_C1_SURROGATE.search(value), f"accepted {name} {value!r}"


def _check_sendable(raw: dict[str, Any], event: Event, wire_id: str) -> str:
    """The event's frame parses back to one message carrying its envelope; returns the envelope."""
    delivery = event.delivery()
    assert isinstance(delivery.chunk, bytes)
    payload = sse.unchunk(delivery.chunk)
    messages = SSEParser().feed(payload.decode("utf-8"))
    assert messages == [Message(event.type, delivery.envelope, wire_id)], messages
    envelope = json.loads(messages[0].data)
    data = raw.get("data", {})
    if event.type in TYPES:
        data = {k: v for k, v in data.items() if k not in ROUTING_FIELDS}
    assert envelope["id"] == wire_id
    assert envelope["type"] == raw["type"]
    assert envelope["data"] == data
    assert envelope.get("session_id") == raw.get("session_id")
    return delivery.envelope


KNOWN_PUBLISH_DEFECTS: list[Any] = [
    {"type": "custom.x\n", "user_id": "u"},
    {"type": "content.novel-created\n", "broadcast": True, "data": {"novel_id": "n", "title": "t"}},
    {"type": "custom.x", "user_id": "\ud800"},
    {"type": "custom.x", "user_id": "u", "session_id": "\udfff"},
    {"type": "custom.x", "user_id": "u\n"},
    {"type": "custom.x", "user_id": "u", "session_id": "s\n"},
    {"type": "custom.x", "broadcast": True, "data": {"a": nest(950)}},
    {"type": "custom.x", "broadcast": True, "data": {"a": nest(950, as_dict=True)}},
    {"type": "custom.x", "broadcast": True, "data": {"a": nest(1200)}},
    {"type": "custom.x", "broadcast": True, "data": {"n": 10**4000, "f": float("nan")}},
    {"type": "custom.x", "broadcast": True, "data": {"t": "a\r\nb\rc\nd\x00e\u2028"}},
    {
        "type": "task.progress-updated",
        "user_id": "u",
        "data": {"task_id": "t\n", "progress": 5, "owner": "o"},
    },
]


# The server calls parse_publish about 30 frames deep under Python's default limit of 1000;
# hypothesis raises the limit while a test runs, which would hide a RecursionError the server hits.
SERVER_FRAMES_ABOVE_PARSE = 30


@contextlib.contextmanager
def server_stack() -> Iterator[None]:
    """Give the code inside the stack budget it has in the server (then restore hypothesis' limit)."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1000 - SERVER_FRAMES_ABOVE_PARSE)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _check_publish_property(tmp_path: Path, test_settings: settings) -> None:
    """Run the property with one store (and one event loop) for every example."""
    accepted = 0
    with asyncio.Runner() as runner:
        store = SQLEventStore(f"sqlite+aiosqlite:///{tmp_path / 'props.db'}", cipher=Cipher(new_key()))
        runner.run(store.start())

        def check(raw: Any) -> None:
            nonlocal accepted
            try:
                with server_stack():
                    event = parse_publish(raw, max_event_bytes=MAX_EVENT_BYTES)
            except ScribeEventsError as exc:
                assert 400 <= exc.status < 500, f"{exc.status} {exc.code}: {exc.message}"
                return
            accepted += 1
            _check_accepted_fields(raw, event)
            event.id = 1
            _check_sendable(raw, event, "1")
            runner.run(store.append([event]))
            assert event.id is not None and event.id >= 1
            sent = _check_sendable(raw, event, str(event.id))
            page = runner.run(store.read_all(after=event.id - 1, limit=10))
            [back] = [e for e in page if e.id == event.id]
            assert back.delivery().envelope == sent
            assert _check_sendable(raw, back, str(event.id)) == sent

        prop = given(raw=publish_bodies())(check)
        for raw in KNOWN_PUBLISH_DEFECTS:
            prop = example(raw=raw)(prop)
        try:
            test_settings(prop)()
        finally:
            runner.run(store.close())
    assert accepted >= 40, f"only {accepted} generated bodies were accepted: the strategy is too wild"


def test_publish_accepted_events_can_be_framed_stored_and_sent(tmp_path: Path) -> None:
    """parse_publish either refuses cleanly (4xx) or returns an event that frames, stores and reads back."""
    _check_publish_property(tmp_path, DEFAULT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_publish_accepted_events_can_be_framed_stored_and_sent_long(tmp_path: Path) -> None:
    """The same property, with many more random examples (make fuzz)."""
    _check_publish_property(tmp_path, SLOW)


# --- 2. SSE framing round-trips through a WHATWG parser -----------------------------------------

_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
field_texts = st.one_of(st.none(), texts, st.sampled_from(["message", "x.y", " lead", "a:b", "", "42"]))
frame_data = st.one_of(texts, long_texts, st.lists(texts | long_texts, max_size=5).map("".join))


def _normalised(data: str) -> str:
    return re.sub(r"\r\n|\r", "\n", data)


def _parse_in_pieces(encoded: bytes, cuts: list[int]) -> list[Message]:
    """Feed ``encoded`` to a fresh parser in pieces, decoding UTF-8 incrementally as a client does
    (a multi-byte character may straddle two pieces; empty decodes are not fed, as httpx does)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parser = SSEParser()
    out: list[Message] = []
    bounds = [0, *sorted(set(cuts)), len(encoded)]
    for start, end in itertools.pairwise(bounds):
        text = decoder.decode(encoded[start:end])
        if text:
            out += parser.feed(text)
    tail = decoder.decode(b"", final=True)
    if tail:
        out += parser.feed(tail)
    return out


def _frame_property(test_settings: settings) -> Callable[..., None]:
    @test_settings
    @given(
        data=frame_data,
        event=field_texts,
        id_=field_texts,
        retry=st.none() | st.integers(0, 2**40),
        draw=st.data(),
    )
    @example(data="a\r\nb", event="e", id_="1", retry=None, draw=None)
    @example(data="\r", event=None, id_=None, retry=None, draw=None)
    @example(data="x" * 200_000 + "\r\n" + "y", event="long", id_=None, retry=3000, draw=None)
    @example(data="\ud800", event=None, id_=None, retry=None, draw=None)
    @example(data="d", event="e\n", id_=None, retry=None, draw=None)
    @example(data="d", event=None, id_="1\x00", retry=None, draw=None)
    def prop(data: str, event: str | None, id_: str | None, retry: int | None, draw: Any) -> None:
        fields = [f for f in (event, id_) if f is not None]
        may_refuse = bool(_SURROGATE.search(data)) or any(
            _FORBIDDEN_IN_FIELD.search(f) or _SURROGATE.search(f) for f in fields
        )
        try:
            encoded = sse.frame(data, event=event, id=id_, retry=retry)
        except ValueError:
            assert may_refuse, "frame refused text it can carry"
            return
        assert not may_refuse, "frame accepted text it cannot carry (CR/LF/NUL in a field, or a surrogate)"
        if draw is None:  # an explicit example: cut between every CR and LF, and in the middle
            cuts = [i + 1 for i in range(len(encoded)) if encoded[i : i + 1] == b"\r"] + [len(encoded) // 2]
        else:
            cuts = draw.draw(st.lists(st.integers(1, max(1, len(encoded) - 1)), max_size=12), label="cuts")
            cr_cuts = [i + 1 for i in range(len(encoded)) if encoded[i : i + 1] == b"\r"]
            if cr_cuts and draw.draw(st.booleans(), label="cut after every CR"):
                cuts += cr_cuts
        messages = _parse_in_pieces(encoded, [c for c in cuts if 0 < c < len(encoded)])
        assert messages == [Message(event or "message", _normalised(data), id_, retry)]

    return prop


def test_sse_frame_round_trips_through_whatwg_parser() -> None:
    """frame() either refuses (surrogates; CR/LF/NUL in event or id) or parses back exactly, in any pieces."""
    _frame_property(DEFAULT)()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sse_frame_round_trips_through_whatwg_parser_long() -> None:
    """The same property, with many more random examples (make fuzz)."""
    _frame_property(SLOW)()


# --- 3. SSEParser against the WHATWG event-stream rules, by hand ---------------------------------


def _feed(*pieces: str) -> tuple[list[Message], str | None]:
    parser = SSEParser()
    out: list[Message] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out, parser.last_event_id


@pytest.mark.parametrize(
    ("pieces", "messages", "last_id"),
    [
        pytest.param(["data\n\n"], [Message("message", "", None)], None, id="data-without-colon-is-empty"),
        pytest.param(["data\ndata\n\n"], [Message("message", "\n", None)], None, id="two-empty-data-lines"),
        pytest.param(
            ["data:  x\n\n"], [Message("message", " x", None)], None, id="one-leading-space-removed"
        ),
        pytest.param(["data:x\n\n"], [Message("message", "x", None)], None, id="no-space-after-colon"),
        pytest.param(["retry: 1500\ndata: z\n\n"], [Message("message", "z", None, 1500)], None, id="retry"),
        pytest.param(
            ["retry: 15a\ndata: z\n\n"], [Message("message", "z", None)], None, id="retry-not-digits"
        ),
        pytest.param(["retry:\ndata: z\n\n"], [Message("message", "z", None)], None, id="retry-empty"),
        pytest.param(["retry: -1\ndata: z\n\n"], [Message("message", "z", None)], None, id="retry-negative"),
        pytest.param(["id: 7\ndata: a\n\n"], [Message("message", "a", "7")], "7", id="id"),
        pytest.param(
            ["id: 1\x002\ndata: a\n\n"], [Message("message", "a", None)], None, id="id-with-nul-ignored"
        ),
        pytest.param(["id: 1\n\nid\n\n"], [], "", id="empty-id-resets-last-event-id"),
        pytest.param(["id: 5\ndata: a\n\ndata: b\n\n"], None, "5", id="last-event-id-persists"),
        pytest.param([": comment\n:\ndata: x\n\n"], [Message("message", "x", None)], None, id="comments"),
        pytest.param(
            ["event: e\n\ndata: y\n\n"], [Message("message", "y", None)], None, id="no-data-no-event"
        ),
        pytest.param(["Data: x\n\n"], [], None, id="field-names-are-case-sensitive"),
        pytest.param(["foo: x\ndata: y\n\n"], [Message("message", "y", None)], None, id="unknown-field"),
        pytest.param(["data: a\rdata: b\r\r"], [Message("message", "a\nb", None)], None, id="cr-line-ends"),
        pytest.param(
            ["data: a\r", "\ndata: b\r\n\r\n"], [Message("message", "a\nb", None)], None, id="crlf-split"
        ),
        pytest.param(["data: a\r", "\r\n"], [Message("message", "a", None)], None, id="cr-then-crlf"),
        pytest.param(["data: a\n"], [], None, id="unfinished-event-not-dispatched"),
        pytest.param(
            ["data: a\n\n\ufeffdata: b\n\n"], [Message("message", "a", None)], None, id="bom-only-at-start"
        ),
    ],
)
def test_sse_parser_follows_whatwg_rules(
    pieces: list[str], messages: list[Message] | None, last_id: str | None
) -> None:
    """Hand cases from the HTML standard's event-stream interpretation rules."""
    got, got_last = _feed(*pieces)
    if messages is not None:
        assert got == messages
    assert got_last == last_id


def test_sse_parser_strips_bom_at_stream_start() -> None:
    """WHATWG decodes the stream with UTF-8 decode, which drops one leading BOM; the first event survives."""
    assert _feed("\ufeffdata: x\n\n")[0] == [Message("message", "x", None)]


@pytest.mark.parametrize("value", ["²", "١٢", "１２"])  # noqa: RUF001
def test_sse_parser_retry_takes_ascii_digits_only(value: str) -> None:
    """retry is set only when the value is ASCII digits; anything else is ignored, never an error."""
    assert _feed(f"retry: {value}\ndata: x\n\n")[0] == [Message("message", "x", None)]


def test_sse_parser_empty_feed_between_cr_and_lf() -> None:
    """Parsing does not depend on how the text is cut, empty pieces included."""
    assert _feed("data: a\r", "", "\ndata: b\n\n")[0] == [Message("message", "a\nb", None)]
