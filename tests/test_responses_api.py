"""POST /v1/responses and GET /v1/responses/<id> through real gunicorn (gevent), relaying to a
local Chat Completions upstream, with the official `openai` SDK as the client."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from .conftest import start_server
from .fake_upstream import SECRET_DETAIL, FakeUpstream

MODEL = "fake-model"
KEY, OTHER_KEY = "key-a", "key-b"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    server = start_server(tmp_path_factory.mktemp("responses"), "gevent", {
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "sk-test-secret",
        "LLM_MODEL": MODEL,
        "API_KEYS": f"{KEY},{OTHER_KEY}",
        "RESUME_GRACE_S": "30",  # a streamed answer whose client left runs on, to be resumed
    })
    yield server
    server.stop()


@pytest.fixture
def sdk(server, upstream):
    upstream.reset()
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
        yield client


def sse_events(response: requests.Response) -> list[dict]:
    """The `data` of each event of a Responses stream, checking that `event:` names its type."""
    events = []
    for frame in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if lines:
            data = json.loads(lines["data"])
            assert lines["event"] == data["type"]
            events.append(data)
    return events


def checked(events) -> list:
    """The SDK parses events leniently (`construct`): validate each as its published type."""
    from typing import get_args

    from openai.types.responses import ResponseStreamEvent

    union = get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    types = {get_args(kind.model_fields["type"].annotation)[0]: kind for kind in get_args(union)}
    for event in events:
        types[event.type].model_validate(event.to_dict(), strict=True)
    return events


def test_streamed_text_with_every_typed_event(sdk, upstream):
    upstream.tokens = 12
    events = checked(list(sdk.responses.create(model=MODEL, input="hello 😀\n\ndata: x", stream=True)))

    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == upstream.expected_text("hello 😀\n\ndata: x")
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text and final.model == MODEL
    assert final.id.startswith("resp_") and {e.response.id for e in events if hasattr(e, "response")} == {final.id}
    assert final.usage.output_tokens == 12 and final.usage.total_tokens == final.usage.input_tokens + 12
    assert upstream.requests[-1]["messages"] == [{"role": "user", "content": "hello 😀\n\ndata: x"}]


def test_stream_helper_accumulates_reasoning_and_text(sdk, upstream):
    upstream.tokens, upstream.reasoning_tokens = 6, 3
    with sdk.responses.stream(model=MODEL, input=[{"role": "user", "content": "think"}],
                              instructions="be brief") as stream:
        events = list(stream)
        final = stream.get_final_response()
    checked(list(sdk.responses.retrieve(final.id, stream=True)))

    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "think " * 3
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "think " * 3
    assert message.type == "message" and message.status == "completed"
    assert final.output_text == upstream.expected_text("think") and final.instructions == "be brief"
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    assert upstream.requests[-1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_whole_response_and_get_of_the_stored_one(sdk, upstream):
    upstream.tokens = 8
    created = sdk.responses.create(model=MODEL, input=[
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "part one"},
                                                         {"type": "input_text", "text": "part two"}]},
    ], metadata={"k": "v"}, temperature=0.5, top_p=0.9, user="u-1", reasoning={"effort": "low"}, max_output_tokens=64,
        tools=[{"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}},
                "strict": False}], tool_choice="auto")
    assert created.status == "completed" and created.output_text == upstream.expected_text("part one\npart two")
    assert created.metadata == {"k": "v"} and created.temperature == 0.5
    sent = upstream.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["user"], sent["metadata"], sent["reasoning_effort"]) == \
        (0.5, 0.9, "u-1", {"k": "v"}, "low")

    stored = sdk.responses.retrieve(created.id)
    for response in (created, stored):
        openai.types.responses.Response.model_validate(response.to_dict(), strict=True)
    assert stored.id == created.id and stored.output_text == created.output_text
    assert stored.output[0].id == created.output[0].id and stored.usage == created.usage
    # What the request said of itself comes back as it was sent (kept with the answer), not defaults.
    echoed = ["instructions", "previous_response_id", "max_output_tokens", "temperature", "top_p", "tools",
              "tool_choice", "parallel_tool_calls", "reasoning", "metadata", "user", "store", "text", "truncation"]
    assert {f: getattr(stored, f) for f in echoed} == {f: getattr(created, f) for f in echoed}
    assert (stored.metadata, stored.temperature, stored.top_p, stored.user) == ({"k": "v"}, 0.5, 0.9, "u-1")
    assert [t.name for t in stored.tools] == ["get_time"] and stored.max_output_tokens == 64
    assert stored.instructions is None  # the developer message is input, not `instructions` (as at OpenAI)
    assert abs(stored.created_at - created.created_at) <= 1  # whole seconds, of two readings of the clock


def test_previous_response_id_continues_the_stored_conversation(sdk, upstream):
    first = sdk.responses.create(model=MODEL, input="my name is Ada", instructions="rules")
    second = sdk.responses.create(model=MODEL, input="what is my name?", previous_response_id=first.id)
    assert upstream.requests[-1]["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "what is my name?"},
    ]
    assert sdk.responses.retrieve(second.id).previous_response_id == first.id
    # From an earlier response of the chain: a branch, with the chain up to it.
    sdk.responses.create(model=MODEL, input="again", previous_response_id=first.id)
    assert [m["content"] for m in upstream.requests[-1]["messages"]][1:] == ["my name is Ada", first.output_text,
                                                                              "again"]


def test_store_false_keeps_nothing(sdk, server, upstream):
    response = sdk.responses.create(model=MODEL, input="forget me", store=False)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.responses.create(model=MODEL, input="and then?", previous_response_id=response.id)
    assert raised.value.body["param"] == "previous_response_id"
    # Continuing a stored one without storing: the chain goes upstream, nothing new is kept.
    kept = sdk.responses.create(model=MODEL, input="keep me")
    conversation_id = server.get(f"/v1/responses/{kept.id}", headers=AUTH).headers["X-Conversation-Id"]
    before = server.get(f"/conversations/{conversation_id}", headers=AUTH).json()["messages"]
    unkept = sdk.responses.create(model=MODEL, input="but not me", previous_response_id=kept.id, store=False)
    assert [m["content"] for m in upstream.requests[-1]["messages"]] == ["keep me", kept.output_text, "but not me"]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unkept.id)
    assert server.get(f"/conversations/{conversation_id}", headers=AUTH).json()["messages"] == before


def test_max_output_tokens_gives_incomplete(sdk, upstream):
    upstream.tokens, upstream.finish_reason = 4, "length"  # what an upstream does at the limit
    events = checked(list(sdk.responses.create(model=MODEL, input="long", max_output_tokens=4, stream=True)))
    assert upstream.requests[-1]["max_tokens"] == 4
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.output_text == upstream.expected_text("long")
    whole = sdk.responses.create(model=MODEL, input="long", max_output_tokens=4)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"


def test_upstream_failure_gives_response_failed(sdk, server, upstream):
    upstream.tokens, upstream.error_after = 10, 3
    events = checked(list(sdk.responses.create(model=MODEL, input="fail", stream=True)))
    error, failed = events[-2:]
    assert error.type == "error" and error.code == "upstream_error" and SECRET_DETAIL not in error.message
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and failed.response.error.message == error.message
    received = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert failed.response.output[0].status == "incomplete" and failed.response.output_text == received
    with sdk.responses.stream(model=MODEL, input="fail") as stream:
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    # The partial answer is kept, and GET shows it failed.
    stored = sdk.responses.retrieve(failed.response.id)
    assert stored.status == "failed" and stored.output_text == received


def test_resume_with_starting_after_has_no_gap_and_no_duplicate(sdk, server, upstream):
    upstream.tokens, upstream.tokens_per_s = 30, 100
    with sdk.responses.with_streaming_response.create(model=MODEL, input="resume me", stream=True) as raw:
        first = []
        for event in raw.parse():
            first.append(event)
            if len(first) == 8:
                break  # the client leaves in the middle; the answer runs on (RESUME_GRACE_S)
    response_id = first[0].response.id
    resumed = list(sdk.responses.retrieve(response_id, stream=True, starting_after=7))
    assert resumed[0].sequence_number == 8 and resumed[-1].type == "response.completed"
    numbers = [e.sequence_number for e in first + resumed]
    assert numbers == list(range(len(numbers)))
    text = "".join(e.delta for e in first + resumed if e.type == "response.output_text.delta")
    assert text == upstream.expected_text("resume me") == resumed[-1].response.output_text
    # The ended one, streamed again whole, is the same events; the helper filters its start itself.
    again = list(sdk.responses.retrieve(response_id, stream=True))
    assert [e.type for e in again] == [e.type for e in first + resumed]
    with sdk.responses.stream(response_id=response_id, starting_after=7) as stream:
        assert [e.sequence_number for e in stream][0] == 8
        assert stream.get_final_response().output_text == text


BAD = [
    ({"input": "hi", "bogus": 1}, "bogus"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({"input": "hi", "temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "input[1]"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "text"),
    ({"input": "hi", "store": "no"}, "store"),
    ({"input": "hi", "reasoning": {"summary": "auto"}}, "reasoning"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name", "parameters": {}, "strict": True}]},
     "tools[0]"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[param for _, param in BAD])
def test_bad_input_is_a_400_naming_the_field(server, upstream, body, param):
    for stream in (False, True):
        response = server.post("/v1/responses", json={"model": MODEL, **body, "stream": stream}, headers=AUTH)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (404 if param == "previous_response_id" else 400, param), error
        assert error["message"] and error["type"] == "invalid_request_error" and "Traceback" not in error["message"]


def test_get_of_another_keys_or_an_unknown_response_is_a_404(server, sdk):
    response = sdk.responses.create(model=MODEL, input="mine")
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for query in ({}, {"stream": "true"}):
        assert server.get(f"/v1/responses/{response.id}", params=query, headers=other).status_code == 404
        body = server.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": response.id},
                           headers=other).json()
        assert body["error"]["param"] == "previous_response_id"
    unknown = response.id[:-1] + ("1" if response.id[-1] == "0" else "0")
    for response_id in (unknown, "resp_x", "nothing"):
        assert server.get(f"/v1/responses/{response_id}", headers=AUTH).status_code == 404
    got = server.get(f"/v1/responses/{response.id}", params={"starting_after": "x", "stream": "true"}, headers=AUTH)
    assert got.status_code == 400 and got.json()["error"]["param"] == "starting_after"
    replayed = sse_events(server.get(f"/v1/responses/{response.id}", params={"stream": "true"}, headers=AUTH))
    assert replayed[-1]["type"] == "response.completed"
    assert replayed[-1]["response"]["output"][0]["content"][0]["text"] == \
        response.output_text


TOOLS = [{"type": "function", "name": name, "description": f"the {name}", "strict": True,
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}
         for name in ("search", "lookup")]
CALLS = [{"name": "search", "arguments": '{"q": "a long query, cut mid-token"}'},
         {"name": "lookup", "arguments": '{"q": "ünïcode 😀"}'}]


@pytest.mark.parametrize("style", ["openai", "vllm", "repeating"])
def test_parallel_function_calls_relayed_from_the_upstream(sdk, upstream, style):
    upstream.tool_calls, upstream.tool_style = CALLS, style
    with sdk.responses.stream(model=MODEL, input="find it", tools=TOOLS, tool_choice="auto") as stream:
        events = checked(list(stream))
        final = stream.get_final_response()
    sent = upstream.requests[-1]
    assert sent["tools"] == [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
                             for tool in TOOLS] and sent["tool_choice"] == "auto"
    assert [(c.type, c.name, c.arguments, c.status) for c in final.output] == [
        ("function_call", call["name"], call["arguments"], "completed") for call in CALLS]
    assert len({c.call_id for c in final.output}) == 2 and final.status == "completed"
    by_item = {}
    for event in events:
        if event.type == "response.function_call_arguments.delta":
            by_item.setdefault(event.output_index, []).append(event.delta)
    assert {i: "".join(d) for i, d in by_item.items()} == {0: CALLS[0]["arguments"], 1: CALLS[1]["arguments"]}
    assert all(len(d) > 1 for d in by_item.values())  # streamed in fragments


def test_a_fault_amid_function_call_fragments_fails_the_response(sdk, upstream):
    upstream.tool_calls, upstream.error_after = CALLS, 4
    events = checked(list(sdk.responses.create(model=MODEL, input="find it", tools=TOOLS, stream=True)))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    call = events[-1].response.output[0]
    assert call.type == "function_call" and call.status == "incomplete"
    assert CALLS[0]["arguments"].startswith(call.arguments) and call.arguments != CALLS[0]["arguments"]
    stored = sdk.responses.retrieve(events[-1].response.id)  # the partial turn is kept
    assert stored.status == "failed" and stored.output[0].arguments == call.arguments


def test_get_of_one_in_progress_then_stopped(sdk, server, upstream):
    upstream.tokens, upstream.hang_after = 20, 5  # the model goes silent after 5 tokens
    with sdk.responses.with_streaming_response.create(model=MODEL, input="wait", stream=True) as raw:
        conversation_id = raw.headers["X-Conversation-Id"]
        received = []
        for event in raw.parse():
            received.append(event)
            if sum(e.type == "response.output_text.delta" for e in received) == 5:
                break
    text = "".join(e.delta for e in received if e.type == "response.output_text.delta")
    response_id = received[0].response.id
    now = sdk.responses.retrieve(response_id)
    assert now.status == "in_progress" and now.output_text == text and now.output[0].status == "in_progress"
    stopped = server.post(f"/conversations/{conversation_id}/stop", headers=AUTH)
    assert stopped.status_code == 200 and stopped.json()["status"] == "interrupted"
    after = sdk.responses.retrieve(response_id)
    assert after.status == "failed" and after.output_text == text and after.output[0].status == "incomplete"
