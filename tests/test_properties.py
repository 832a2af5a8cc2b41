"""Properties, checked with hypothesis: any text survives every framing, any prompt comes back
through the app, and no input makes it answer with a 500 or a broken stream.

The wire framings are pure functions, tested directly; the app is tested in-process with Flask's
test client (the answer's producer is a thread of this process), with the demo model unpaced.
"""

from __future__ import annotations

import json
import logging
import urllib.parse

import pytest
import sseclient
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from streaming import create_app
from streaming.config import Settings
from streaming.providers.schema_sample import sample
from streaming.wire import NDJSONFraming, OpenAIFraming, SSEFraming, TextFraming

from .conftest import json_schema_validator

PURE = settings(deadline=None, max_examples=150, database=None)
APP = settings(deadline=None, max_examples=100, database=None)

# -- strategies ---------------------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",))  # any code point but a surrogate
# What breaks careless framings, mixed into arbitrary text so that it comes up often.
PIECES = [
    "\r", "\n", "\r\n", "\n\n", "\r\r", "\r\n\r\n", "\x00", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c",
    "\ufeff", "\t", " ", '"', "\\", "😀", "👩‍👩‍👧", "🇫🇷", "中文", "你好", "「」", "\U0010ffff",
    ": ping", "data: ", "data:", "id: 1", "event: done", "retry: 1", "[DONE]", '{"type":"ping"}',
]
TEXT = st.lists(st.one_of(st.text(CHARS), st.sampled_from(PIECES)), max_size=6).map("".join)
PROMPT = st.lists(st.one_of(st.text(CHARS, min_size=1), st.sampled_from(PIECES)), min_size=1, max_size=6).map(
    lambda parts: "".join(parts)[:200]
)

MESSAGE_ID = "0123456789abcdef0123456789abcdef"
START = {"type": "start", "conversation_id": "c" * 32, "message_id": MESSAGE_ID, "model": "demo"}
STATUS = {"type": "status", "stage": "thinking"}
DONE = {
    "type": "done",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    "ttft_ms": 5,
    "duration_ms": 6,
}
TEXT_KINDS = ("delta", "reasoning")


