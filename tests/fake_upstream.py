"""A local fake of OpenAI's Chat Completions API for tests and benchmarks.

Standard library only. Usage::

    with FakeUpstream() as up:
        up.tokens = 5
        client = openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0)
        ...
        up.wait_for(lambda: up.closed_by_client == 1)

The answer is deterministic: ``"echo: " + <last user message>`` followed by
filler words, cut or padded to exactly ``up.tokens`` whitespace-led tokens
(``"echo:"``, ``" hello"``, ``" lorem"``, ...); ``up.expected_text(...)``
returns it. Streams are sent as HTTP/1.1 with ``Connection: close`` and no
Content-Length (the body ends when the socket closes), or with ``keep_alive``
as chunked bodies on a connection that stays open for the next request, as
real servers do; every SSE frame is written and flushed on its own.

Behaviour knobs are plain attributes, read once when a request arrives:

* ``keep_alive`` (False): chunked streams on connections that are kept.
* ``hold_after_done`` (False): after ``[DONE]`` the body does not end; the
  connection stays open until the client or the server goes away.
* ``tokens`` (20), ``tokens_per_s`` (0 = no pacing), ``ttft_s`` (delay after
  the headers, before the first data frame), ``reasoning_tokens`` (that many
  ``{"reasoning_content": "think "}`` chunks before the content),
  ``finish_reason`` ("stop"; None: no chunk carries one, as some lenient
  servers do).
* ``tool_calls`` (None): a list of ``{"name", "arguments"}`` (the arguments
  as JSON text): a request that offers ``tools`` is answered with those calls
  instead of text, streamed as OpenAI and vLLM stream them (``tool_style``,
  "openai" or "vllm"): one call after another, the first fragment of each with
  its ``id`` (``call_<n>_<i>``), ``type`` and ``function.name`` (OpenAI's with
  ``"arguments": ""``, vLLM's without; "repeating": all three again on every
  fragment, as some servers send them), then its arguments ``fragment_chars``
  (3) at a time, cut mid-token; ``finish_reason`` "tool_calls". A fragment
  counts as a content token for the failures below. A whole (non-streamed)
  answer has them as ``message.tool_calls``.
* ``refusal`` (None): a text the model refuses with instead of answering, as OpenAI
  streams a refusal under structured outputs: ``delta.refusal`` a word at a time (the role
  chunk's ``content`` null), ``finish_reason`` "stop"; a whole answer has ``message.refusal``
  and ``content`` null.
* ``fail_status`` / ``fail_times``: answer chat completions with that HTTP
  status and an OpenAI-shaped error body (its message contains
  ``SECRET_DETAIL``); ``fail_times`` counts down the failing requests
  (None = fail forever).
* After N content tokens of a stream: ``drop_after`` (close the socket without
  ``[DONE]``; with ``drop_reset = True`` the close is a TCP reset),
  ``hang_after`` (send nothing more until the client or the server goes away),
  ``error_after`` (an ``{"error": ...}`` frame, then close),
  ``malformed_after`` (``data: {not json``, then close).

A request's ``n`` > 1 streams that many choices, one choice a chunk, by ``index`` (choice i's
answer starts ``"echo<i>:"``), and ``logprobs`` gives each content chunk its ``logprobs``
(``top_logprobs`` alternatives), as OpenAI sends them.

Recordings: ``requests`` (JSON bodies, in arrival order), ``last_authorization``,
``closed_by_client``, ``connections`` (accepted), ``active_streams``.

It speaks Anthropic's Messages API too, at ``POST /v1/messages`` (``root_url`` is the SDK's
``base_url``), with the same answer and knobs: ``message_start``, a ``thinking`` block of
``reasoning_tokens`` ``thinking_delta`` events, a ``text`` block of ``text_delta`` events,
``message_delta`` (``stop_reason`` ``end_turn``, or ``max_tokens`` when ``finish_reason`` is
"length"), ``message_stop``, each as ``event: <type>`` and ``data: <json>``, and a ``ping``
after the first block starts; ``error_after`` sends an ``event: error`` (``overloaded_error``);
``fail_status`` answers with Anthropic's error body; ``tool_calls`` come as ``tool_use`` blocks
(``id`` ``toolu_<n>_<i>`` and ``name`` at the block's start, the input in ``input_json_delta``
pieces of ``fragment_chars``, each a content token for the failures) and ``stop_reason``
``tool_use``. Recorded: ``last_api_key`` (``x-api-key``) and ``last_anthropic_version``.
"""

