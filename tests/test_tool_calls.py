"""Tool calls end to end: relayed from an OpenAI-compatible upstream (streamed as OpenAI and vLLM
stream them) and made by the demo model, through the official SDK on /v1 and through the service's
own SSE and NDJSON streams; the agent loop (ask, run the tool, send its result, get the answer),
continued by `conversation_id` and by resending the messages; a fault mid-call; the store's rows.

One gevent server relaying one fake upstream, and one on the demo model, for the module."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import openai
import pytest
import requests

from .conftest import ROOT, STORES, json_schema_validator, start_server, store_url, wait_for
from .fake_upstream import FakeUpstream
from .streams import read_sse


def strict_tool(name: str, properties: dict, description: str = "") -> dict:
    """A function tool whose arguments must be exactly `properties` (the SDK's `stream()` parses
    only strict tools' arguments)."""
    parameters = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters,
                                             "strict": True}}


WEATHER = strict_tool("get_weather", {
    "city": {"type": "string", "minLength": 2},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "at": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                            "lon": {"type": "number"}},
           "required": ["lat", "lon"], "additionalProperties": False},
    "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "minItems": 2},
    "alerts": {"type": "boolean"},
    "note": {"type": ["string", "null"]},
}, "the weather somewhere")
CLOCK = strict_tool("get_time", {"tz": {"type": "string", "format": "date-time"}})
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
# What the upstream calls: arguments that a 3-character cut splits mid-token, and mid-word in "Zürich".
RELAYED = [
    {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "unit": "celsius", "days": 3})},
    {"name": "get_time", "arguments": '{"tz": "Europe/Zurich"}'},
]
ASK_BOTH = "Use get_weather and get_time for Zürich, please."


def run_tool(name: str, arguments: str) -> str:
    """The client's own tools, as an agent runs them."""
    args = json.loads(arguments)
    return f"{args['city']}: 21 degrees for {args['days']} days" if name == "get_weather" else f"noon in {args['tz']}"


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as up:
        yield up