@st.composite
def answers(draw) -> tuple[list[list[dict]], list[bool]]:
    """An answer's event log, cut into the batches that a reader would take from it, and whether
    a heartbeat follows each batch."""
    middle = draw(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["delta", "delta", "delta", "reasoning"]), TEXT).map(
                    lambda kt: {"type": kt[0], "text": kt[1]}
                ),
                st.just({"type": "status", "stage": "generating"}),
            ),
            max_size=10,
        )
    )
    error = TEXT.map(lambda message: {"type": "error", "error": {"code": "upstream_error", "message": message}})
    terminal = draw(st.one_of(st.just(DONE), error))
    events = [START, STATUS, *middle, terminal]
    cuts = sorted(draw(st.sets(st.integers(1, len(events) - 1))))
    bounds = [0, *cuts, len(events)]
    batches = [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    beats = draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    return batches, beats


def encode(framing, batches: list[list[dict]], beats: list[bool]) -> bytes:
    """The bytes a reader writes: each batch encoded from its offset, heartbeats between."""
    out, offset = [], 0
    for index, (batch, beat) in enumerate(zip(batches, beats, strict=True)):
        out.append(framing.encode(batch, offset))
        offset += len(batch)
        if beat and framing.heartbeat and index < len(batches) - 1:
            out.append(framing.heartbeat)
    return b"".join(out)


def merged(batches: list[list[dict]]) -> list[tuple[int, dict]]:
    """(sequence number, event) as a framing must put them out: a run of text events of one type
    within one batch is one event, numbered with the sequence number of the run's last event."""
    out: list[tuple[int, dict]] = []
    seq = 0
    for batch in batches:
        first = len(out)
        for item in batch:
            if len(out) > first and item["type"] in TEXT_KINDS and out[-1][1]["type"] == item["type"]:
                out[-1] = (seq, {"type": item["type"], "text": out[-1][1]["text"] + item["text"]})
            else:
                out.append((seq, item))
            seq += 1
    return out


def texts(batches: list[list[dict]], kind: str = "delta") -> str:
    return "".join(e["text"] for batch in batches for e in batch if e["type"] == kind)


def sse_parse(body: bytes) -> list[sseclient.Event]:
    return list(sseclient.SSEClient(iter([body])).events())


# -- a. any text through every framing ----------------------------------------------------------


@PURE
@given(answers())
def test_sse_framing_round_trips_any_text(answer):
    batches, beats = answer
    body = encode(SSEFraming(MESSAGE_ID, 3000), batches, beats)
    # Data is JSON: no CR at all (a lone CR ends an SSE line), and every line is a known field.
    assert b"\r" not in body
    assert body.decode().splitlines() == body.decode().split("\n")[:-1]  # U+2028, U+2029, U+0085 escaped
    for line in body.split(b"\n"):
        assert line == b"" or line == b": ping" or line.split(b":")[0] in (b"id", b"retry", b"event", b"data"), line
    parsed = sse_parse(body)
    expected = merged(batches)
    assert [(m.id, m.event, json.loads(m.data)) for m in parsed] == [
        (f"{MESSAGE_ID}:{seq}", e["type"], e) for seq, e in expected
    ]
    assert [m.retry for m in parsed] == ["3000"] + [None] * (len(parsed) - 1)
    got = "".join(json.loads(m.data)["text"] for m in parsed if m.event == "delta")
    assert got.encode() == texts(batches).encode()


@PURE
@given(answers(), st.none() | st.integers(0, 15))
def test_ndjson_framing_round_trips_any_text(answer, index):
    batches, beats = answer
    body = encode(NDJSONFraming(index), batches, beats)
    assert body.endswith(b"\n") and b"\r" not in body
    objects = [json.loads(line) for line in body.split(b"\n")[:-1]]  # split at LF only, as NDJSON is
    assert body.decode().splitlines() == body.decode().split("\n")[:-1]  # U+2028, U+2029, U+0085 escaped
    objects = [o for o in objects if o != {"type": "ping"}]
    assert objects == [e if index is None else {**e, "index": index} for _, e in merged(batches)]


@PURE
@given(answers())
def test_text_framing_is_the_exact_text(answer):
    batches, beats = answer
    body = encode(TextFraming(), batches, beats)
    expected = texts(batches)
    end = batches[-1][-1]
    if end["type"] == "error":
        expected += f"\n[error] {end['error']['code']}: {end['error']['message']}\n"
    assert body == expected.encode("utf-8")


@PURE
@given(answers(), st.booleans())
def test_openai_framing_round_trips_any_text(answer, include_usage):
    batches, beats = answer
    body = encode(OpenAIFraming(1700000000, include_usage), batches, beats)
    assert b"\r" not in body
    assert body.decode().splitlines() == body.decode().split("\n")[:-1]  # U+2028, U+2029, U+0085 escaped
    data = [m.data for m in sse_parse(body)]
    end = batches[-1][-1]
    if end["type"] == "done":
        assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
        chunks = [json.loads(d) for d in data[:-1]]
    else:
        assert "[DONE]" not in data  # the SDK raises at the error and reads no further
        chunks = [json.loads(d) for d in data]
        error = chunks.pop()
        message = end["error"]["message"]
        assert error == {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}}
    for chunk in chunks:
        assert chunk["id"] == f"chatcmpl-{MESSAGE_ID}" and chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "demo" and chunk["created"] == 1700000000
    with_choices = [c for c in chunks if c["choices"]]
    deltas = [c["choices"][0]["delta"] for c in with_choices]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == texts(batches)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == texts(batches, "reasoning")
    if include_usage:
        assert all(c["usage"] is None for c in with_choices)
    if end["type"] == "done":
        assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
        if include_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


# -- b. any prompt through the app --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("properties") / "properties.db"
    app = create_app(
        Settings(database_url=f"sqlite:///{db}", demo_ttft_ms=0, demo_tokens_per_s=0, demo_tokens=5)
    )
    stream_log = logging.getLogger("streaming.streams")  # one line per stream: thousands here
    level = stream_log.level
    stream_log.setLevel(logging.WARNING)
    yield app.test_client()
    stream_log.setLevel(level)


