"""Conversations that persist across workers and restarts, SSE resumption, and the batch stream:
the store's behaviour, run against each store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .conftest import STORES, store_url, wait_for
from .fake_upstream import FakeUpstream
from .streams import read_sse


@pytest.fixture(params=STORES)
def database_url(request, tmp_path) -> str:
    return store_url(request.param, request, tmp_path)


def converse(url: str, name: str, turns: int) -> str:
    """Several turns in one conversation, each sent after the previous one ended."""
    conversation_id = None
    for turn in range(1, turns + 1):
        body = {"prompt": f"{name} turn {turn}"}
        if conversation_id:
            body["conversation_id"] = conversation_id
        got = read_sse(url + "/chat/sse", json_body=body)
        assert got.events[-1]["type"] == "done", got.events[-1]
        assert got.text.startswith(f'This is turn {turn}. You said: "{name} turn {turn}".')
        conversation_id = got.events[0]["conversation_id"]
    return conversation_id


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_concurrent_conversations_across_workers(serve, worker_class):
    server = serve(worker_class, WEB_CONCURRENCY=3, DEMO_TOKENS_PER_S=200, DEMO_TOKENS=20)
    names = [f"user{i}" for i in range(12)]
    with ThreadPoolExecutor(len(names)) as pool:
        ids = list(pool.map(lambda name: converse(server.url, name, 3), names))
    assert len(set(ids)) == len(names)
    for name, conversation_id in zip(names, ids, strict=True):
        messages = server.get(f"/conversations/{conversation_id}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert [m["content"] for m in messages[::2]] == [f"{name} turn {t}" for t in (1, 2, 3)]
        assert all(m["status"] == "complete" for m in messages)
        assert messages[5]["content"].startswith(f'This is turn 3. You said: "{name} turn 3".')
        assert messages[5]["usage"]["completion_tokens"] == 20


def test_history_survives_a_restart(serve):
    first = serve("gevent")
    conversation_id = converse(first.url, "before", 1)
    first.stop()
    second = serve("gthread")
    got = read_sse(second.url + "/chat/sse", json_body={"prompt": "after", "conversation_id": conversation_id})
    assert got.text.startswith('This is turn 2. You said: "after".')
    assert len(second.get(f"/conversations/{conversation_id}").json()["messages"]) == 4


def test_list_and_delete(serve):
    server = serve()
    ids = [converse(server.url, f"c{i}", 1) for i in range(3)]
    page = server.get("/conversations", params={"limit": 2}).json()
    assert [c["id"] for c in page["conversations"]] == ids[::-1][:2]
    rest = server.get("/conversations", params={"limit": 2, "before": page["next_before"]}).json()
    assert [c["id"] for c in rest["conversations"]] == [ids[0]] and rest["next_before"] is None
    assert server.get("/conversations", params={"limit": 3}).json()["next_before"] is None  # none older
    assert page["conversations"][0]["title"] == "c2 turn 1"
    assert requests.delete(f"{server.url}/conversations/{ids[0]}", timeout=10).status_code == 204
    for response in (server.get(f"/conversations/{ids[0]}"), requests.delete(f"{server.url}/conversations/{ids[0]}")):
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = server.post("/chat", json={"prompt": "x", "conversation_id": ids[0]})
    assert response.status_code == 404


def test_second_turn_or_delete_while_streaming_is_409(serve):
    server = serve("gevent", DEMO_HANG_AFTER=2, IDLE_TIMEOUT_S=600, HEARTBEAT_S=0.2)
    response = requests.post(server.url + "/chat", json={"prompt": "x"}, stream=True, timeout=30)
    conversation_id = response.headers["X-Conversation-Id"]
    busy = server.post("/chat/sse", json={"prompt": "y", "conversation_id": conversation_id})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy"
    refused = requests.delete(f"{server.url}/conversations/{conversation_id}", timeout=10)  # its answer would be
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conversation_busy"  # lost
    response.close()
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the first answer to stop")
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "y", "conversation_id": conversation_id},
                   until=lambda got: got.text == "This is")  # the demo hangs after two tokens
    assert got.events[0]["conversation_id"] == conversation_id
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the second answer to stop")
    assert requests.delete(f"{server.url}/conversations/{conversation_id}", timeout=10).status_code == 204


def sse_reconnect(url: str, last_event_id: str) -> requests.Response:
    return requests.get(url + "/chat/sse", params={"prompt": "ignored"}, headers={"Last-Event-ID": last_event_id},
                        stream=True, timeout=30)


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_last_event_id_replays_an_ended_answer(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS=10, DEMO_TOKENS_PER_S=100)
    whole = read_sse(server.url + "/chat/sse", json_body={"prompt": "replay me"})
    cut = len(whole.ids) // 2
    resumed = read_sse(server.url + "/chat/sse", method="GET", headers={"Last-Event-ID": whole.ids[cut]})
    assert [e["type"] for e in resumed.events][-1] == "done"
    assert whole.text.endswith(resumed.text) and resumed.text
    assert "".join(e.get("text", "") for e in whole.events[: cut + 1]) + resumed.text == whole.text
    assert int(resumed.ids[0].split(":")[1]) > int(whole.ids[cut].split(":")[1])
    conversation = server.get(f"/conversations/{whole.events[0]['conversation_id']}").json()
    assert len(conversation["messages"]) == 2  # no second answer was generated

    nothing_after_the_end = sse_reconnect(server.url, whole.ids[-1])
    assert nothing_after_the_end.status_code == 204
    assert nothing_after_the_end.content == b"" and "Content-Type" not in nothing_after_the_end.headers
    assert sse_reconnect(server.url, "unknown:3").status_code == 204
    assert sse_reconnect(server.url, "garbage").status_code == 204


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_last_event_id_past_a_live_answer_is_a_204(serve, worker_class):
    server = serve(worker_class, WEB_CONCURRENCY=1, DEMO_TOKENS=20, DEMO_TOKENS_PER_S=40, HEARTBEAT_S=0.2)
    live = requests.get(server.url + "/chat/sse", params={"prompt": "live"}, stream=True, timeout=30)
    message_id = live.headers["X-Message-Id"]
    assert sse_reconnect(server.url, f"{message_id}:999").status_code == 204  # an event it never sent
    whole = read_sse(server.url + "/chat/sse", method="GET", headers={"Last-Event-ID": f"{message_id}:1"})
    assert whole.events[-1]["type"] == "done"  # the rest of the live answer, from its first delta
    live.close()
    # The worker is still free to answer: a reader past the end once kept it busy for good.
    assert read_sse(server.url + "/chat/sse", json_body={"prompt": "next"}).events[-1]["type"] == "done"


def test_an_empty_last_event_id_starts_an_answer(serve):
    server = serve("gevent", DEMO_TOKENS=5)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "first visit"}, headers={"Last-Event-ID": ""})
    assert got.events[0]["type"] == "start" and got.events[-1]["type"] == "done"
    assert 'You said: "first visit"' in got.text


def test_last_event_id_replays_an_interrupted_answer(serve):
    server = serve("gevent", DEMO_TOKENS_PER_S=50, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}, until=lambda got: len(got.of("delta")) >= 2)
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to stop")
    resumed = read_sse(server.url + "/chat/sse", method="GET", headers={"Last-Event-ID": got.ids[-1]})
    assert resumed.events[-1]["type"] == "error" and resumed.events[-1]["error"]["code"] == "interrupted"


def test_a_quick_reconnect_gets_the_rest_of_the_live_answer_with_the_defaults(serve):
    """A client that drops mid-answer and reconnects at once with `Last-Event-ID` (to either of two
    workers) gets the rest of that answer, never a 204, and what it read is the saved answer."""
    server = serve("gevent", WEB_CONCURRENCY=2, RESUME_GRACE_S="", DEMO_TOKENS=30, DEMO_TOKENS_PER_S=60)
    for attempt in range(10):
        first = read_sse(server.url + "/chat/sse", json_body={"prompt": f"blip {attempt}"},
                         until=lambda got: len(got.of("delta")) >= 3)
        rest = read_sse(server.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]})
        assert rest.events[-1]["type"] == "done", rest.events[-1]
        saved = server.get(f"/conversations/{first.events[0]['conversation_id']}").json()["messages"][-1]
        assert (saved["status"], first.text + rest.text) == ("complete", saved["content"])


def test_reconnect_within_the_grace_tails_the_live_answer(serve):
    with FakeUpstream() as up:
        up.tokens, up.tokens_per_s = 40, 40
        server = serve("gevent", LLM_PROVIDER="openai", OPENAI_BASE_URL=up.base_url, RESUME_GRACE_S=30,
                       HEARTBEAT_S=0.2)
        first = read_sse(server.url + "/chat/sse", json_body={"prompt": "keep"},
                         until=lambda got: len(got.of("delta")) >= 3)
        rest = read_sse(server.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]})
        assert first.text + rest.text == up.expected_text("keep")
        assert rest.events[-1]["type"] == "done"
        assert len(up.requests) == 1  # one generation, read by two connections


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_batch_interleaves_items(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=100, DEMO_TOKENS=15, HEARTBEAT_S=0.2)
    prompts = ["alpha", "beta", "gamma", "delta", "epsilon"]
    response = requests.post(server.url + "/batch", json={"prompts": prompts, "concurrency": 3}, stream=True,
                             timeout=30)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1] == {"type": "batch_done", "ok": 5, "failed": 0}
    events = [line for line in lines if line["type"] != "ping"]
    for index, prompt in enumerate(prompts):
        own = [e for e in events if e.get("index") == index]
        assert own[0]["type"] == "start" and own[-1]["type"] == "done"
        text = "".join(e["text"] for e in own if e["type"] == "delta")
        assert text.startswith(f'This is turn 1. You said: "{prompt}".')
    first_done = next(i for i, e in enumerate(events) if e["type"] == "done")
    assert len({e["index"] for e in events[:first_done] if e["type"] == "delta"}) == 3  # concurrently


def test_one_failing_item_spares_the_rest(serve):
    with FakeUpstream() as up:
        up.fail_status, up.fail_times = 400, 1
        server = serve("gevent", LLM_PROVIDER="openai", OPENAI_BASE_URL=up.base_url)
        response = requests.post(server.url + "/batch", json={"prompts": ["a", "b", "c"], "concurrency": 1},
                                 timeout=30)
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines[0] == {"type": "error", "index": 0, "error": lines[0]["error"]}
        assert lines[0]["error"]["code"] == "invalid_request"
        for index in (1, 2):
            text = "".join(e["text"] for e in lines if e.get("index") == index and e["type"] == "delta")
            assert text == up.expected_text("abc"[index])
        assert lines[-1] == {"type": "batch_done", "ok": 2, "failed": 1}


def test_batch_limits(serve):
    server = serve(MAX_BATCH=3, MAX_BATCH_CONCURRENCY=2)
    for body in ({"prompts": ["a"] * 4}, {"prompts": ["a"], "concurrency": 3}, {"prompts": []},
                 {"prompts": "a"}, {"prompts": ["a", 5]}, {"prompts": ["a"], "conversation_id": "x"}):
        response = server.post("/batch", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "invalid_request"


def test_batch_client_leaving_stops_every_item(serve):
    server = serve("gevent", DEMO_TOKENS_PER_S=20, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    response = requests.post(server.url + "/batch", json={"prompts": ["a", "b", "c", "d"], "concurrency": 2},
                             stream=True, timeout=30)
    starts = []
    for line in response.iter_lines():
        event = json.loads(line)
        if event["type"] == "start":
            starts.append(event)
        if len(starts) == 2 and event["type"] == "delta":
            break
    response.close()
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="every item to stop")
    for start in starts:
        messages = server.get(f"/conversations/{start['conversation_id']}").json()["messages"]
        assert messages[-1]["status"] == "interrupted"
    assert len(server.get("/conversations").json()["conversations"]) == 2  # the others never started