@pytest.fixture(autouse=True)
def fresh_upstream(upstream):
    upstream.reset()
    upstream.tool_calls = RELAYED


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("relay")
    server = start_server(tmp, "gevent", {"LLM_PROVIDER": "openai", "OPENAI_BASE_URL": upstream.base_url,
                                          "OPENAI_API_KEY": "sk-test", "LLM_MODEL": "fake-model"}, tmp / "relay.db")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    server = start_server(tmp, "gevent", {"DEMO_TOKENS": "8"}, tmp / "demo.db")
    yield server
    server.stop()


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def accumulate(chunks) -> tuple[dict[int, dict], list[str | None], list]:
    """The calls that streamed chunks add up to, as a client accumulates them (by `index`; `id`,
    `type` and `name` from the fragment that has them), the finish reasons, and the fragments."""
    calls: dict[int, dict] = {}
    reasons, fragments = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for fragment in choice.delta.tool_calls or ():
                fragments.append(fragment)
                call = calls.setdefault(fragment.index, {"id": None, "type": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or fragment.id
                call["type"] = call["type"] or fragment.type
                call["name"] = call["name"] or fragment.function.name
                call["arguments"] += fragment.function.arguments or ""
    return calls, [r for r in reasons if r], fragments


def first_fragments_only_name_the_call(fragments) -> None:
    """OpenAI's way, which clients that accumulate rely on: `id`, `type` and `function.name` on a
    call's first fragment, never again; more than one fragment of arguments per call."""
    seen: dict[int, int] = {}
    for fragment in fragments:
        first = fragment.index not in seen
        seen[fragment.index] = seen.get(fragment.index, 0) + 1
        assert (fragment.id is not None, fragment.type == "function", fragment.function.name is not None) == (
            first, first, first)
    assert all(count > 2 for count in seen.values()), seen


# -- relayed from an upstream --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["openai", "vllm"])
def test_the_sdk_stream_helper_accumulates_parallel_relayed_calls(relay, upstream, style):
    upstream.tool_style = style
    with sdk(relay) as client, client.chat.completions.stream(
        model="fake-model", messages=[{"role": "user", "content": ASK_BOTH}], tools=TOOLS, tool_choice="auto",
        parallel_tool_calls=True,
    ) as stream:
        argument_deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("function", r["name"], r["arguments"]) for r in RELAYED]
    assert [c.function.parsed_arguments for c in calls] == [json.loads(r["arguments"]) for r in RELAYED]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert len(argument_deltas) > 2 * 2  # in fragments, as the upstream sent them
    sent = upstream.requests[-1]
    assert (sent["tools"], sent["tool_choice"], sent["parallel_tool_calls"]) == (TOOLS, "auto", True)


@pytest.mark.parametrize("style", ["openai", "vllm", "repeating"])
def test_create_stream_relays_the_fragments_as_openai_sends_them(relay, upstream, style):
    upstream.tool_style = style
    with sdk(relay) as client:
        chunks = list(client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": ASK_BOTH}], tools=TOOLS, stream=True))
    calls, reasons, fragments = accumulate(chunks)
    assert [(c["type"], c["name"], c["arguments"]) for c in calls.values()] == [
        ("function", r["name"], r["arguments"]) for r in RELAYED]
    assert reasons == ["tool_calls"]
    first_fragments_only_name_the_call(fragments)


def test_a_whole_relayed_completion_has_its_tool_calls(relay, upstream):
    with sdk(relay) as client:
        completion = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": ASK_BOTH}], tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (r["name"], r["arguments"]) for r in RELAYED]


def test_the_tool_history_goes_upstream_on_the_next_turns(relay, upstream):
    """Resent by the client (/v1), then continued by conversation_id (SSE): the upstream gets the
    assistant's calls (content null) and the tools' results in OpenAI's shape, both times."""
    messages = [{"role": "user", "content": ASK_BOTH}]
    with sdk(relay) as client:
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=messages, tools=TOOLS)
        message = raw.parse().choices[0].message
        messages += [message, *({"role": "tool", "tool_call_id": c.id, "content": run_tool(c.function.name,
                                 c.function.arguments)} for c in message.tool_calls)]
        upstream.tool_calls = None  # it answers in text now
        again = client.chat.completions.with_raw_response.create(model="fake-model", messages=messages, tools=TOOLS)
    assert again.headers["X-Conversation-Id"] == raw.headers["X-Conversation-Id"]
    assert again.parse().choices[0].message.content == upstream.expected_text(ASK_BOTH)
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in message.tool_calls]
    history = [{"role": "user", "content": ASK_BOTH}, {"role": "assistant", "content": None, "tool_calls": calls},
               *({"role": "tool", "tool_call_id": c["id"], "content": run_tool(c["function"]["name"],
                  c["function"]["arguments"])} for c in calls)]
    assert upstream.requests[-1]["messages"] == history
    upstream.tool_calls = RELAYED
    got = read_sse(relay.url + "/chat/sse", json_body={
        "conversation_id": raw.headers["X-Conversation-Id"], "prompt": "get_time again", "tools": TOOLS})
    assert [e["name"] for e in got.of("tool_call")] == ["get_weather", "get_time"]
    answer = {"role": "assistant", "content": upstream.expected_text(ASK_BOTH)}
    history += [answer, {"role": "user", "content": "get_time again"}]
    assert upstream.requests[-1]["messages"] == history
    # Calls that no result answers (the client asked something else) are not sent: an upstream
    # refuses an assistant message whose calls have no results after it.
    read_sse(relay.url + "/chat/sse", json_body={"conversation_id": raw.headers["X-Conversation-Id"],
                                                 "prompt": "never mind"})
    assert upstream.requests[-1]["messages"] == [*history, {"role": "assistant", "content": ""},
                                                 {"role": "user", "content": "never mind"}]


@pytest.mark.parametrize("fault", ["error_after", "drop_after"])
def test_a_fault_amid_the_fragments_is_raised_and_the_partial_turn_kept(relay, upstream, fault):
    setattr(upstream, fault, 4)  # fragments: the first call's name, then 3 of its arguments' pieces
    with sdk(relay) as client, client.chat.completions.with_streaming_response.create(
        model="fake-model", messages=[{"role": "user", "content": ASK_BOTH}], tools=TOOLS, stream=True
    ) as response:
        conversation_id = response.headers["X-Conversation-Id"]
        chunks = []
        with pytest.raises(openai.APIError) as info:
            for chunk in response.parse():
                chunks.append(chunk)
    assert "upstream_error" in str(info.value.body)
    calls, reasons, _ = accumulate(chunks)
    partial = RELAYED[0]["arguments"][:9]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", partial)] and not reasons
    turn = wait_for(lambda: (m := relay.get(f"/conversations/{conversation_id}").json()["messages"][-1])
                    and m["status"] != "streaming" and m, what="the turn to be saved")
    assert (turn["status"], turn["error_code"]) == ("error", "upstream_error")
    assert turn["tool_calls"] == [{"id": calls[0]["id"], "type": "function",
                                   "function": {"name": "get_weather", "arguments": partial}}]


