"""The OpenAI-compatible API through real gunicorn, with the official `openai` SDK as the client."""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests

from .conftest import wait_for
from .fake_upstream import FakeUpstream
from .streams import read_sse
from .test_responses_api import checked

WORKER_CLASSES = ["sync", "gevent"]
# Text parts, history and a system prompt; the prompt holds what would break a careless framing.
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "say it"}, {"type": "text", "text": "again 😀\r\n\ndata: [DONE]"}],
    },
]
QUOTE = 'This is turn 2. You said: "say it\nagain 😀\r\n\ndata: [DONE]".'  # the demo counts the user turns
HI = [{"role": "user", "content": "hi"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_interrupted(server, conversation_id: str, received: str) -> None:
    """The answer stopped on the server, and its turn was kept as interrupted, with at least the
    text the client `received` (more may have been written before the server noticed)."""
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to stop")
    turn = server.get(f"/conversations/{conversation_id}").json()["messages"][-1]
    assert turn["status"] == "interrupted", turn
    assert received.startswith("This is") and turn["content"].startswith(received)
    assert turn["finish_reason"] is None


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["code"] == code and body["message"] and "Traceback" not in body["message"]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_streamed_text_equals_whole_text(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS=40)
    with client(server) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES)
        whole = raw.parse()
        chunks = list(
            sdk.chat.completions.create(
                model="demo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        plain = list(sdk.chat.completions.create(model="demo", messages=MESSAGES, stream=True))

    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == "demo"
    assert whole.choices[0].message.role == "assistant" and text.startswith(QUOTE)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 40

    first, *middle, finish, usage = chunks
    assert middle and {c.id for c in chunks} == {first.id} != {whole.id}
    assert first.id.startswith("chatcmpl-") and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == "demo" for c in chunks)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in middle)
    assert text_of(middle) == text
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.to_dict()["usage"] is None for c in chunks[:-1])  # present and null, as OpenAI sends it

    assert text_of(plain) == text and plain[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and "usage" not in c.to_dict() for c in plain)

    # The messages before the prompt were stored as a new conversation's history.
    conversation = server.get(f"/conversations/{raw.headers['X-Conversation-Id']}").json()
    assert conversation["system"] == "be brief"
    turns = [(m["role"], m["content"], m["status"]) for m in conversation["messages"]]
    assert turns == [
        ("user", "hello", "complete"),
        ("assistant", "hi there", "complete"),
        ("user", "say it\nagain 😀\r\n\ndata: [DONE]", "complete"),
        ("assistant", text, "complete"),
    ]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_limits_and_harmless_extras(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS=40)
    extras = {"user": "u-1", "top_p": 0.5, "n": 1, "seed": 7, "stop": None, "presence_penalty": 0, "temperature": 0}
    with client(server) as sdk:
        whole = sdk.chat.completions.create(model="demo", messages=HI, max_tokens=5, **extras)
        chunks = list(sdk.chat.completions.create(model="demo", messages=HI, max_completion_tokens=5, stream=True))
        assert [m.id for m in sdk.models.list()] == ["demo"]
        assert sdk.models.retrieve("demo").owned_by == "demo"
    assert whole.choices[0].message.content == text_of(chunks) == "This is turn 1. You"
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 5


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_async_client(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=100, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)

    async def main():
        async with async_client(server) as sdk:
            whole = await sdk.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=30)
            stream = await sdk.chat.completions.create(
                model="demo", messages=MESSAGES, max_tokens=30, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            with pytest.raises(openai.BadRequestError):
                await sdk.chat.completions.create(model="demo", messages=[], stream=True)
            stream = await sdk.chat.completions.create(model="demo", messages=HI, stream=True)
            received = [await anext(stream) for _ in range(4)]
            await stream.close()
            return whole, chunks, received, stream.response.headers["X-Conversation-Id"]

    whole, chunks, received, conversation_id = asyncio.run(main())
    assert whole.choices[0].message.content.startswith(QUOTE)
    assert text_of(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage
    assert_interrupted(server, conversation_id, text_of(received))


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_closing_the_stream_stops_the_answer(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=50, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    with client(server) as sdk:
        stream = sdk.chat.completions.create(model="demo", messages=HI, stream=True)
        received = [next(stream) for _ in range(4)]
        stream.close()
    assert_interrupted(server, stream.response.headers["X-Conversation-Id"], text_of(received))


BAD_REQUESTS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]"),
    ({"messages": [*HI, {"role": "system", "content": "late"}]}, "messages[1]"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}, *HI]}, "messages[0]"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        "messages[0]",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0]"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"model": 5}, "model"),
    ({"n": 0}, "n"),
    ({"stop": 5}, "stop"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
      "function": {"name": "g"}}}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "4"}]}, "messages[2]"),
    ({"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"}, {"role": "system", "content": "late"}]},
     "messages[3]"),
    ({"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "4"}]}, "messages[1]"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"frobnicate": 1}}, None),
]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_bad_input_raises_bad_request_before_any_stream(serve, worker_class):
    server = serve(worker_class)
    with client(server) as sdk:
        for case, param in BAD_REQUESTS:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    sdk.chat.completions.create(**{"model": "demo", "messages": HI, "stream": stream, **case})
                assert_openai_error(info.value.body, "invalid_request")
                assert info.value.type == "invalid_request_error" and info.value.param == param, case
        for case, param in [
            ({"stream": "yes"}, "stream"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),
            ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ]:
            with pytest.raises(openai.BadRequestError) as info:
                sdk.post("/chat/completions", body={"model": "demo", "messages": HI, **case}, cast_to=object)
            assert info.value.param == param
        assert server.get("/healthz").json()["streams_in_flight"] == 0


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_http_errors_in_openai_shape(serve, worker_class):
    server = serve(worker_class, MAX_BODY_BYTES=2000)
    with client(server) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            sdk.get("/no/such/path", cast_to=object)
        assert_openai_error(info.value.body, "not_found")
        with pytest.raises(openai.NotFoundError) as info:
            sdk.models.retrieve("no-such-model")
        assert_openai_error(info.value.body, "model_not_found")
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x" * 3000}])
        assert info.value.status_code == 413
        assert_openai_error(info.value.body, "body_too_large")

    url = server.url + "/v1/chat/completions"
    for response in [
        requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30),
        requests.post(
            url,
            data='{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
            headers={"Content-Type": "application/json"},
            timeout=30,
        ),
    ]:
        assert response.status_code == 400 and response.headers["Content-Type"] == "application/json"
        assert_openai_error(response.json()["error"], "invalid_request")
    response = requests.get(url, timeout=30)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert_openai_error(response.json()["error"], "method_not_allowed")
    # The rest of the service keeps its own error shape.
    assert set(server.post("/chat", json={}).json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_failure_mid_stream_raises_api_error(serve, worker_class):
    server = serve(worker_class, DEMO_FAIL_AFTER=3)
    seen = []
    with client(server) as sdk:
        with pytest.raises(openai.APIError) as info:
            for chunk in sdk.chat.completions.create(model="demo", messages=HI, stream=True):
                seen.append(chunk)
        assert not isinstance(info.value, openai.APIStatusError)  # raised from the stream, after a 200
        assert text_of(seen) == "This is turn"
        assert info.value.message == "the demo model failed after 3 tokens"
        assert info.value.code == "upstream_error" and info.value.type == "server_error"

        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="demo", messages=HI)
        assert info.value.status_code == 503
        assert_openai_error(info.value.body, "upstream_error")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_timeout_mid_stream_after_heartbeats(serve, worker_class):
    server = serve(worker_class, DEMO_HANG_AFTER=3, IDLE_TIMEOUT_S=0.5, HEARTBEAT_S=0.2)
    with client(server) as sdk:
        with pytest.raises(openai.APIError) as info:
            list(sdk.chat.completions.create(model="demo", messages=HI, stream=True))
        assert info.value.code == "upstream_timeout"

    response = requests.post(
        server.url + "/v1/chat/completions", json={"model": "demo", "messages": HI, "stream": True}, timeout=30
    )
    assert response.headers["Content-Type"] == "text/event-stream"
    frames = response.text.split("\n\n")
    assert frames[-1] == "" and ": ping" in frames
    assert all(f == ": ping" or f.startswith("data: {") for f in frames[:-1])
    assert '"code":"upstream_timeout"' in frames[-2] and "[DONE]" not in response.text


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_chained_through_the_openai_provider(serve, tmp_path, worker_class):
    """A serves with the `openai` provider pointed at B's /v1: the SDK, A, A's SDK, B and back."""
    b = serve("gevent", db=tmp_path / "b.db", DEMO_TOKENS_PER_S=50, DEMO_TOKENS=2000)
    a = serve(
        worker_class,
        db=tmp_path / "a.db",
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=b.url + "/v1",
        LLM_MODEL="demo",
        HEARTBEAT_S=0.2,
    )
    with client(a) as via_a, client(b) as direct:
        assert [m.id for m in via_a.models.list()] == ["demo"]
        want = direct.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16)
        whole = via_a.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16)
        chunks = list(
            via_a.chat.completions.create(
                model="demo", messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
            )
        )
        assert want.choices[0].message.content.startswith(QUOTE)
        assert text_of(chunks) == whole.choices[0].message.content == want.choices[0].message.content
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
        assert chunks[-1].usage == whole.usage == want.usage

        stream = via_a.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "stop me"}], stream=True
        )
        received = [next(stream) for _ in range(4)]
        stream.close()
    assert_interrupted(a, stream.response.headers["X-Conversation-Id"], text_of(received))
    # The cancellation reached the far end: B stopped too, and kept its turn as interrupted.
    wait_for(lambda: b.get("/healthz").json()["streams_in_flight"] == 0, what="B's answer to stop")
    conversations = b.get("/conversations").json()["conversations"]
    (stopped,) = [c for c in conversations if c["title"] == "stop me"]
    turn = b.get(f"/conversations/{stopped['id']}").json()["messages"][-1]
    assert turn["status"] == "interrupted" and turn["content"].startswith(text_of(received))