def heads(prompt: str) -> tuple[str, str]:
    """How the demo's first answer to `prompt` begins: in Chinese when the prompt holds CJK."""
    return f'This is turn 1. You said: "{prompt}".', f"这是第 1 轮对话。你说：「{prompt}」。"


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.get_data()[:500]
    assert response.mimetype == "text/event-stream"
    parsed = sse_parse(response.get_data())
    events = [json.loads(m.data) for m in parsed]
    assert [m.event for m in parsed] == [e["type"] for e in events]
    seqs = [int(m.id.split(":")[1]) for m in parsed]
    assert seqs == sorted(set(seqs))
    return events


@APP
@given(prompt=PROMPT)
def test_any_prompt_comes_back_verbatim(client, prompt):
    events = sse_events(client.post("/chat/sse", json={"prompt": prompt}, buffered=True))
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert "".join(e["text"] for e in events if e["type"] == "delta").startswith(heads(prompt))

    events = sse_events(client.get("/chat/sse", query_string={"prompt": prompt}, buffered=True))
    assert "".join(e["text"] for e in events if e["type"] == "delta").startswith(heads(prompt))

    response = client.post("/chat", json={"prompt": prompt}, buffered=True)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert response.get_data().decode("utf-8").startswith(heads(prompt))

    messages = [{"role": "user", "content": prompt}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "stream": True}, buffered=True)
    data = [m.data for m in sse_parse(response.get_data())]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).startswith(heads(prompt))

    response = client.post("/batch", json={"prompts": [prompt, prompt]}, buffered=True)
    lines = [json.loads(line) for line in response.get_data().split(b"\n")[:-1]]
    assert lines[-1] == {"type": "batch_done", "ok": 2, "failed": 0}
    for index in (0, 1):
        text = "".join(e["text"] for e in lines if e.get("index") == index and e["type"] == "delta")
        assert text.startswith(heads(prompt))


# -- c. lone surrogates -------------------------------------------------------------------------


def _user(text):
    return {"messages": [{"role": "user", "content": text}], "stream": True}


PLACES = {
    "/chat prompt": ("/chat", lambda x: {"prompt": x}),
    "/chat/sse prompt": ("/chat/sse", lambda x: {"prompt": x}),
    "/chat/blocking prompt": ("/chat/blocking", lambda x: {"prompt": x}),
    "/chat/sse system": ("/chat/sse", lambda x: {"prompt": "hi", "system": x}),
    "/chat model": ("/chat", lambda x: {"prompt": "hi", "model": x}),
    "/chat/sse conversation_id": ("/chat/sse", lambda x: {"prompt": "hi", "conversation_id": x}),
    "/batch prompts": ("/batch", lambda x: {"prompts": ["hi", x]}),
    "/v1 user content": ("/v1/chat/completions", _user),
    "/v1 content part": ("/v1/chat/completions", lambda x: _user([{"type": "text", "text": x}])),
    "/v1 system content": (
        "/v1/chat/completions",
        lambda x: {"messages": [{"role": "system", "content": x}, {"role": "user", "content": "hi"}], "stream": True},
    ),
    "/v1 history": (
        "/v1/chat/completions",
        lambda x: {"messages": [{"role": "assistant", "content": x}, {"role": "user", "content": "hi"}]},
    ),
}
LONE = st.integers(0xD800, 0xDFFF).map(chr)


def assert_json_error(response, status: int | None = None) -> None:
    data = response.get_data()
    assert b"Traceback" not in data
    if status is None:
        assert 400 <= response.status_code < 500, (response.status_code, data[:500])
    else:
        assert response.status_code == status, (response.status_code, data[:500])
    assert response.mimetype == "application/json", (response.mimetype, data[:500])
    error = json.loads(data)["error"]
    assert isinstance(error, dict) and isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error