# -- made by the demo model -----------------------------------------------------------------------


def valid_calls(calls: list[tuple[str, str]], names: list[str]) -> None:
    """(name, arguments) pairs: the functions `names`, each with arguments its schema accepts."""
    assert [name for name, _ in calls] == names
    validate = json_schema_validator()
    for name, arguments in calls:
        validate(json.loads(arguments), SCHEMAS[name])


def test_the_demo_calls_the_named_tools_with_valid_arguments_every_way(demo):
    ask = [{"role": "user", "content": ASK_BOTH}]
    with sdk(demo) as client:
        with client.chat.completions.stream(model="demo", messages=ask, tools=TOOLS) as stream:
            deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
            helper = stream.get_final_completion().choices[0]
        chunks = list(client.chat.completions.create(model="demo", messages=ask, tools=TOOLS, stream=True))
        whole = client.chat.completions.create(model="demo", messages=ask, tools=TOOLS).choices[0]
    assert helper.finish_reason == whole.finish_reason == "tool_calls"
    helper_calls = [(c.function.name, c.function.arguments) for c in helper.message.tool_calls]
    valid_calls(helper_calls, ["get_weather", "get_time"])
    assert [c.function.parsed_arguments for c in helper.message.tool_calls] == [json.loads(a) for _, a in helper_calls]
    assert len(deltas) > 2 * 2
    calls, reasons, fragments = accumulate(chunks)
    first_fragments_only_name_the_call(fragments)
    assert reasons == ["tool_calls"]
    # Deterministic: the same calls, ids included, streamed or whole.
    streamed = [(c["id"], c["name"], c["arguments"]) for c in calls.values()]
    assert streamed == [(c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert streamed == [(c.id, c.function.name, c.function.arguments) for c in helper.message.tool_calls]
    assert whole.message.content is None


@pytest.mark.parametrize("options, prompt, called", [
    ({"parallel_tool_calls": False}, ASK_BOTH, ["get_weather"]),
    ({"tool_choice": "none"}, ASK_BOTH, []),
    ({"tool_choice": "required"}, "What now?", ["get_weather"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "Weather, please", ["get_time"]),
    ({}, "What is the weather? (No tool is named here: get_weathers is not one.)", []),
])
def test_the_demo_calls_what_tool_choice_allows(demo, options, prompt, called):
    with sdk(demo) as client:
        choice = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": prompt}], tools=TOOLS, **options).choices[0]
    valid_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()], called)
    assert choice.finish_reason == ("tool_calls" if called else "stop")
    assert (choice.message.content is None) == bool(called)


def test_an_agent_loop_over_v1_resending_the_messages(demo):
    messages = [{"role": "system", "content": "use tools"}, {"role": "user", "content": ASK_BOTH}]
    with sdk(demo) as client:
        raw = client.chat.completions.with_raw_response.create(model="demo", messages=messages, tools=TOOLS)
        message = raw.parse().choices[0].message
        results = [run_tool(c.function.name, c.function.arguments) for c in message.tool_calls]
        # The same messages but for the arguments of a call: another history, so another conversation.
        other_call = {"id": message.tool_calls[0].id, "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}
        other = [*messages, {"role": "assistant", "content": None, "tool_calls": [other_call]},
                 {"role": "tool", "tool_call_id": other_call["id"], "content": results[0]}]
        fork = client.chat.completions.with_raw_response.create(model="demo", messages=other, tools=TOOLS)
        assert fork.headers["X-Conversation-Id"] != raw.headers["X-Conversation-Id"]
        messages += [message, *({"role": "tool", "tool_call_id": c.id, "content": result}
                                for c, result in zip(message.tool_calls, results, strict=True))]
        with client.chat.completions.with_streaming_response.create(
            model="demo", messages=messages, tools=TOOLS, stream=True
        ) as response:
            answer = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
            assert response.headers["X-Conversation-Id"] == raw.headers["X-Conversation-Id"]
        for call, result in zip(message.tool_calls, results, strict=True):
            assert f'The tool {call.function.name} returned: "{result}".' in answer
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "thanks"}]
        third = client.chat.completions.with_raw_response.create(model="demo", messages=messages, tools=TOOLS)
    assert third.headers["X-Conversation-Id"] == raw.headers["X-Conversation-Id"]
    assert third.parse().choices[0].message.content.startswith('This is turn 2. You said: "thanks".')
    stored = demo.get(f"/conversations/{raw.headers['X-Conversation-Id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "tool", "assistant", "user", "assistant"]


def test_the_example_agent_runs_its_tools_and_prints_the_answer(demo):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "tool_agent.py"), "Ask get_weather and get_time"],
                         env={**os.environ, "OPENAI_BASE_URL": demo.url + "/v1"}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert 'The tool get_weather returned: "21 degrees and clear in sample city".' in run.stdout
    assert "The tool get_time returned:" in run.stdout and "[get_time({}) -> " in run.stderr