def test_chained_timeout_keeps_its_code(serve, tmp_path):
    """B's model goes silent and B times it out: A's client is told it timed out, not that it failed."""
    b = serve("gevent", db=tmp_path / "b.db", DEMO_HANG_AFTER=3, IDLE_TIMEOUT_S=0.5, HEARTBEAT_S=0.2)
    a = serve("gevent", db=tmp_path / "a.db", LLM_PROVIDER="openai", OPENAI_BASE_URL=b.url + "/v1",
              LLM_MODEL="demo", IDLE_TIMEOUT_S=30, HEARTBEAT_S=0.2)
    with client(a) as sdk:
        with pytest.raises(openai.APIError) as info:
            list(sdk.chat.completions.create(model="demo", messages=HI, stream=True))
    assert info.value.code == "upstream_timeout"
    assert info.value.message == "the model server did not answer in time"


def test_reasoning_streams_apart(serve):
    """Reasoning that an upstream streams apart comes out as `reasoning_content`, as it went in."""
    with FakeUpstream() as up:
        up.tokens, up.reasoning_tokens = 6, 2
        server = serve("gevent", LLM_PROVIDER="openai", OPENAI_BASE_URL=up.base_url, LLM_MODEL="fake-model")
        with client(server) as sdk:
            chunks = list(sdk.chat.completions.create(model="fake-model", messages=HI, stream=True))
            whole = sdk.chat.completions.create(model="fake-model", messages=HI)
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "think think "
    assert text_of(chunks) == whole.choices[0].message.content == up.expected_text("hi")
    assert whole.choices[0].message.reasoning_content == "think think "