@APP
@given(st.sampled_from(sorted(PLACES)), TEXT, LONE, TEXT)
def test_a_lone_surrogate_is_a_400(client, place, before, lone, after):
    path, make = PLACES[place]
    body = json.dumps(make(before + lone + after))  # ASCII, the surrogate as a \udxxx escape
    assert f"\\u{ord(lone):04x}" in body
    response = client.post(path, data=body, content_type="application/json", buffered=True)
    assert_json_error(response, 400)


# -- d. malformed requests ----------------------------------------------------------------------

POST_PATHS = ["/chat", "/chat/sse", "/chat/blocking", "/batch", "/v1/chat/completions"]
FIELDS = [
    "prompt", "conversation_id", "model", "system", "max_tokens", "temperature", "prompts", "concurrency",
    "messages", "stream", "stream_options", "max_completion_tokens", "history", "n", "stop", "user",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(CHARS, max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(CHARS, max_size=8), children, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer", "user", "assistant", "tool", ""]),
            "content": st.one_of(
                TEXT,
                TEXT,
                st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]), "text": TEXT})),
                JSON_VALUES,
            ),
        },
        optional={"name": st.text(CHARS, max_size=5), "tool_calls": st.sampled_from([None, [], [{}]])},
    ),
    max_size=3,
)
# Values that are sometimes right for some field: the requests hover around valid ones.
NEAR = st.one_of(
    JSON_VALUES,
    st.integers(-3, 1_000_002),
    st.floats(-1, 3),
    st.text(CHARS, max_size=80),
    st.lists(st.text(CHARS, max_size=5), max_size=18),
    st.fixed_dictionaries({"include_usage": st.booleans()}),
    MESSAGES,
)
BASES = [{}, {"prompt": "hi"}, {"prompts": ["a", "b"]}, {"messages": [{"role": "user", "content": "hi"}]}]
FIELD_BODIES = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from(BASES),
    st.dictionaries(st.sampled_from(FIELDS), NEAR, max_size=3),
)
# Each endpoint's own fields, each present or not, right-ish or of any JSON type: many of these
# requests are valid, and those must be whole answers.
COUNT = st.integers(-2, 1_000_002) | st.floats(-1, 3)
RIGHTISH = {
    "prompt": PROMPT,
    "conversation_id": st.text(CHARS, max_size=70),
    "model": st.text(CHARS, max_size=210),
    "system": TEXT,
    "max_tokens": COUNT,
    "max_completion_tokens": COUNT,
    "temperature": st.floats(-0.5, 2.5) | st.integers(-1, 3) | st.sampled_from([float("nan"), float("inf")]),
    "prompts": st.lists(PROMPT, min_size=1, max_size=17) | st.just([]),
    "concurrency": st.integers(-1, 10),
    "messages": MESSAGES | MESSAGES.map(lambda messages: [*messages, {"role": "user", "content": "hi"}]) | MESSAGES.map(
        lambda messages: [*messages, {"role": "user", "content": [{"type": "text", "text": "hi"}] * 2}]
    ),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON_VALUES}),
    "n": st.sampled_from([1, 1, 1.0, True, 2]),
    "stop": st.sampled_from(["", [], [], "x", ["x"]]),
    "user": JSON_VALUES,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 21),
    "seed": st.integers(),
    "response_format": st.sampled_from([
        {"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": ["a"],
                                                                        "properties": {"a": {"type": "integer"}}}}},
    ]),
}
OWN_FIELDS = {
    "/chat": ["prompt", "conversation_id", "model", "system", "max_tokens", "temperature"],
    "/chat/sse": ["prompt", "conversation_id", "model", "system", "max_tokens", "temperature"],
    "/chat/blocking": ["prompt", "conversation_id", "model", "system", "max_tokens", "temperature"],
    "/batch": ["prompts", "concurrency", "model", "system", "max_tokens", "temperature"],
    "/v1/chat/completions": [
        "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "stream", "stream_options", "n",
        "stop", "user", "logprobs", "top_logprobs", "seed", "response_format",
    ],
}


