"""Providers: Anthropic's (the real `anthropic` SDK) against a local server speaking Anthropic's
Messages streaming format (tests/fake_upstream.py), and one of your own named by its import path."""

from __future__ import annotations

import openai
import pytest

from .conftest import WORKER_CLASSES, wait_for
from .fake_upstream import SECRET_DETAIL, FakeUpstream
from .streams import read_sse


@pytest.fixture
def upstream():
    with FakeUpstream() as up:
        yield up


def relay(serve, upstream, worker_class="gevent", **env):
    return serve(worker_class, LLM_PROVIDER="anthropic", ANTHROPIC_BASE_URL=upstream.root_url,
                 ANTHROPIC_API_KEY="sk-ant-secret", LLM_MODEL="fake-claude", HEARTBEAT_S=0.2, **env)


def test_relays_text_thinking_and_usage(serve, upstream):
    upstream.tokens, upstream.tokens_per_s, upstream.reasoning_tokens = 12, 100, 2
    server = relay(serve, upstream, ANTHROPIC_THINKING_TOKENS=2048)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hello there", "system": "be brief",
                                                        "max_tokens": 50})
    assert got.text == upstream.expected_text("hello there")
    assert "".join(e["text"] for e in got.of("reasoning")) == "think think "
    done = got.events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 14, "total_tokens": 18}  # as counted upstream
    sent = upstream.requests[-1]
    assert sent["stream"] is True and sent["model"] == "fake-claude" and sent["max_tokens"] == 50
    assert sent["system"] == "be brief" and [m["role"] for m in sent["messages"]] == ["user"]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    # The SDK's own choice of header (x-api-key, or a Bearer token in this version of it).
    assert "sk-ant-secret" in (upstream.last_api_key, (upstream.last_authorization or "").removeprefix("Bearer "))
    assert upstream.last_anthropic_version


def test_a_length_stop_and_the_default_max_tokens(serve, upstream):
    upstream.finish_reason = "length"
    server = relay(serve, upstream)
    done = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}).events[-1]
    assert done["finish_reason"] == "length"
    assert upstream.requests[-1]["max_tokens"] == 4096 and "thinking" not in upstream.requests[-1]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_client_disconnect_closes_the_upstream(serve, upstream, worker_class):
    upstream.tokens, upstream.hang_after = 1000, 3
    server = relay(serve, upstream, worker_class, IDLE_TIMEOUT_S=600)
    three_tokens = upstream.expected_text("x", 3)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}, until=lambda got: got.text == three_tokens)
    upstream.wait_for(lambda: upstream.closed_by_client == 1)
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to end")
    turn = server.get(f"/conversations/{got.events[0]['conversation_id']}").json()["messages"][-1]
    assert (turn["status"], turn["content"]) == ("interrupted", three_tokens)


@pytest.mark.parametrize(("status", "code", "http"), [
    (429, "rate_limited", 429), (400, "invalid_request", 400), (401, "upstream_error", 503),
    (529, "upstream_unavailable", 503), (500, "upstream_error", 503)])
def test_refusals_are_the_services_codes(serve, upstream, status, code, http):
    upstream.fail_status = status
    server = relay(serve, upstream)
    response = server.post("/chat/sse", json={"prompt": "x"})
    assert response.status_code == http and response.json()["error"]["code"] == code
    assert SECRET_DETAIL not in response.text


def test_an_error_event_mid_answer(serve, upstream):
    upstream.error_after = 2
    server = relay(serve, upstream)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"})
    assert got.text == upstream.expected_text("x", 2)
    assert got.events[-1]["error"]["code"] == "upstream_unavailable"  # overloaded: worth a retry
    assert SECRET_DETAIL not in str(got.events)


def test_a_stream_cut_short_is_an_error(serve, upstream):
    upstream.drop_after = 2
    server = relay(serve, upstream)
    assert read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}).events[-1]["error"]["code"] == "upstream_error"


def test_a_provider_of_your_own_by_its_import_path(serve):
    """docs/providers.md's example, named as LLM_PROVIDER=package.module:ClassName."""
    server = serve("gthread", LLM_PROVIDER="examples.echo_provider:EchoProvider")
    assert server.get("/healthz").json()["provider"] == "echo"
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "one two three"})
    assert got.text == "one two three" and got.events[-1]["usage"]["completion_tokens"] == 3
    response = server.post("/chat/sse", json={"prompt": "   "})
    assert response.status_code == 400 and response.json()["error"]["message"] == "nothing to echo"


def test_a_provider_that_fails_in_its_own_code_leaves_its_turn_saved_and_the_conversation_free(serve):
    """Not a ProviderError but a bug: a JSON 500, the turn saved as an error, and the next turn of
    the conversation answered at once rather than a 409 until the turn's lease runs out."""
    server = serve("gevent", LLM_PROVIDER="tests.faulty_provider:FaultyProvider")
    conversation_id = read_sse(server.url + "/chat/sse", json_body={"prompt": "one"}).events[0]["conversation_id"]
    failed = server.post("/chat/sse", json={"prompt": "fault", "conversation_id": conversation_id})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert "RuntimeError" not in failed.text
    again = read_sse(server.url + "/chat/sse", json_body={"prompt": "two", "conversation_id": conversation_id})
    assert again.text == "two"
    turns = server.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [(t["role"], t["content"], t["status"]) for t in turns] == [
        ("user", "one", "complete"), ("assistant", "one", "complete"),
        ("user", "fault", "complete"), ("assistant", "", "error"),
        ("user", "two", "complete"), ("assistant", "two", "complete"),
    ]


def test_tool_calls_are_anthropics_tool_use(serve, upstream):
    """OpenAI's tools through /v1 to Anthropic's tool use and back: the calls stream as OpenAI
    chunks the SDK accumulates; the results go back as `tool_result` blocks."""
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    weather = {"name": "get_weather", "description": "the weather", "parameters": city}
    tools = [{"type": "function", "function": weather}, {"type": "function", "function": {"name": "get_time"}}]
    upstream.tool_calls = [{"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                           {"name": "get_time", "arguments": "{}"}]
    server = relay(serve, upstream)
    messages = [{"role": "user", "content": "weather and time?"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        with client.chat.completions.stream(model="fake-claude", messages=messages, tools=tools,
                                            tool_choice="required", parallel_tool_calls=False) as stream:
            final = stream.get_final_completion().choices[0]
        assert final.finish_reason == "tool_calls"
        calls = final.message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            (c["name"], c["arguments"]) for c in upstream.tool_calls]
        sent = upstream.requests[-1]
        assert sent["tools"] == [
            {"name": "get_weather", "description": "the weather", "input_schema": city},
            {"name": "get_time", "input_schema": {"type": "object"}}]
        assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
        messages += [final.message, *({"role": "tool", "tool_call_id": c.id, "content": f"result {i}"}
                                      for i, c in enumerate(calls))]
        upstream.tool_calls = None
        answer = client.chat.completions.create(model="fake-claude", messages=messages, tools=tools).choices[0]
    assert answer.message.content == upstream.expected_text("")  # it echoes the last user text: none
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": calls[0].id, "name": "get_weather", "input": {"city": "Zürich"}},
            {"type": "tool_use", "id": calls[1].id, "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "result 0"},
                                     {"type": "tool_result", "tool_use_id": calls[1].id, "content": "result 1"}]},
    ]