def logged(server, message_id: str) -> dict:
    """The stream's log line."""
    def line() -> dict | None:
        lines = [json.loads(t) for t in server.log.read_text().splitlines() if f'"message_id": "{message_id}"' in t]
        return lines[0] if lines else None
    return wait_for(line, what="the stream's log line")


def test_an_agent_loop_over_sse_continued_by_conversation_id(demo):
    got = read_sse(demo.url + "/chat/sse", json_body={"prompt": "Ask get_weather", "tools": TOOLS})
    kinds = [e["type"] for e in got.events]
    assert kinds[:2] == ["start", "status"] and kinds[-2:] == ["tool_call", "done"]
    assert set(kinds[2:-2]) == {"tool_call_delta"} and len(kinds) - 4 > 2
    first, *rest = got.of("tool_call_delta")
    call = got.of("tool_call")[0]
    assert (first["id"], first["name"], first["index"]) == (call["id"], call["name"], call["index"]) == (
        call["id"], "get_weather", 0)
    assert all("id" not in e and "name" not in e for e in rest)
    assert "".join(e["arguments"] for e in got.of("tool_call_delta")) == call["arguments"]
    valid_calls([(call["name"], call["arguments"])], ["get_weather"])
    assert got.events[-1]["finish_reason"] == "tool_calls"
    conversation_id = got.events[0]["conversation_id"]
    assert logged(demo, got.events[0]["message_id"])["tokens"] == len(got.of("tool_call_delta"))
    result = run_tool(call["name"], call["arguments"])
    answer = read_sse(demo.url + "/chat/sse", json_body={
        "conversation_id": conversation_id, "tool_results": [{"tool_call_id": call["id"], "content": result}]})
    assert f'The tool get_weather returned: "{result}".' in answer.text
    assert answer.events[-1]["finish_reason"] == "stop"
    stored = demo.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [(m["role"], m["tool_call_id"]) for m in stored] == [
        ("user", None), ("assistant", None), ("tool", call["id"]), ("assistant", None)]
    assert stored[1]["tool_calls"] == [{"id": call["id"], "type": "function",
                                        "function": {"name": "get_weather", "arguments": call["arguments"]}}]
    assert stored[2]["content"] == result and stored[3]["content"] == answer.text


def test_batch_items_stream_their_tool_calls_as_ndjson(demo):
    with requests.post(demo.url + "/batch", json={"prompts": ["get_time?", "no tool"], "tools": TOOLS},
                       stream=True, timeout=30) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    first = [e for e in lines if e.get("index") == 0]
    calls = [e for e in first if e["type"] == "tool_call"]
    deltas = [e for e in first if e["type"] == "tool_call_delta"]
    assert [c["name"] for c in calls] == ["get_time"] and all(e["call_index"] == 0 for e in deltas + calls)
    assert "".join(e["arguments"] for e in deltas) == calls[0]["arguments"]
    done = {e["index"]: e["finish_reason"] for e in lines if e["type"] == "done"}
    assert done == {0: "tool_calls", 1: "stop"}


def test_a_blocking_answer_has_its_tool_calls(demo):
    whole = demo.post("/chat/blocking", json={"prompt": "get_time", "tools": TOOLS}).json()
    assert (whole["text"], whole["finish_reason"]) == ("", "tool_calls")
    (call,) = whole["tool_calls"]
    valid_calls([(call["function"]["name"], call["function"]["arguments"])], ["get_time"])
    stored = demo.get(f"/conversations/{whole['conversation_id']}").json()["messages"][-1]
    assert stored["tool_calls"] == whole["tool_calls"]