def own_bodies(path: str):
    """(path, body): the endpoint's main field and some of its other fields, mostly right-ish."""

    def value(name: str):  # one in five of any JSON type
        return st.integers(0, 4).flatmap(lambda i: RIGHTISH[name] if i else JSON_VALUES)

    main, *others = OWN_FIELDS[path]
    own = st.fixed_dictionaries({main: value(main)}, optional={name: value(name) for name in others})
    stray = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=1)
    return st.tuples(st.just(path), st.builds(lambda a, b: {**b, **a}, own, st.one_of(*[st.just({})] * 4, stray)))


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded"]


def assert_answer(path: str, response) -> None:
    """A 200 is a whole, well-formed answer in the endpoint's format."""
    data = response.get_data()
    assert b"Traceback" not in data
    if path == "/chat":
        assert response.mimetype == "text/plain"
        text = data.decode("utf-8")
        assert text and "\n[error] " not in text
    elif path == "/chat/sse":
        events = sse_events(response)
        assert events[0]["type"] == "start" and events[-1]["type"] == "done", events[-1]
    elif path == "/chat/blocking":
        body = json.loads(data)
        assert body["text"] and body["finish_reason"] in ("stop", "length"), body
    elif path == "/batch":
        assert response.mimetype == "application/x-ndjson"
        lines = [json.loads(line) for line in data.split(b"\n")[:-1]]
        assert lines[-1]["type"] == "batch_done" and lines[-1]["failed"] == 0, lines[-1]
        assert all(e["type"] != "error" for e in lines)
    elif response.mimetype == "text/event-stream":
        events = [m.data for m in sse_parse(data)]
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(d) for d in events[:-1])
    else:
        body = json.loads(data)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"], body


def assert_answer_or_4xx(path: str, response) -> None:
    event(f"{path}: {response.status_code}")  # see --hypothesis-show-statistics
    if response.status_code == 200:
        assert_answer(path, response)
    else:
        assert_json_error(response)


@APP
@given(st.binary(max_size=300), st.sampled_from(CONTENT_TYPES))
def test_any_bytes_as_a_body_are_never_a_500(client, body, content_type):
    for path in POST_PATHS:
        assert_answer_or_4xx(path, client.post(path, data=body, content_type=content_type, buffered=True))


@APP
@given(JSON_VALUES)
def test_any_json_value_as_a_body_is_never_a_500(client, value):
    body = json.dumps(value)
    for path in POST_PATHS:
        assert_answer_or_4xx(path, client.post(path, data=body, content_type="application/json", buffered=True))


@APP
@given(FIELD_BODIES)
@example({"prompt": "hi", "max_tokens": 1})
@example({"prompts": ["a", "b"], "concurrency": 2, "temperature": 0.5})
@example({"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}})
def test_wrongly_typed_fields_are_never_a_500(client, fields):
    body = json.dumps(fields)
    for path in POST_PATHS:
        assert_answer_or_4xx(path, client.post(path, data=body, content_type="application/json", buffered=True))


@settings(deadline=None, max_examples=200, database=None)
@given(st.sampled_from(POST_PATHS).flatmap(own_bodies))
def test_each_endpoints_own_fields_are_an_answer_or_a_4xx(client, case):
    path, fields = case
    body = json.dumps(fields)
    assert_answer_or_4xx(path, client.post(path, data=body, content_type="application/json", buffered=True))


QUERIES = st.one_of(
    st.binary(max_size=80).map(lambda b: urllib.parse.quote_from_bytes(b, safe="=&%+;")),  # malformed escapes too
    st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(CHARS, max_size=8), st.text(CHARS, max_size=30)), max_size=4)
    .map(urllib.parse.urlencode),
    st.dictionaries(st.sampled_from(FIELDS), st.text(CHARS, max_size=12), max_size=3).map(
        lambda d: urllib.parse.urlencode({"prompt": "hi", **d})
    ),
)


@APP
@given(QUERIES)
@example("prompt=hi&max_tokens=2&temperature=0.5")
@example("prompt=%ED%A0%80")  # a surrogate's UTF-8 bytes: not UTF-8, so replaced, not a surrogate
def test_any_query_string_is_never_a_500(client, query):
    for path in ("/chat", "/chat/sse"):
        assert_answer_or_4xx(path, client.get(path, query_string=query, buffered=True))


