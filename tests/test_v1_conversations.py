"""What `/v1` keeps: a chat through the SDK is one conversation, a retry replaces the turn it
retries, `store: false` keeps nothing; on each store (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import openai
import pytest
import requests

from .conftest import STORES, store_url, wait_for

SYSTEM = {"role": "system", "content": "be brief"}


@pytest.fixture(params=STORES)
def database_url(request, tmp_path) -> str:
    return store_url(request.param, request, tmp_path)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(sdk: openai.OpenAI, messages: list[dict], **kwargs) -> tuple[str, str]:
    """(the answer's text, its conversation id)."""
    raw = sdk.chat.completions.with_raw_response.create(model="demo", messages=messages, **kwargs)
    return raw.parse().choices[0].message.content, raw.headers["X-Conversation-Id"]


def listed(server) -> list[dict]:
    return server.get("/conversations").json()["conversations"]


def turns(server, conversation_id: str) -> list[dict]:
    return server.get(f"/conversations/{conversation_id}").json()["messages"]


def test_a_chat_through_the_sdk_is_one_conversation(serve):
    server = serve("gevent", DEMO_TOKENS=12)
    messages, ids = [SYSTEM], set()
    with client(server) as sdk:
        for turn in range(1, 6):
            messages.append({"role": "user", "content": f"question {turn}"})
            if turn % 2:
                text, conversation_id = ask(sdk, messages)
            else:  # streamed, as `llm` and chat apps do
                with sdk.chat.completions.with_streaming_response.create(
                    model="demo", messages=messages, stream=True
                ) as response:
                    conversation_id = response.headers["X-Conversation-Id"]
                    text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
            assert text.startswith(f'This is turn {turn}. You said: "question {turn}".')
            messages.append({"role": "assistant", "content": text})
            ids.add(conversation_id)
        # Earlier turns of it with another question: another conversation, which leaves it whole.
        forked, forked_id = ask(sdk, [*messages[:3], {"role": "user", "content": "another"}])
        # Another system prompt: not the same conversation either.
        _, other_system_id = ask(sdk, [{"role": "system", "content": "be long"}, *messages[1:3],
                                       {"role": "user", "content": "question 2"}])
    (conversation_id,) = ids
    stored = turns(server, conversation_id)
    assert [(m["role"], m["content"]) for m in stored] == [(m["role"], m["content"]) for m in messages[1:]]
    assert all(m["status"] == "complete" for m in stored)
    assert forked.startswith('This is turn 2. You said: "another".')
    assert len({conversation_id, forked_id, other_system_id}) == 3 and len(listed(server)) == 3
    assert len(turns(server, conversation_id)) == 10


def test_a_retry_of_an_interrupted_turn_replaces_it(serve):
    server = serve("gevent", DEMO_TOKENS_PER_S=50, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    messages = [SYSTEM, {"role": "user", "content": "first"}]
    with client(server) as sdk:
        first, conversation_id = ask(sdk, messages, max_tokens=5)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "second"}]
        stream = sdk.chat.completions.create(model="demo", messages=messages, stream=True)
        [next(stream) for _ in range(4)]
        stream.close()  # the client went away: the turn is kept as interrupted
        wait_for(lambda: turns(server, conversation_id)[-1]["status"] == "interrupted", what="the interrupted turn")
        retried, retried_id = ask(sdk, messages, max_tokens=5)  # what an SDK's retry sends
    assert retried_id == conversation_id and len(listed(server)) == 1
    stored = turns(server, conversation_id)
    assert [m["content"] for m in stored] == ["first", first, "second", retried]
    assert retried == "This is turn 2. You" and all(m["status"] == "complete" for m in stored)


def begun_together(count: int, start) -> list[int]:
    """The statuses of `count` requests made at the same moment (each `start()` returns a
    streaming response; all are left open until every one has its status, since an answer whose
    client left stops, which would free the conversation for the next)."""
    barrier, responses = threading.Barrier(count), []

    def one() -> None:
        barrier.wait()
        responses.append(start())

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    for response in responses:
        response.close()
    return statuses


def test_two_turns_begun_together_in_one_conversation_are_one_turn(serve):
    """The second of two turns begun at the same moment in one conversation is a 409, whichever
    worker and database connection each lands on (PostgreSQL: a row lock on the conversation)."""
    # Answers stop at their 5th token, until stopped: a turn that began is still streaming.
    server = serve("gevent", WEB_CONCURRENCY=2, DEMO_HANG_AFTER=4)
    first = server.post("/chat/blocking", json={"prompt": "first", "max_tokens": 3}).json()
    conversation_id = first["conversation_id"]
    url = server.url

    def page_turn():
        body = {"prompt": "second", "conversation_id": conversation_id}
        return requests.post(url + "/chat/sse", json=body, stream=True, timeout=30)

    assert begun_together(8, page_turn) == [200] + [409] * 7
    assert server.post(f"/conversations/{conversation_id}/stop").json()["status"] == "interrupted"

    # The same through /v1: a retry of the interrupted turn, sent 8 times at once.
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": first["text"]},
               {"role": "user", "content": "second"}]

    def v1_retry():
        body = {"model": "demo", "messages": history, "stream": True}
        return requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=30)

    assert begun_together(8, v1_retry) == [200] + [409] * 7
    stored = turns(server, conversation_id)
    assert [(m["content"], m["status"]) for m in stored][:3] == [
        ("first", "complete"), (first["text"], "complete"), ("second", "complete")
    ]
    assert stored[3]["status"] == "streaming" and len(stored) == 4 and len(listed(server)) == 1
    server.post(f"/conversations/{conversation_id}/stop")


def test_store_false_keeps_nothing(serve):
    server = serve("gevent", DEMO_TOKENS=8)
    with client(server) as sdk:
        whole, whole_id = ask(sdk, [{"role": "user", "content": "forget me"}], store=False)
        with sdk.chat.completions.with_streaming_response.create(
            model="demo", messages=[{"role": "user", "content": "me too"}], stream=True, store=False
        ) as response:
            streamed_id = response.headers["X-Conversation-Id"]
            assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert whole.startswith('This is turn 1. You said: "forget me".')
        wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answers to end")
        for conversation_id in (whole_id, streamed_id):
            assert server.get(f"/conversations/{conversation_id}").status_code == 404
        assert listed(server) == []

        # The next turn of a stored conversation, not stored: the conversation is left as it was.
        kept, kept_id = ask(sdk, [{"role": "user", "content": "keep me"}])
        history = [{"role": "user", "content": "keep me"}, {"role": "assistant", "content": kept}]
        second, _ = ask(sdk, [*history, {"role": "user", "content": "not this"}], store=False)
        assert second.startswith('This is turn 2. You said: "not this".')
        wait_for(lambda: len(listed(server)) == 1, what="only the stored conversation")
        assert [m["content"] for m in turns(server, kept_id)] == ["keep me", kept]

        with pytest.raises(openai.BadRequestError) as info:
            ask(sdk, [{"role": "user", "content": "x"}], store="no")
        assert info.value.param == "store"
