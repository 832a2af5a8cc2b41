"""The OpenAI provider (the real SDK) against a local server speaking OpenAI's streaming format."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import httpcore2
import httpx2
import openai
import pytest
import requests

from streaming.providers.http import _Backend, body_chunks, http_client, sse_data

from .conftest import ROOT, WORKER_CLASSES, free_port, wait_for
from .fake_upstream import SECRET_DETAIL, FakeUpstream
from .streams import read_sse


@pytest.fixture
def upstream():
    with FakeUpstream() as up:
        yield up


def relay(serve, upstream, worker_class="gevent", **env):
    return serve(
        worker_class,
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=upstream.base_url,
        OPENAI_API_KEY="sk-test-secret",
        LLM_MODEL="fake-model",
        HEARTBEAT_S=0.2,
        **env,
    )


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_relays_the_upstream_answer(serve, upstream, worker_class):
    upstream.tokens, upstream.tokens_per_s, upstream.reasoning_tokens = 12, 100, 2
    server = relay(serve, upstream, worker_class)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hello there", "max_tokens": 50})
    assert got.text == upstream.expected_text("hello there")
    assert "".join(e["text"] for e in got.of("reasoning")) == "think think "
    done = got.events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 12 + 2  # as the upstream counted them, reasoning included
    sent = upstream.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "fake-model" and sent["max_tokens"] == 50
    assert upstream.last_authorization == "Bearer sk-test-secret"
    # OPENAI_BASE_URL may hold credentials: it is never logged (httpx logs each request's URL).
    wait_for(lambda: '"outcome": "complete"' in server.log.read_text(), what="the stream's log line")
    assert upstream.base_url.removeprefix("http://") not in server.log.read_text()


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_client_disconnect_closes_the_upstream(serve, upstream, worker_class):
    """The client leaves while the upstream is silent: the upstream connection is closed."""
    upstream.tokens, upstream.hang_after = 1000, 3
    server = relay(serve, upstream, worker_class, IDLE_TIMEOUT_S=600)
    three_tokens = upstream.expected_text("x", 3)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}, until=lambda got: got.text == three_tokens)
    upstream.wait_for(lambda: upstream.closed_by_client == 1)
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to end")
    conversation = server.get(f"/conversations/{got.events[0]['conversation_id']}").json()
    assert conversation["messages"][-1]["status"] == "interrupted"
    assert conversation["messages"][-1]["content"] == three_tokens


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_silent_upstream_times_out_and_is_closed(serve, upstream, worker_class):
    upstream.tokens, upstream.hang_after = 1000, 2
    server = relay(serve, upstream, worker_class, IDLE_TIMEOUT_S=0.5)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"})
    assert got.events[-1]["error"]["code"] == "upstream_timeout"
    upstream.wait_for(lambda: upstream.closed_by_client == 1)
    conversation_id = got.events[0]["conversation_id"]
    turn = wait_for(lambda: (m := server.get(f"/conversations/{conversation_id}").json()["messages"][-1])
                    and m["status"] != "streaming" and m, what="the turn to be saved")
    assert (turn["status"], turn["error_code"], turn["content"]) == ("error", "upstream_timeout", got.text)


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_answers_reuse_the_upstream_connection(serve, upstream, worker_class):
    """A whole answer leaves its connection to the next one; one cut short does not."""
    upstream.keep_alive, upstream.tokens = True, 5
    server = relay(serve, upstream, worker_class)
    for prompt in ("one", "two", "three"):
        got = read_sse(server.url + "/chat/sse", json_body={"prompt": prompt})
        assert got.text == upstream.expected_text(prompt) and got.events[-1]["type"] == "done"
    assert upstream.connections == 1
    upstream.tokens, upstream.hang_after = 1000, 2
    read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}, until=lambda got: got.text)
    upstream.wait_for(lambda: upstream.closed_by_client == 1)
    upstream.tokens, upstream.hang_after = 5, None
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "after"})
    assert got.text == upstream.expected_text("after")
    assert upstream.connections == 2


def test_a_kept_connection_the_upstream_closed_is_not_used_again(serve, upstream):
    """The pool sees that the upstream closed an idle connection (its own check of the socket,
    see providers/http.py) and opens a new one instead of sending the next request into it."""
    upstream.keep_alive, upstream.tokens = True, 5
    server = relay(serve, upstream)
    assert read_sse(server.url + "/chat/sse", json_body={"prompt": "one"}).events[-1]["type"] == "done"
    upstream.close_connections()
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "two"})
    assert got.text == upstream.expected_text("two") and got.events[-1]["type"] == "done"
    assert upstream.connections == 2


def test_an_upstream_holding_its_body_open_after_done_does_not_hold_the_answer(serve, upstream):
    upstream.keep_alive, upstream.hold_after_done, upstream.tokens = True, True, 5
    server = relay(serve, upstream)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"})
    assert got.text == upstream.expected_text("x") and got.events[-1]["type"] == "done"
    turn = server.get(f"/conversations/{got.events[0]['conversation_id']}").json()["messages"][-1]
    assert (turn["status"], turn["content"]) == ("complete", got.text)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [(429, 429, "rate_limited"), (500, 503, "upstream_error"), (401, 503, "upstream_error"),
     (400, 400, "invalid_request")],
)
def test_upstream_refusal_is_a_clean_json_error(serve, upstream, fault, status, code):
    upstream.fail_status = fault
    server = relay(serve, upstream)
    response = server.post("/chat/sse", json={"prompt": "x"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert SECRET_DETAIL not in response.text and "sk-test-secret" not in response.text


def test_a_404_for_the_services_own_model_is_its_misconfiguration(serve, upstream):
    upstream.fail_status = 404
    server = relay(serve, upstream)
    own = server.post("/chat", json={"prompt": "x"})  # LLM_MODEL, or OPENAI_BASE_URL without /v1
    assert own.status_code == 503 and own.json()["error"]["code"] == "upstream_error"
    assert "OPENAI_BASE_URL" in own.json()["error"]["message"] and upstream.base_url not in own.text
    asked = server.post("/chat", json={"prompt": "x", "model": "no-such-model"})  # the client's choice
    assert asked.status_code == 400 and asked.json()["error"]["code"] == "model_not_found"
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:  # OpenAI's status for it on /v1
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_done_without_a_finish_reason_is_a_whole_answer(serve, upstream):
    upstream.tokens, upstream.finish_reason = 5, None
    server = relay(serve, upstream)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "lenient"})
    assert got.text == upstream.expected_text("lenient")
    assert got.events[-1]["type"] == "done" and got.events[-1]["finish_reason"] == "stop"


def test_a_refusal_is_logged_and_counted(serve, upstream):
    upstream.fail_status = 429
    server = relay(serve, upstream)
    assert server.post("/chat", json={"prompt": "x"}).status_code == 429
    line = wait_for(lambda: next((json.loads(line) for line in server.log.read_text().splitlines()
                                  if line.startswith('{"request_id"')), None), what="the stream's log line")
    assert (line["outcome"], line["error_code"], line["tokens"]) == ("error", "rate_limited", 0)
    metrics = server.get("/metrics").text
    assert 'upstream_errors_total{code="rate_limited"} 1.0' in metrics
    assert 'streams_finished_total{outcome="error"} 1.0' in metrics


def test_a_refusal_goes_to_the_client_at_once(serve, upstream):
    upstream.fail_status, upstream.fail_times = 503, 1
    server = relay(serve, upstream)
    refused = server.post("/chat/sse", json={"prompt": "again"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "upstream_error"
    assert len(upstream.requests) == 1  # the client retries; the model is asked once a request
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "again"})
    assert got.text == upstream.expected_text("again")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_an_upstream_that_sends_no_headers_times_out_at_the_first_token_limit(serve, worker_class):
    with socket.create_server(("127.0.0.1", 0)) as hole:  # takes connections, never answers
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.extend(iter(lambda: hole.accept()[0], None)), daemon=True).start()
        base_url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1"
        server = serve(worker_class, LLM_PROVIDER="openai", OPENAI_BASE_URL=base_url, FIRST_TOKEN_TIMEOUT_S=1,
                       IDLE_TIMEOUT_S=60)
        response = server.post("/chat/sse", json={"prompt": "x"})  # gives up after 30 s
        assert response.status_code == 503 and response.json()["error"]["code"] == "upstream_timeout"
        assert len(accepted) == 1  # not asked again: it may be answering the first request
        for conn in accepted:
            conn.close()


def test_silences_between_tokens_wait_for_the_idle_limit(serve, upstream):
    upstream.tokens, upstream.tokens_per_s = 3, 0.7  # 1.4 s between tokens
    server = relay(serve, upstream, FIRST_TOKEN_TIMEOUT_S=1, IDLE_TIMEOUT_S=5)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "slow"})
    assert got.events[-1]["type"] == "done" and got.text == upstream.expected_text("slow")


def test_unreachable_upstream_is_503(serve):
    server = serve(LLM_PROVIDER="openai", OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    response = server.post("/chat", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("fault", ["error_after", "malformed_after", "drop_after"])
def test_upstream_failure_mid_stream(serve, upstream, fault):
    upstream.tokens = 50
    setattr(upstream, fault, 4)
    server = relay(serve, upstream)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "x"})
    assert got.text == upstream.expected_text("x", 4)
    assert got.events[-1]["type"] == "error"
    assert got.events[-1]["error"]["code"] == "upstream_error"
    assert "boom" not in got.events[-1]["error"]["message"]
    turn = server.get(f"/conversations/{got.events[0]['conversation_id']}").json()["messages"][-1]
    assert (turn["status"], turn["error_code"]) == ("error", "upstream_error")
    assert turn["content"] == upstream.expected_text("x", 4)  # the partial answer is kept
    text = requests.post(server.url + "/chat", json={"prompt": "x"}, timeout=30).text
    assert text.startswith(upstream.expected_text("x", 4) + "\n[error] upstream_error: ")


def test_history_reaches_the_upstream(serve, upstream):
    upstream.tokens = 6
    server = relay(serve, upstream)
    first = read_sse(server.url + "/chat/sse", json_body={"prompt": "one", "system": "be brief"})
    conversation_id = first.events[0]["conversation_id"]
    read_sse(server.url + "/chat/sse", json_body={"prompt": "two", "conversation_id": conversation_id})
    assert upstream.requests[-1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": upstream.expected_text("one")},
        {"role": "user", "content": "two"},
    ]


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt(serve, upstream):
    upstream.tokens = 3  # "echo: <prompt>" cut to three tokens: about 15 characters an answer
    server = relay(serve, upstream, HISTORY_CHARS=40)
    conversation_id = None
    for prompt in ("first old turn", "second turn", "third turn", "fourth"):
        body = {"prompt": prompt, "system": "stay brief"} if conversation_id is None else {
            "prompt": prompt, "conversation_id": conversation_id}
        got = read_sse(server.url + "/chat/sse", json_body=body)
        conversation_id = got.events[0]["conversation_id"]
    sent = upstream.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "stay brief"}
    assert sent[-1] == {"role": "user", "content": "fourth"}
    earlier = sent[1:-1]
    assert earlier and sum(len(m["content"]) for m in earlier) <= 40
    assert {"role": "user", "content": "first old turn"} not in earlier  # the oldest went first
    assert earlier[-1] == {"role": "assistant", "content": upstream.expected_text("third turn")}


def test_sse_data_reads_events_as_the_spec_defines_them():
    body = (b': keep-alive\n\ndata: {"a": 1}\n\nevent: x\ndata:no-space\ndata: second line\n\n'
            b"id: 7\n\ndata: caf\xc3\xa9\r\n\r\ndata: cr\r\rdata: [DONE]")
    events = ['{"a": 1}', "no-space\nsecond line", "caf\u00e9", "cr", "[DONE]"]
    assert list(sse_data([body])) == events
    # However the body is cut into chunks: mid-line, between CR and LF, inside a UTF-8 character.
    for size in (1, 2, 3, 7):
        assert list(sse_data(body[i : i + size] for i in range(0, len(body), size))) == events, size


class _Upstream(httpcore2.MockBackend):
    """Two chunked streaming responses on one connection, cut into the reads given; counts connections."""

    connections = 0

    def connect_tcp(self, *args, **kwargs):
        self.connections += 1
        return super().connect_tcp(*args, **kwargs)


def _chunked_response(events: list[bytes], trailer: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [b"%x;ext=1\r\n%s\r\n" % (len(e), e) if i == 1 else b"%x\r\n%s\r\n" % (len(e), e)
              for i, e in enumerate(events)]
    return head + b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"


def test_a_chunked_body_is_read_below_httpx_and_leaves_its_connection_to_the_next_request():
    """`body_chunks` decodes the chunks itself, however the reads cut the body (inside the head's
    last read, a chunk's size line, its data, its CRLF, the last chunk or its trailers), and the
    connection then serves the next request."""
    first = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    second = [b'data: {"n": 3}\n\n', b"data: [DONE]\n\n"]
    one, two = _chunked_response(first, b"X-Trailer: t\r\n"), _chunked_response(second)
    for size in (1, 2, 3, 5, 8, 13, 40, 200, len(one)):
        for head_cut in (len(one) - 1, 70, 82, 84, 90, 100, 120):
            reads = [one[:head_cut]] + [one[i : i + size] for i in range(head_cut, len(one), size)] + [two]
            backend = _Upstream(reads)
            client = http_client(openai)
            client._transport._pool._network_backend = _Backend(backend)
            sdk = openai.OpenAI(api_key="x", base_url="http://upstream.test/v1", http_client=client, max_retries=0)
            got = []
            for _ in range(2):
                response = sdk.post("/chat/completions", cast_to=httpx2.Response, body={}, stream=True)
                chunks = body_chunks(response)
                assert chunks.__name__ == "_chunked"  # not httpx's iter_bytes
                got.append(list(sse_data(chunks)))
                assert response.is_closed
            assert got == [['{"n": 1}', '{"n": 2}', "[DONE]"], ['{"n": 3}', "[DONE]"]], (size, head_cut)
            assert backend.connections == 1, (size, head_cut)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_the_sdks_platform_headers_are_made_with_the_provider(sdk):
    """Not by the first requests: the SDK caches them once made, and each of the first requests
    made together (a deploy's reconnects) ran `uname -p` in a subprocess to make them."""
    provider = {"openai": "OpenAIProvider", "anthropic": "AnthropicProvider"}[sdk]
    code = (f"import {sdk}._base_client as base\n"
            f"from streaming.config import Settings\nfrom streaming.providers.{sdk} import {provider}\n"
            f"{provider}(Settings(llm_provider='{sdk}'))\nprint(base.platform_headers.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]