def test_a_query_strings_numbers_are_read_and_a_repeated_name_counts_once(client):
    answer = client.get("/chat", query_string="prompt=hi&prompt=ignored&max_tokens=2", buffered=True)
    assert answer.status_code == 200 and answer.get_data(as_text=True) == "This is"
    refused = client.get("/chat", query_string="prompt=hi&max_tokens=2.5")
    assert refused.status_code == 400 and refused.json["error"]["message"] == "'max_tokens' must be an integer"


# -- Last-Event-ID ------------------------------------------------------------------------------

LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
LAST_EVENT_IDS = st.one_of(
    st.text(LATIN1, max_size=40).filter(str.strip),  # an empty id is none: a new answer (test_conversations)
    st.tuples(st.text("0123456789abcdef", max_size=32), st.text("0123456789²³¹", min_size=1, max_size=25)).map(
        ":".join
    ),
)


@APP
@given(LAST_EVENT_IDS)
@example("0123456789abcdef0123456789abcdef:²")
@example("0123456789abcdef0123456789abcdef:" + "9" * 5000)
def test_any_last_event_id_is_a_204_or_a_replay(client, last_event_id):
    response = client.get("/chat/sse", headers={"Last-Event-ID": last_event_id}, buffered=True)
    assert response.status_code in (200, 204), (response.status_code, response.get_data()[:300])
    if response.status_code == 200:
        sse_events(response)


@pytest.fixture(scope="module")
def ended_answer(client) -> list[sseclient.Event]:
    response = client.post("/chat/sse", json={"prompt": "replay \r\n me 😀"}, buffered=True)
    sse_events(response)
    return sse_parse(response.get_data())


@settings(deadline=None, max_examples=40, database=None)
@given(st.data())
def test_a_reconnect_replays_exactly_the_rest(client, ended_answer, data):
    """From any event of an ended answer, a reconnect gets the events after it and nothing else."""
    cut = data.draw(st.integers(0, len(ended_answer) - 1))
    response = client.get("/chat/sse", headers={"Last-Event-ID": ended_answer[cut].id}, buffered=True)
    if cut == len(ended_answer) - 1:
        assert response.status_code == 204
        return
    rest = sse_events(response)
    after = [json.loads(m.data) for m in ended_answer[cut + 1:]]
    assert [e["type"] for e in rest if e["type"] != "delta"] == [e["type"] for e in after if e["type"] != "delta"]
    assert "".join(e["text"] for e in rest if e["type"] == "delta") == "".join(
        e["text"] for e in after if e["type"] == "delta"
    )


# -- bodies nested too deep for the JSON parser -------------------------------------------------


@pytest.mark.parametrize("path", POST_PATHS)
def test_a_deeply_nested_body_is_a_400(client, path):
    for body in (b"[" * 100_000, b'{"prompt": ' + b'{"a": ' * 50_000):
        assert_json_error(client.post(path, data=body, content_type="application/json", buffered=True), 400)


# -- the demo's tool arguments ----------------------------------------------------------------------


def schemas(leaf_only: bool = False) -> st.SearchStrategy[dict]:
    """JSON Schemas as function tools write them: the scalar types with their bounds, enums,
    nullable types, and objects and arrays of those, nested."""
    bounds = st.integers(-1000, 1000)
    number = st.builds(lambda kind, low, span, exclusive, step: {
        "type": kind, ("exclusiveMinimum" if exclusive else "minimum"): low, "maximum": low + span,
        **({"multipleOf": step} if step and kind == "integer" else {})},
        # 10 or more wide: a multiple of any step here lies within
        st.sampled_from(["integer", "number"]), bounds, st.integers(10, 500), st.booleans(), st.sampled_from([0, 2, 5]))
    string = st.one_of(
        st.builds(lambda low, extra: {"type": "string", "minLength": low, "maxLength": low + extra},
                  st.integers(0, 30), st.integers(0, 30)),
        st.sampled_from(["date", "date-time", "email", "uuid", "uri"]).map(lambda f: {"type": "string", "format": f}))
    scalar = st.one_of(
        number, string, st.just({"type": "boolean"}), st.just({"type": "integer"}),
        st.lists(st.one_of(st.text(max_size=5), st.integers()), min_size=1, max_size=4, unique=True).map(
            lambda values: {"enum": values}),
        st.sampled_from(["string", "integer", "boolean"]).map(lambda kind: {"type": [kind, "null"]}),
    )
    return st.recursive(scalar, lambda inner: st.one_of(
        st.builds(lambda items, low: {"type": "array", "items": items, "minItems": low}, inner, st.integers(0, 3)),
        st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), inner, max_size=4).flatmap(
            lambda properties: st.builds(lambda required: {
                "type": "object", "properties": properties, "required": required, "additionalProperties": False},
                st.lists(st.sampled_from(sorted(properties)), unique=True) if properties else st.just([]))),
    ), max_leaves=8)


