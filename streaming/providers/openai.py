"""Any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM, another copy of
this service) through the official SDK, with `stream=True` and usage included.

The SDK makes the request: its auth, timeouts and errors. It
is made with `client.post(..., cast_to=httpx2.Response)`, the SDK's documented way to any
endpoint, which hands back the raw streaming response: the typed `create()` spent a quarter of
the request's time checking parameters against their TypedDicts (ours are checked already), and
turning each chunk into the SDK's pydantic `ChatCompletionChunk` cost about 50 times what the
rest of relaying a token costs, where a relay needs three fields of it. The chunks are read here,
as JSON from the response's `data:` lines.

After `[DONE]` the rest of the body (its last, empty chunk) is read too, as the SDK's async
client does, so that the connection goes back to the pool: a new connection per answer cost
every answer a TCP handshake. The answer has ended by then (see `Finish`).

SDK errors become `ProviderError`s with stable codes and messages of our own: an upstream's body
may hold keys, prompts or internals, so none of it is passed on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx2
import openai

from ..config import Settings
from .base import ChoiceDelta, Chunk, Finish, Logprobs, ProviderError, Reasoning, Refusal, ToolCallDelta, Usage
from .http import body_chunks, close_response, http_client, sdk_error, sse_data, warm

log = logging.getLogger(__name__)


def mid_answer_error(error: object) -> ProviderError:
    """An upstream's `{"error": ...}` frame: its code is kept when it is another copy of this
    service saying that its own model went silent; nothing else of it is passed on."""
    if isinstance(error, dict) and error.get("code") == "upstream_timeout":
        return ProviderError("upstream_timeout", "the model server did not answer in time")
    return ProviderError("upstream_error", "the model server failed mid-answer")


def tool_call_deltas(calls: list[dict]) -> Iterator[ToolCallDelta]:
    """A chunk's `delta.tool_calls`: fragments, `id` and `function.name` on a call's first (a
    server that sends each call whole in one chunk, as Ollama does, is one fragment a call)."""
    for position, call in enumerate(calls):
        function = call.get("function") or {}
        yield ToolCallDelta(call.get("index", position), call.get("id"), function.get("name"),
                            function.get("arguments") or "")


def other_choices(choices: list[dict]) -> Iterator[ChoiceDelta]:
    """A chunk's choices after the answer's (`n` > 1): their text, logprobs and finish reason."""
    for choice in choices:
        if choice.get("index"):
            delta, logprobs = choice.get("delta") or {}, choice.get("logprobs") or {}
            yield ChoiceDelta(choice["index"], delta.get("content") or "", logprobs.get("content"),
                              choice.get("finish_reason"))


class OpenAIProvider:
    name = "openai"
    # Passed upstream as they are. Not: `audio` and `modalities` (no audio here), `functions` and
    # `function_call` (`tools` replaced them), `web_search_options` and `moderation` (what they
    # add to an answer is not relayed).
    options = frozenset({"tools", "tool_choice", "parallel_tool_calls"}) | frozenset({
        "stop", "seed", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
        "logprobs", "top_logprobs", "n", "reasoning_effort", "verbosity", "user", "safety_identifier", "metadata",
        "prediction", "service_tier", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    })

    def __init__(self, settings: Settings) -> None:
        self.default_model = settings.llm_model or "gpt-4o-mini"
        # The body's reads may wait as long as the engine lets the model be silent; the engine
        # ends the answer itself at its deadlines.
        self.body_read_timeout_s = max(settings.first_token_timeout_s, settings.idle_timeout_s) + 5
        self.client = openai.OpenAI(
            api_key=settings.openai_api_key or "no-key",  # local servers often need none
            base_url=settings.openai_base_url or None,
            # Until the response's headers, nothing has been sent to our client: that wait counts
            # against the first-token limit.
            timeout=openai.Timeout(settings.first_token_timeout_s, connect=10.0),
            # Not retried here: a timed-out request may be being answered already, and a refusal
            # (429, 5xx) goes to our client with its code, whose own SDK retries it.
            max_retries=0,
            http_client=http_client(openai),
        )
        warm(self.client)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list()]
        except openai.OpenAIError:
            return [self.default_model]

    def accepts(self, model: str) -> bool:
        """Any name: the upstream may serve many models, and says which it has not (a 404, which
        is `model_not_found` for the client's choice)."""
        return True

    def stream(self, messages: list[dict], params: dict) -> OpenAIReply:
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        try:  # the request is made, and refused, here; the response stays open until read or closed
            response = self.client.post("/chat/completions", cast_to=httpx2.Response, body=body, stream=True)
        except openai.OpenAIError as exc:
            log.warning("upstream refused the request: %s", type(exc).__name__)
            if isinstance(exc, openai.NotFoundError) and params["model"] == self.default_model:
                # Not the client's doing: this service's LLM_MODEL or OPENAI_BASE_URL (without /v1?)
                raise ProviderError("upstream_error", "the model server has no such model or endpoint: "
                                    "check this service's LLM_MODEL and OPENAI_BASE_URL") from None
            raise sdk_error(exc, openai) from None
        # httpx's documented per-request timeouts; the body's reads, not begun yet, take theirs.
        response.request.extensions["timeout"]["read"] = self.body_read_timeout_s
        return OpenAIReply(response)


class OpenAIReply:
    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self._events = sse_data(body_chunks(response))
        self._closed = False

    def __iter__(self) -> Iterator[Chunk]:
        finish = done = None
        try:
            for data in self._events:
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise mid_answer_error(chunk["error"])
                if chunk.get("usage"):
                    yield Usage(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
                if not chunk.get("choices"):
                    continue
                choices = chunk["choices"]
                choice = choices[0]
                if len(choices) > 1 or choice.get("index"):  # `n` > 1: other choices, maybe the answer's too
                    yield from other_choices(choices)
                    choice = next((c for c in choices if not c.get("index")), None)
                    if choice is None:
                        continue
                delta = choice.get("delta") or {}
                # vLLM and DeepSeek send `reasoning_content`; newer vLLM and others `reasoning`.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield Reasoning(reasoning)
                if delta.get("content"):
                    yield delta["content"]
                if delta.get("refusal"):
                    yield Refusal(delta["refusal"])
                if choice.get("logprobs") and choice["logprobs"].get("content"):
                    yield Logprobs(choice["logprobs"]["content"])
                if delta.get("tool_calls"):
                    yield from tool_call_deltas(delta["tool_calls"])
                finish = choice.get("finish_reason") or finish  # usage comes after it
        except ProviderError:
            raise
        except Exception as exc:
            if self._closed:
                return  # closed on purpose: the engine already knows why
            log.warning("upstream stream failed: %s", type(exc).__name__)
            raise sdk_error(exc, openai) from None
        if finish is None and done:  # a lenient server that names no reason: the answer is whole
            finish = "stop"
        if finish is None:
            if self._closed:
                return
            # A body without a length ends when the socket closes: without a finish reason,
            # the upstream went away mid-answer.
            raise ProviderError("upstream_error", "the model server closed the stream before the answer was complete")
        yield Finish(finish)
        try:
            for _ in self._events:  # the end of the body: the connection can then be used again
                pass
        except Exception:
            pass  # the answer is whole; the connection is just not reused

    def close(self) -> None:
        self._closed = True
        close_response(self._response)
