"""Any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM, another copy of
this service) through the official SDK, with `stream=True` and usage included.

SDK errors become `ProviderError`s with stable codes and messages of our own: an upstream's body
may hold keys, prompts or internals, so none of it is passed on.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

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
        try:
            response = self.client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **params
            )
        except openai.OpenAIError as exc:
            log.warning("upstream refused the request: %s", type(exc).__name__)
            raise provider_error(exc) from None
        return OpenAIReply(response)


class OpenAIReply:
    def __init__(self, stream: openai.Stream) -> None:
        self._stream = stream
        self._closed = False

    def __iter__(self) -> Iterator[Chunk]:
        finished = False
        try:
            for chunk in self._stream:
                if chunk.usage is not None:
                    yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                # vLLM and DeepSeek send `reasoning_content`; newer vLLM and others `reasoning`.
                reasoning = getattr(choice.delta, "reasoning_content", None) or getattr(choice.delta, "reasoning", None)
                if reasoning:
                    yield Reasoning(reasoning)
                if choice.delta.content:
                    yield choice.delta.content
                if choice.finish_reason:
                    finished = True
                    yield Finish(choice.finish_reason)
        except Exception as exc:
            if self._closed:
                return  # closed on purpose: the engine already knows why
            log.warning("upstream stream failed: %s", type(exc).__name__)
            raise provider_error(exc) from None
        if not finished and not self._closed:
            # A body without a length ends when the socket closes: without a finish reason,
            # the upstream went away mid-answer.
            raise ProviderError("upstream_error", "the model server closed the stream before the answer was complete")

    def close(self) -> None:
        """Shut the socket down first: closing the response from another thread does not wake a
        thread blocked reading it (under gevent it does; the shutdown is harmless there)."""
        self._closed = True
        network_stream = self._stream.response.extensions.get("network_stream")
        sock = network_stream and network_stream.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._stream.close()