from __future__ import annotations

import io
import json
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

SECRET_DETAIL = "SECRET-UPSTREAM-DETAIL"
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
# Waits re-check the stop flag this often; a client closing wakes them at once.
POLL_S = 0.05

_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_DEFAULTS: dict[str, Any] = {
    "keep_alive": False,
    "hold_after_done": False,
    "tokens": 20,
    "tokens_per_s": 0.0,
    "ttft_s": 0.0,
    "reasoning_tokens": 0,
    "finish_reason": "stop",
    "tool_calls": None,
    "refusal": None,
    "tool_style": "openai",
    "fragment_chars": 3,
    "fail_status": None,
    "fail_times": None,
    "drop_after": None,
    "drop_reset": False,
    "hang_after": None,
    "error_after": None,
    "malformed_after": None,
}


class ClientGone(Exception):
    """The client closed its end of a connection."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


class FakeUpstream:
    """Fake OpenAI Chat Completions server on 127.0.0.1 (see module docstring)."""

    def __init__(self) -> None:
        self.reset()
        self.active_streams = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a connection ends
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self.base_url = self.root_url = ""

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind a free port and serve from a daemon thread."""
        self._stop.clear()
        handler = type("Handler", (_Handler,), {"upstream": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        port = self._server.server_address[1]
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="fake-upstream",
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, end open streams and close the listening socket."""
        if self._server is None:
            return
        self._stop.set()
        self._server.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:  # unblock handlers stuck in a write
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        with self._idle:  # let the handler threads finish their bookkeeping
            self._idle.wait_for(lambda: not self._connections, timeout=5)
        self._server = None

    def reset(self) -> None:
        """Restore default knobs and clear the recordings."""
        for name, value in _DEFAULTS.items():
            setattr(self, name, value)
        self.requests: list[dict[str, Any]] = []
        self.last_authorization: str | None = None
        self.last_api_key: str | None = None
        self.last_anthropic_version: str | None = None
        self.closed_by_client = 0
        self.connections = 0

    # -- helpers for tests -------------------------------------------------

    def close_connections(self) -> None:
        """Close every open connection from this side, as a server's keep-alive timeout closes
        the idle ones, and wait until their handlers are done."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._idle:
            self._idle.wait_for(lambda: not self._connections, timeout=5)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10) -> Any:
        """Poll ``predicate`` every 10 ms; return its first truthy value or fail."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s: {predicate}")
            time.sleep(0.01)

    def expected_text(self, user_content: str, tokens: int | None = None, choice: int = 0) -> str:
        """The full answer text for a last user message of ``user_content`` (of choice ``choice``
        when the request's ``n`` > 1)."""
        return "".join(answer_tokens(user_content, self.tokens if tokens is None else tokens, choice))

    # -- internal bookkeeping (called from handler threads) -----------------

    def _bump(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def _note_client_gone(self) -> None:
        if not self._stop.is_set():  # sockets shut down by stop() do not count
            self._bump("closed_by_client")

    def _take_failure(self) -> int | None:
        """Return the status to fail this request with, counting down ``fail_times``."""
        with self._lock:
            if self.fail_status is None:
                return None
            if self.fail_times is not None:
                if self.fail_times <= 0:
                    return None
                self.fail_times -= 1
            return int(self.fail_status)

    def _new_id(self) -> str:
        with self._lock:
            self._next_id += 1
            return f"chatcmpl-fake{self._next_id:06d}"


def answer_tokens(user_content: str, count: int, choice: int = 0) -> list[str]:
    """``count`` whitespace-led tokens: "echo:" (choice 1's "echo1:", ...), the user's words,
    then filler."""
    words = [f"echo{choice or ''}:"] + user_content.split()
    words += [FILLER[i % len(FILLER)] for i in range(max(0, count - len(words)))]
    return [w if i == 0 else " " + w for i, w in enumerate(words[:count])]


def token_logprobs(token: str, top: int) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a chunk of one token: made-up logprobs, ``top`` alternatives."""
    def entry(text: str, rank: int) -> dict[str, Any]:
        return {"token": text, "logprob": -0.25 * (rank + 1), "bytes": list(text.encode())}

    alternatives = [entry(token, 0)] + [entry(" " + FILLER[i], i + 1) for i in range(top - 1)]
    return {"content": [{**entry(token, 0), "top_logprobs": alternatives[:top]}], "refusal": None}


def _calls(up: FakeUpstream, body: dict[str, Any], answer_id: str) -> list[dict[str, Any]]:
    """The tool calls to answer ``body`` with (none unless it offers tools), in OpenAI's shape."""
    if not up.tool_calls or not body.get("tools"):
        return []
    return [
        {"id": f"call_{answer_id[-6:]}_{i}", "type": "function",
         "function": {"name": call["name"], "arguments": call["arguments"]}}
        for i, call in enumerate(up.tool_calls)
    ]


def _call_fragments(calls: list[dict[str, Any]], size: int, style: str) -> list[dict[str, Any]]:
    """The ``delta``s that stream ``calls``, one after another, as OpenAI (or vLLM, ...) sends them."""
    deltas = []
    for index, call in enumerate(calls):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        first = {"index": index, "id": call["id"], "type": "function", "function": {"name": name}}
        if style != "vllm":
            first["function"]["arguments"] = ""
        deltas.append({"tool_calls": [first]})
        for i in range(0, len(arguments), size):
            fragment = {"index": index, "function": {"arguments": arguments[i:i + size]}}
            if style == "repeating":
                fragment = {**first, "function": {"name": name, **fragment["function"]}}
            deltas.append({"tool_calls": [fragment]})
    return deltas


def _error_body(message: str, err_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
    return ""


def _prompt_tokens(messages: Any) -> int:
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        total += len(content.split()) if isinstance(content, str) else 0
    return total


class _Handler(BaseHTTPRequestHandler):
    """One connection = one request (``Connection: close``), but for streams with ``keep_alive``."""

    protocol_version = "HTTP/1.1"
    upstream: FakeUpstream
    chunked = False  # this stream's body is chunked (``keep_alive``)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet

    def setup(self) -> None:
        super().setup()
        with self.upstream._lock:
            self.upstream._connections.add(self.connection)
            self.upstream.connections += 1

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.upstream._idle:
            self.upstream._connections.discard(self.connection)
            self.upstream._idle.notify_all()

    # -- routing -----------------------------------------------------------

    def do_GET(self) -> None:
        self._note_auth()
        if self.path.rstrip("/") == "/v1/models":
            model = {
                "id": "fake-model",
                "object": "model",
                "created": 0,
                "owned_by": "fake",
            }
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_error(404, f"Unknown path {self.path}")

    def do_POST(self) -> None:
        self._note_auth()
        self.dialect = "anthropic" if self.path.rstrip("/") == "/v1/messages" else "openai"
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/v1/messages"):
            self._send_error(404, f"Unknown path {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._send_error(400, "Request body is not valid JSON")
            return
        if not isinstance(body, dict):
            self._send_error(400, "Request body must be a JSON object")
            return
        self.upstream.requests.append(body)
        status = self.upstream._take_failure()
        if status is not None:
            self._send_error(status, f"Fake upstream failure {status} ({SECRET_DETAIL})")
        elif body.get("stream"):
            self._stream(body, self._messages_body if self.dialect == "anthropic" else self._stream_body)
        else:
            self._complete(body)

    # -- plain responses ---------------------------------------------------

    def _note_auth(self) -> None:
        auth = self.headers.get("Authorization")
        if auth is not None:
            self.upstream.last_authorization = auth
        self.upstream.last_api_key = self.headers.get("x-api-key", self.upstream.last_api_key)
        self.upstream.last_anthropic_version = self.headers.get("anthropic-version",
                                                                self.upstream.last_anthropic_version)

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.upstream._note_client_gone()

    def _send_error(self, status: int, message: str) -> None:
        if getattr(self, "dialect", "openai") == "anthropic":
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            self._send_json(status, {"type": "error", "error": {"type": kind, "message": message}})
            return
        err_type, code = _ERRORS.get(status, ("server_error", None))
        self._send_json(status, _error_body(message, err_type, code))

    def _complete(self, body: dict[str, Any]) -> None:
        """Non-streaming answer; waits as long as the stream would have."""
        up = self.upstream
        toks = answer_tokens(_last_user_text(body.get("messages")), int(up.tokens))
        n_steps = len(toks) + int(up.reasoning_tokens)
        delay = float(up.ttft_s) + (max(0, n_steps - 1) / up.tokens_per_s if up.tokens_per_s else 0.0)
        try:
            self._pause(delay)
        except ClientGone:
            up._note_client_gone()
            return
        message: dict[str, Any] = {"role": "assistant", "content": "".join(toks)}
        calls = _calls(up, body, up._new_id())
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        elif up.refusal:
            message = {"role": "assistant", "content": None, "refusal": up.refusal}
        if up.reasoning_tokens:
            message["reasoning_content"] = "think " * int(up.reasoning_tokens)
        prompt = _prompt_tokens(body.get("messages"))
        completion = len(toks) + int(up.reasoning_tokens)
        self._send_json(
            200,
            {
                "id": up._new_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or "fake-model",
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if calls else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )

    # -- streaming ---------------------------------------------------------

    def _stream(self, body: dict[str, Any], stream_body: Callable[[dict[str, Any]], bool]) -> None:
        up = self.upstream
        up._bump("active_streams")
        self.chunked = bool(up.keep_alive)
        whole = False
        try:
            whole = stream_body(body)
        except ClientGone:
            up._note_client_gone()
        finally:
            self.close_connection = not (self.chunked and whole)
            self.chunked = False
            up._bump("active_streams", -1)

    def _stream_body(self, body: dict[str, Any]) -> bool:
        """The stream; True when it ended with ``[DONE]``."""
        up = self.upstream
        # Snapshot the knobs so a test changing them mid-stream does not matter.
        self.knobs = {name: getattr(up, name) for name in _DEFAULTS}
        toks = answer_tokens(_last_user_text(body.get("messages")), int(up.tokens))
        n_reasoning = int(self.knobs["reasoning_tokens"])
        rate = float(self.knobs["tokens_per_s"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": up._new_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model") or "fake-model",
            "system_fingerprint": "fp_fake",
        }

        # ``n`` > 1: each choice's chunks by its index, one choice a chunk, as OpenAI sends them;
        # ``logprobs``: each content chunk's own (``top_logprobs`` alternatives).
        n, top = int(body.get("n") or 1), int(body.get("top_logprobs") or 0)
        others = [answer_tokens(_last_user_text(body.get("messages")), int(up.tokens), i) for i in range(1, n)]

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
            logprobs = token_logprobs(delta["content"], top) if body.get("logprobs") and delta.get("content") else None
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return dict(base, choices=[choice], **({"usage": None} if include_usage else {}))

        self._stream_headers()
        calls = _calls(up, body, base["id"])
        style = self.knobs["tool_style"]
        vllm = style == "vllm"
        refusal = self.knobs["refusal"]
        if refusal:
            self._send_frame(chunk({"role": "assistant", "content": None, "refusal": ""}))
        else:
            self._send_frame(chunk({"role": "assistant", "content": None if calls and not vllm else ""}))
        for index in range(1, n):
            self._send_frame(chunk({"role": "assistant", "content": ""}, index=index))

        steps = [{"reasoning_content": "think "}] * n_reasoning
        if calls:
            steps += _call_fragments(calls, int(self.knobs["fragment_chars"]), style)
        elif refusal:
            steps += [{"refusal": word} for word in re.findall(r"\s*\S+", refusal)]
        else:
            steps += [{"content": t} for t in toks]
        start = time.monotonic()
        sent = 0  # content tokens (or tool call fragments) sent so far
        for i, delta in enumerate(steps):
            answer = "reasoning_content" not in delta
            if answer and self._fail_midstream(sent):
                return False
            if rate and i:
                self._pause(start + i / rate - time.monotonic())
            self._send_frame(chunk(delta))
            if "content" in delta:
                for index, other in enumerate(others, 1):
                    self._send_frame(chunk({"content": other[sent]}, index=index))
            sent += answer
        if self._fail_midstream(sent):
            return False

        if self.knobs["finish_reason"] is not None:
            for index in range(1, n):
                self._send_frame(chunk({}, self.knobs["finish_reason"], index))
            self._send_frame(chunk({}, "tool_calls" if calls else self.knobs["finish_reason"]))
        if include_usage:
            prompt = _prompt_tokens(body.get("messages"))
            completion = len(toks) * n + n_reasoning
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            self._send_frame(dict(base, choices=[], usage=usage))
        self._write_raw(b"data: [DONE]\n\n")
        if self.knobs["hold_after_done"]:
            self._hang()
            return False
        if self.chunked:
            self._write_raw(b"")  # the last chunk
        return True

    def _stream_headers(self) -> None:
        """The stream's status and headers, then the pause before its first frame."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise ClientGone from exc
        self._pause(float(self.knobs["ttft_s"]))

    def _messages_body(self, body: dict[str, Any]) -> bool:
        """An Anthropic Messages stream; True when it ended with ``message_stop``."""
        up = self.upstream
        self.knobs = {name: getattr(up, name) for name in _DEFAULTS}
        toks = answer_tokens(_last_user_text(body.get("messages")), int(up.tokens))
        n_thinking = int(self.knobs["reasoning_tokens"])
        rate = float(self.knobs["tokens_per_s"])
        prompt = _prompt_tokens(body.get("messages")) + len(str(body.get("system") or "").split())
        self._stream_headers()
        message = {"id": up._new_id().replace("chatcmpl-", "msg_"), "type": "message", "role": "assistant",
                   "content": [], "model": body.get("model") or "fake-model", "stop_reason": None,
                   "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": 1}}
        self._send_event({"type": "message_start", "message": message})
        if up.tool_calls and body.get("tools"):
            return self._tool_use_blocks(message["id"])
        blocks = ([("thinking", ["think "] * n_thinking)] if n_thinking else []) + [("text", toks)]
        start, step, sent = time.monotonic(), 0, 0
        for index, (kind, texts) in enumerate(blocks):
            empty = {"type": kind, kind: ""} if kind == "thinking" else {"type": "text", "text": ""}
            self._send_event({"type": "content_block_start", "index": index, "content_block": empty})
            if index == 0:
                self._send_event({"type": "ping"})
            for text in texts:
                if kind == "text" and self._fail_midstream(sent):
                    return False
                if rate and step:
                    self._pause(start + step / rate - time.monotonic())
                delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {
                    "type": "text_delta", "text": text}
                self._send_event({"type": "content_block_delta", "index": index, "delta": delta})
                step, sent = step + 1, sent + (kind == "text")
            if kind == "thinking":
                signature = {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}
                self._send_event({"type": "content_block_delta", "index": index, "delta": signature})
            elif self._fail_midstream(sent):
                return False
            self._send_event({"type": "content_block_stop", "index": index})
        stop_reason = "max_tokens" if self.knobs["finish_reason"] == "length" else "end_turn"
        self._send_event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                          "usage": {"output_tokens": len(toks) + n_thinking}})
        self._send_event({"type": "message_stop"})
        if self.chunked:
            self._write_raw(b"")
        return True

    def _tool_use_blocks(self, message_id: str) -> bool:
        """The ``tool_calls`` as Anthropic streams them: a ``tool_use`` block each (its ``id``
        and ``name`` at its start), its input in ``input_json_delta`` pieces; ``tool_use`` stop."""
        size, sent = int(self.knobs["fragment_chars"]), 0
        for index, call in enumerate(self.upstream.tool_calls):
            block = {"type": "tool_use", "id": f"toolu_{message_id[-6:]}_{index}", "name": call["name"], "input": {}}
            self._send_event({"type": "content_block_start", "index": index, "content_block": block})
            for i in range(0, len(call["arguments"]), size):
                if self._fail_midstream(sent):
                    return False
                delta = {"type": "input_json_delta", "partial_json": call["arguments"][i:i + size]}
                self._send_event({"type": "content_block_delta", "index": index, "delta": delta})
                sent += 1
            self._send_event({"type": "content_block_stop", "index": index})
        self._send_event({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": sent}})
        self._send_event({"type": "message_stop"})
        if self.chunked:
            self._write_raw(b"")
        return True

    def _send_event(self, payload: dict[str, Any]) -> None:
        """One SSE event as Anthropic sends it: ``event: <type>``, then its ``data:``."""
        self._write_raw(f"event: {payload['type']}\ndata: ".encode() + json.dumps(payload).encode() + b"\n\n")

    def _fail_midstream(self, sent: int) -> bool:
        """Apply a failure mode due after ``sent`` content tokens; True if the stream ends here."""

        def due(name: str) -> bool:
            return self.knobs[name] is not None and sent >= self.knobs[name]

        if due("drop_after"):
            self._drop(bool(self.knobs["drop_reset"]))
        elif due("hang_after"):
            self._hang()
        elif due("error_after") and self.dialect == "anthropic":
            self._send_event({"type": "error", "error": {"type": "overloaded_error", "message": SECRET_DETAIL}})
        elif due("error_after"):
            error = {"message": "boom", "type": "server_error", "code": "server_error"}
            self._send_frame({"error": error})
        elif due("malformed_after"):
            self._write_raw(b"data: {not json\n\n")
        else:
            return False
        return True

    def _send_frame(self, payload: dict[str, Any]) -> None:
        """Send one SSE ``data:`` frame."""
        self._write_raw(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_raw(self, data: bytes) -> None:
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise ClientGone from exc

    def _client_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the socket to become readable; True if the peer closed.

        Uses ``poll`` rather than ``select`` so fds above 1024 work (hundreds of streams).
        """
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            if not poller.poll(max(0, int(timeout * 1000))):
                return False
            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                return True
            self.connection.recv(65536)  # unexpected extra bytes: discard, keep going
            return False
        except (OSError, ValueError):  # reset by the peer, or shut down by stop()
            return True

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` but raise ClientGone as soon as the client disconnects."""
        deadline = time.monotonic() + seconds
        while not self.upstream._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._client_gone(min(remaining, POLL_S)):
                raise ClientGone

    def _hang(self) -> None:
        """Send nothing more until the client closes or the server stops."""
        while not self.upstream._stop.is_set():
            if self._client_gone(POLL_S):
                raise ClientGone

    def _drop(self, reset: bool) -> None:
        """Close the socket without ``[DONE]``: FIN, or RST if ``reset``."""
        if reset:
            linger = struct.pack("ii", 1, 0)  # on/0 s: close() sends RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            # The fd only really closes once the handler's file objects are closed too;
            # the BytesIO keeps the base class's final flush() harmless.
            self.wfile.close()
            self.rfile.close()
            self.connection.close()
            self.wfile = io.BytesIO()
        else:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