REFUSAL = "I'm sorry, but I can't help with that."


def test_a_refusal_is_relayed_as_a_refusal(serve):
    """An upstream's `delta.refusal` (a model declining under structured outputs) is what the model
    said: `refusal` on /v1, streamed and whole, and in the Responses API, a `refusal` event in
    the service's own SSE, the text of /chat, and the saved turn's content."""
    with FakeUpstream() as up:
        up.refusal = REFUSAL
        server = serve("gevent", LLM_PROVIDER="openai", OPENAI_BASE_URL=up.base_url, LLM_MODEL="fake-model")
        with client(server) as sdk:
            chunks = list(sdk.chat.completions.create(model="fake-model", messages=HI, stream=True,
                                                      stream_options={"include_usage": True}))
            whole = sdk.chat.completions.create(model="fake-model", messages=HI)
            events = checked(list(sdk.responses.create(model="fake-model", input="hi", stream=True)))
            response = sdk.responses.create(model="fake-model", input="hi")
        sse = read_sse(server.url + "/chat/sse", json_body={"prompt": "hi"})
        text = server.post("/chat", json={"prompt": "hi"}).text
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices) == REFUSAL
    assert text_of(chunks) == "" and chunks[-2].choices[0].finish_reason == "stop"
    assert whole.choices[0].message.refusal == REFUSAL and whole.choices[0].message.content is None
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == REFUSAL
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == [REFUSAL]
    assert [(p.type, p.refusal) for p in response.output[0].content] == [("refusal", REFUSAL)]
    assert "".join(e["text"] for e in sse.of("refusal")) == REFUSAL and sse.text == ""
    assert text == REFUSAL
    turn = server.get(f"/conversations/{sse.of('start')[0]['conversation_id']}").json()["messages"][-1]
    assert (turn["role"], turn["content"], turn["status"]) == ("assistant", REFUSAL, "complete")


def test_an_unknown_model_is_refused_before_anything_is_stored(serve):
    """OpenAI's 404 `model_not_found` on /v1, a 400 on the service's own endpoints."""
    server = serve("gevent")
    with client(server) as sdk:
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as info:
                sdk.chat.completions.create(model="gpt-4", messages=HI, stream=stream)
            assert_openai_error(info.value.body, "model_not_found")
            assert "gpt-4" in info.value.message
    for path, body in [("/chat", {"prompt": "hi"}), ("/chat/sse", {"prompt": "hi"}),
                       ("/chat/blocking", {"prompt": "hi"}), ("/batch", {"prompts": ["a", "b"]})]:
        response = server.post(path, json={**body, "model": "gpt-4"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "model_not_found"
    assert server.get("/conversations").json()["conversations"] == []


def test_demo_models_answer_to_the_names_tools_hard_code(serve):
    server = serve("gevent", DEMO_MODELS="gpt-4o-mini, gpt-4,demo")
    with client(server) as sdk:
        assert [m.id for m in sdk.models.list()] == ["demo", "gpt-4o-mini", "gpt-4"]
        assert sdk.models.retrieve("gpt-4").owned_by == "demo"
        whole = sdk.chat.completions.create(model="gpt-4", messages=HI)
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="gpt-5", messages=HI)
    assert whole.model == "gpt-4" and whole.choices[0].message.content.startswith('This is turn 1. You said: "hi"')
    assert server.post("/chat/blocking", json={"prompt": "hi", "model": "gpt-4o-mini"}).ok
