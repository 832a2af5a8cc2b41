"""Any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM, another copy of
this service) through the official SDK, with `stream=True` and usage included.

The SDK makes the request: its auth, retries before the stream starts, timeouts and errors. The
chunks are read here, as JSON from the response's `data:` lines (`with_streaming_response`):
turning each one into the SDK's pydantic `ChatCompletionChunk` cost about 50 times what the rest
of relaying a token costs, and a relay needs three fields of it.

SDK errors become `ProviderError`s with stable codes and messages of our own: an upstream's body
may hold keys, prompts or internals, so none of it is passed on.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import ExitStack

import openai

from ..config import Settings
from .base import Chunk, Finish, ProviderError, Reasoning, Usage

log = logging.getLogger(__name__)


def provider_error(exc: Exception) -> ProviderError:
    """A stable code, status and safe message for what the SDK raised."""
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("upstream_timeout", "the model server did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError("upstream_unavailable", "the model server could not be reached")
    if isinstance(exc, openai.RateLimitError):
        return ProviderError("rate_limited", "the model server is rate limiting; retry later", 429)
    if isinstance(exc, openai.NotFoundError):
        return ProviderError("invalid_request", "the model server has no such model", 400)
    if isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return ProviderError("invalid_request", "the model server rejected the request", 400)
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return ProviderError("upstream_error", "the model server refused this service's credentials")
    if isinstance(exc, openai.APIStatusError):
        return ProviderError("upstream_error", f"the model server failed (HTTP {exc.status_code})")
    return ProviderError("upstream_error", "the model server sent a broken or failed stream")


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self.default_model = settings.llm_model or "gpt-4o-mini"
        read_timeout = max(settings.first_token_timeout_s, settings.idle_timeout_s) + 5
        self.client = openai.OpenAI(
            api_key=settings.openai_api_key or "no-key",  # local servers often need none
            base_url=settings.openai_base_url or None,
            timeout=openai.Timeout(read_timeout, connect=10.0),
            max_retries=1,  # retried only before a stream starts, where it is safe
        )

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list()]
        except openai.OpenAIError:
            return [self.default_model]

    def stream(self, messages: list[dict], params: dict) -> OpenAIReply:
        request = self.client.chat.completions.with_streaming_response.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **params
        )
        held = ExitStack()  # the response stays open until the reply is read or closed
        try:
            response = held.enter_context(request)  # the request is made, and refused, here
        except openai.OpenAIError as exc:
            log.warning("upstream refused the request: %s", type(exc).__name__)
            raise provider_error(exc) from None
        return OpenAIReply(response, held)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The `data` of each Server-Sent Event in `lines`; comments and other fields are skipped."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


class OpenAIReply:
    def __init__(self, response: openai.APIResponse, held: ExitStack) -> None:
        self._response = response
        self._held = held
        self._closed = False

    def __iter__(self) -> Iterator[Chunk]:
        finished = False
        try:
            for data in sse_data(self._response.iter_lines()):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise ProviderError("upstream_error", "the model server failed mid-answer")
                if chunk.get("usage"):
                    yield Usage(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                delta = choice.get("delta") or {}
                # vLLM and DeepSeek send `reasoning_content`; newer vLLM and others `reasoning`.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield Reasoning(reasoning)
                if delta.get("content"):
                    yield delta["content"]
                if choice.get("finish_reason"):
                    finished = True
                    yield Finish(choice["finish_reason"])
        except ProviderError:
            raise
        except Exception as exc:
            if self._closed:
                return  # closed on purpose: the engine already knows why
            log.warning("upstream stream failed: %s", type(exc).__name__)
            raise provider_error(exc) from None
        finally:
            self._held.close()
        if not finished and not self._closed:
            # A body without a length ends when the socket closes: without a finish reason,
            # the upstream went away mid-answer.
            raise ProviderError("upstream_error", "the model server closed the stream before the answer was complete")

    def close(self) -> None:
        """Shut the socket down first: closing the response from another thread does not wake a
        thread blocked reading it (under gevent it does; the shutdown is harmless there)."""
        self._closed = True
        network_stream = self._response.http_response.extensions.get("network_stream")
        sock = network_stream and network_stream.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()
