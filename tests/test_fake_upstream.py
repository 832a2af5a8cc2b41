"""Checks that FakeUpstream speaks OpenAI's wire format, using the real openai SDK as client."""

import json
import socket
import threading

import openai
import pytest

from .fake_upstream import SECRET_DETAIL, FakeUpstream

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
]


@pytest.fixture
def up():
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def client(up):
    with openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


def stream(client, **kwargs):
    return client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True, **kwargs)


def test_answer_text_is_deterministic(up):
    assert up.expected_text("hello world", tokens=5) == "echo: hello world lorem ipsum"
    assert up.expected_text("a b c d e f", tokens=3) == "echo: a b"
    assert up.expected_text("hello world", tokens=0) == ""


def test_stream_chunks_match_openai_shape(up, client):
    up.tokens = 6
    chunks = list(stream(client, stream_options={"include_usage": True}))

    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *content, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert len(content) == 6
    assert "".join(c.choices[0].delta.content for c in content) == up.expected_text("hello world")
    assert all(c.choices[0].finish_reason is None for c in [first, *content])
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage.completion_tokens == 6
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 6

    assert up.requests[-1]["stream"] is True
    assert up.requests[-1]["messages"] == MESSAGES
    assert up.last_authorization == "Bearer x"
    up.wait_for(lambda: up.active_streams == 0)
    assert up.closed_by_client == 0


def test_no_usage_chunk_unless_asked(up, client):
    chunks = list(stream(client))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == up.expected_text("hello world")


def test_reasoning_content_comes_first(up, client):
    up.tokens = 3
    up.reasoning_tokens = 2
    deltas = [c.choices[0].delta for c in stream(client) if c.choices]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert reasoning[1:3] == ["think ", "think "]
    assert [d.content for d in deltas[1:3]] == [None, None]
    assert "".join(d.content or "" for d in deltas[3:]) == up.expected_text("hello world")


def test_non_streaming_completion(up, client):
    up.tokens = 4
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello world lorem"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4
    assert up.requests[-1].get("stream") is None


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_fail_status_429_then_recovers(up, client):
    up.fail_status = 429
    up.fail_times = 1
    with pytest.raises(openai.RateLimitError) as info:
        stream(client)
    assert SECRET_DETAIL in info.value.body["message"]
    assert "".join(c.choices[0].delta.content or "" for c in stream(client)) == up.expected_text("hello world")
    assert len(up.requests) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, openai.BadRequestError), (401, openai.AuthenticationError), (500, openai.InternalServerError)],
)
def test_fail_status_forever(up, client, status, error):
    up.fail_status = status
    for _ in range(2):
        with pytest.raises(error):
            stream(client)


def test_error_after_raises_api_error(up, client):
    up.error_after = 2
    seen = []
    with pytest.raises(openai.APIError, match="boom"):
        for chunk in stream(client):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "echo:", " hello"]


def test_malformed_after_raises_json_error(up, client):
    up.malformed_after = 1
    with pytest.raises(json.JSONDecodeError):  # the SDK lets the decode error through as is
        list(stream(client))


def test_drop_after_ends_without_finish_reason(up, client):
    up.drop_after = 2
    chunks = list(stream(client))  # a close-delimited body just ends: no exception
    assert [c.choices[0].delta.content for c in chunks] == ["", "echo:", " hello"]
    assert all(c.choices[0].finish_reason is None for c in chunks)


def test_drop_reset_raises_connection_error(up, client):
    up.drop_after = 0
    up.drop_reset = True
    with pytest.raises(openai.APIConnectionError):
        list(stream(client))


def test_client_close_while_hanging_is_noticed(up, client):
    up.hang_after = 2
    s = stream(client)
    assert [next(s).choices[0].delta.content for _ in range(3)] == ["", "echo:", " hello"]
    assert up.active_streams == 1
    s.close()
    up.wait_for(lambda: up.closed_by_client == 1)
    up.wait_for(lambda: up.active_streams == 0)


def test_client_close_while_paced_is_noticed(up, client):
    up.tokens = 1000
    up.tokens_per_s = 5
    s = stream(client)
    next(s)
    next(s)
    s.close()
    up.wait_for(lambda: up.closed_by_client == 1)
    up.wait_for(lambda: up.active_streams == 0)


def test_socket_shutdown_wakes_blocked_reader(up, client):
    """How a service can cancel a stream that another thread is blocked reading."""
    up.hang_after = 1
    s = stream(client)
    sock = s.response.extensions["network_stream"].get_extra_info("socket")
    assert isinstance(sock, socket.socket)
    seen, outcome = [], []

    def consume():
        try:
            for chunk in s:
                seen.append(chunk)
            outcome.append("ended")
        except openai.APIConnectionError:
            outcome.append("connection error")

    reader = threading.Thread(target=consume)
    reader.start()
    up.wait_for(lambda: len(seen) == 2)  # role chunk + 1 token, then the server hangs
    sock.shutdown(socket.SHUT_RDWR)
    s.close()
    up.wait_for(lambda: not reader.is_alive())
    # Which one is a race: EOF ends a close-delimited body cleanly, or the read hits the closed fd.
    assert outcome in (["ended"], ["connection error"])
    up.wait_for(lambda: up.closed_by_client == 1)


def test_many_concurrent_streams(up, client):
    up.hang_after = 1
    streams = [stream(client) for _ in range(200)]
    for s in streams:
        next(s)
    up.wait_for(lambda: up.active_streams == 200)
    for s in streams:
        s.close()
    up.wait_for(lambda: up.closed_by_client == 200)
    up.wait_for(lambda: up.active_streams == 0)


def test_stop_ends_hanging_streams():
    with FakeUpstream() as server:
        server.hang_after = 1
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            s = stream(sdk)
            next(s)
            server.wait_for(lambda: server.active_streams == 1)
            server.stop()
            assert [c.choices[0].delta.content for c in s] == ["echo:"]
    assert server.active_streams == 0
    assert server.closed_by_client == 0