@PURE
@given(schemas())
def test_the_demos_tool_arguments_satisfy_any_schema(schema):
    value = sample(schema)
    json_schema_validator()(value, schema)
    assert sample(schema) == value  # deterministic


# -- tool calls through OpenAI's chunks ---------------------------------------------------------------


@st.composite
def tool_call_answers(draw) -> tuple[list[list[dict]], list[dict]]:
    """An answer's events with 1-3 tool calls (arguments any text, cut anywhere into fragments,
    some servers' repeats of id and name included) among text deltas, cut into batches; and the
    calls, whole."""
    from streaming.providers.base import ToolCallDelta
    from streaming.tool_calls import delta_event, whole_calls

    calls = draw(st.lists(st.tuples(st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True), TEXT),
                          min_size=1, max_size=3))
    chunks: list = []
    for index, (name, arguments) in enumerate(calls):
        cuts = sorted(draw(st.sets(st.integers(0, len(arguments)), max_size=6)))
        pieces = [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)], strict=True)]
        repeat = draw(st.booleans())  # id and name on every fragment, as some servers send them
        chunks += [ToolCallDelta(index, *((f"call_{index}", name) if i == 0 or repeat else (None, None)), piece)
                   for i, piece in enumerate(pieces)]
        if draw(st.booleans()):
            chunks.append(draw(TEXT))
    given: dict = {}
    middle = [{"type": "delta", "text": c} if type(c) is str else delta_event(c, given) for c in chunks]
    events = [START, STATUS, *middle, *whole_calls(middle), {**DONE, "finish_reason": "tool_calls"}]
    cuts = sorted(draw(st.sets(st.integers(1, len(events) - 1))))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], whole_calls(middle)


@PURE
@given(tool_call_answers())
def test_the_sdk_accumulates_any_tool_calls_from_openai_chunks(answer):
    """What the SDK's own accumulator (`ChatCompletionStreamState`, behind `stream()`) makes of
    the chunks is the whole calls; id, type and name come on a call's first fragment only."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    batches, calls = answer
    body = encode(OpenAIFraming(1700000000), batches, [False] * len(batches))
    chunks = [json.loads(m.data) for m in sse_parse(body) if m.data != "[DONE]"]
    state = ChatCompletionStreamState()
    firsts: set[int] = set()
    for chunk in chunks:
        for fragment in chunk["choices"][0]["delta"].get("tool_calls", ()):
            first = fragment["index"] not in firsts
            firsts.add(fragment["index"])
            assert ("id" in fragment, "type" in fragment, "name" in fragment["function"]) == (first, first, first)
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (c["id"], c["name"], c["arguments"]) for c in calls]


@PURE
@given(tool_call_answers())
def test_tool_call_events_round_trip_through_sse_and_ndjson(answer):
    batches, _ = answer
    sse_events = [json.loads(m.data) for m in sse_parse(encode(SSEFraming(MESSAGE_ID, 3000), batches,
                                                                [False] * len(batches)))]
    ndjson_events = [json.loads(line) for line in encode(NDJSONFraming(), batches, [False] * len(batches)).splitlines()]
    expected = [event for _, event in merged(batches)]
    assert sse_events == ndjson_events == expected