BAD = [
    ({"prompt": "x", "tools": [WEATHER, {"type": "function", "function": {"name": "a b"}}]}, "tools[1]"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0]"),
    ({"prompt": "x", "tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"prompt": "x", "tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({"prompt": "x", "tool_choice": "required"}, "'tool_choice'"),
    ({"prompt": "x", "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"prompt": "x", "tools": TOOLS, "parallel_tool_calls": 1}, "'parallel_tool_calls'"),
    ({"tool_results": [{"tool_call_id": "call_1", "content": "4"}]}, "'conversation_id'"),
    ({"conversation_id": "c", "tool_results": [{"content": "4"}]}, "tool_results[0]"),
]


def test_bad_tools_and_tool_results_are_400s_that_name_them(demo):
    for body, named in BAD:
        response = demo.post("/chat/sse", json=body)
        assert response.status_code == 400 and named in response.json()["error"]["message"], (body, response.text)
    got = read_sse(demo.url + "/chat/sse", json_body={"prompt": "get_time", "tools": TOOLS})
    conversation_id = got.events[0]["conversation_id"]
    response = demo.post("/chat/sse", json={"conversation_id": conversation_id,
                                            "tool_results": [{"tool_call_id": "call_made_up", "content": "4"}]})
    assert response.status_code == 400
    assert "tool_results[0]" in response.json()["error"]["message"] and "call_made_up" in response.text
    turns = demo.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in turns] == ["user", "assistant"]  # nothing of the refused turn is kept


# -- the store --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORES)
def test_tool_turns_are_rows_and_continue_on_each_store(kind, request, tmp_path):
    """The loop's messages are rows (a `tool_calls` JSON column, a `tool_call_id`), which a
    restarted server reads back: the conversation goes on by resending its messages."""
    url = store_url(kind, request, tmp_path)
    server = start_server(tmp_path, "gevent", {"DEMO_TOKENS": "8"}, database_url=url)
    try:
        messages = [{"role": "user", "content": "get_weather"}]
        with sdk(server) as client:
            raw = client.chat.completions.with_raw_response.create(model="demo", messages=messages, tools=TOOLS)
            call = raw.parse().choices[0].message.tool_calls[0]
            messages += [raw.parse().choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
            answer = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS).choices[0]
        server.stop()
        server = start_server(tmp_path, "gevent", {"DEMO_TOKENS": "8"}, database_url=url)
        messages += [answer.message, {"role": "user", "content": "get_time"}]
        with sdk(server) as client:
            again = client.chat.completions.with_raw_response.create(model="demo", messages=messages, tools=TOOLS)
        conversation_id = raw.headers["X-Conversation-Id"]
        assert again.headers["X-Conversation-Id"] == conversation_id
        assert [c.function.name for c in again.parse().choices[0].message.tool_calls] == ["get_time"]
        stored = server.get(f"/conversations/{conversation_id}").json()["messages"]
        assert [(m["role"], m["tool_call_id"]) for m in stored] == [
            ("user", None), ("assistant", None), ("tool", call.id), ("assistant", None), ("user", None),
            ("assistant", None)]
        assert [c["function"]["name"] for c in stored[1]["tool_calls"]] == ["get_weather"]
        if kind == "sqlite":  # rows anyone can read with sqlite3
            with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
                rows = db.execute("SELECT role, tool_calls, tool_call_id FROM messages WHERE conversation_id = ?"
                                  " ORDER BY created_at, rowid", (conversation_id,)).fetchall()
            assert json.loads(rows[1][1])[0]["id"] == call.id and rows[2][2] == call.id
    finally:
        server.stop()


def test_a_lost_workers_turn_keeps_the_calls_of_its_last_checkpoint(tmp_path):
    """In the store itself: a turn whose worker stopped renewing its lease mid-call is saved with
    the fragments of its last checkpoint, as calls."""
    from streaming.config import Settings
    from streaming.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "lost.db"), Settings(lease_s=0.0))
    conversation_id, _ = store.begin_turn(None, "m1", "get_weather", None, "demo", worker="w")
    store.checkpoint("w", {"m1": [{"type": "start"}, {"type": "tool_call_delta", "index": 0, "id": "call_1",
                                                      "name": "get_weather", "arguments": '{"ci'}]})
    assert wait_for(store.reap, what="the lease to run out") == ["m1"]
    turn = store.conversation(conversation_id)["messages"][-1]
    assert (turn["status"], turn["error_code"]) == ("interrupted", "worker_lost")
    assert turn["tool_calls"] == [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"ci'}}]
