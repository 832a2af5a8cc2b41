"""Anthropic's Messages API, streamed, through the official `anthropic` SDK
(`LLM_PROVIDER=anthropic`, `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`).

As for the OpenAI provider, the SDK makes the request (its auth, version header, timeouts and
errors) with `client.post(..., cast_to=httpx2.Response, stream=True)`, and the events are read
here as JSON from the response's `data:` lines, without a pydantic model per event. The events:
`message_start` (the prompt's tokens), `content_block_delta` with a `text_delta` (answer text)
or a `thinking_delta` (reasoning, when `ANTHROPIC_THINKING_TOKENS` asks for it), `message_delta`
(the stop reason and the answer's tokens), `message_stop`, `ping`, and `error`. System messages
become the request's `system`.

Function tools are Anthropic's tool use: OpenAI's `tools` become `{"name", "description",
"input_schema"}`, `tool_choice` its `auto`/`any`/`tool`/`none` (`parallel_tool_calls: false`:
`disable_parallel_tool_use`), an assistant's calls `tool_use` blocks and the tools' results
`tool_result` blocks of a user message; a streamed `tool_use` block (`content_block_start`, then
`input_json_delta` pieces) becomes a call's fragments (`ToolCallDelta`).

SDK errors become `ProviderError`s with the service's codes and messages of its own: nothing of
an upstream's body is passed on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import anthropic
import httpx2

from ..config import Settings
from .base import Chunk, Finish, ProviderError, Reasoning, ToolCallDelta, Usage
from .http import body_chunks, close_response, http_client, sdk_error, sse_data, warm

log = logging.getLogger(__name__)

# Anthropic's stop reasons, as OpenAI's finish reasons (the `done` event's vocabulary).
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}


def mid_answer_error(error: object) -> ProviderError:
    """An `error` event: `overloaded_error` (a 529 before the stream) is worth a retry."""
    if isinstance(error, dict) and error.get("type") == "overloaded_error":
        return ProviderError("upstream_unavailable", "the model server is overloaded; retry later")
    return ProviderError("upstream_error", "the model server failed mid-answer")


def mapped_options(params: dict) -> dict:
    """OpenAI's options in Anthropic's words (those in `AnthropicProvider.options`)."""
    body: dict = {}
    if "stop" in params:
        body["stop_sequences"] = [params["stop"]] if isinstance(params["stop"], str) else list(params["stop"])
    if "top_p" in params:
        body["top_p"] = params["top_p"]
    if "user" in params:
        body["metadata"] = {"user_id": params["user"]}
    return body


def anthropic_messages(messages: list[dict]) -> list[dict]:
    """The turns (OpenAI's shape, system messages left out) as Anthropic's messages."""
    out: list[dict] = []
    for message in messages:
        if message["role"] == "system":
            continue
        if message["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": message["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):  # results, together
                out[-1]["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        elif message.get("tool_calls"):
            blocks = [{"type": "text", "text": message["content"]}] if message["content"] else []
            blocks += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": call_input(call)} for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


def call_input(call: dict) -> object:
    """A call's arguments as the JSON value Anthropic wants them."""
    try:
        return json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        raise ProviderError("invalid_request", f"the arguments of the tool call {call['id']!r} are not JSON",
                            400) from None


def anthropic_tools(params: dict) -> dict:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls` as Anthropic's fields."""
    if not params.get("tools"):
        return {}
    functions = [tool["function"] for tool in params["tools"]]
    tools = [{"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
              "input_schema": f.get("parameters") or {"type": "object"}} for f in functions]
    choice = params.get("tool_choice") or "auto"
    if isinstance(choice, dict):
        choice = {"type": "tool", "name": choice["function"]["name"]}
    else:
        choice = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    if params.get("parallel_tool_calls") is False and choice["type"] != "none":
        choice["disable_parallel_tool_use"] = True
    return {"tools": tools, "tool_choice": choice}


class AnthropicProvider:
    name = "anthropic"
    # As tool use (`anthropic_tools`), and what `mapped_options` maps; Anthropic has no other.
    options = frozenset({"tools", "tool_choice", "parallel_tool_calls", "stop", "top_p", "user"})

    def __init__(self, settings: Settings) -> None:
        self.default_model = settings.llm_model or "claude-sonnet-4-5"
        self.max_tokens = settings.anthropic_max_tokens
        self.thinking_tokens = settings.anthropic_thinking_tokens
        self.body_read_timeout_s = max(settings.first_token_timeout_s, settings.idle_timeout_s) + 5
        self.client = anthropic.Anthropic(
            api_key=settings.anthropic_api_key or "no-key",
            base_url=settings.anthropic_base_url or None,
            timeout=anthropic.Timeout(settings.first_token_timeout_s, connect=10.0),  # until the headers
            max_retries=0,  # as for OpenAI: a refusal goes to our client, whose own SDK retries it

            http_client=http_client(anthropic),
        )
        warm(self.client)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list()]
        except anthropic.AnthropicError:
            return [self.default_model]

    def accepts(self, model: str) -> bool:
        """Any name, as for OpenAI: the upstream says which it has not (`model_not_found`)."""
        return True

    def stream(self, messages: list[dict], params: dict) -> AnthropicReply:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict = {
            "model": params["model"],
            "max_tokens": params.get("max_tokens") or self.max_tokens,
            "messages": anthropic_messages(messages),
            "stream": True,
            **anthropic_tools(params),
        }
        if system:
            body["system"] = system
        if "temperature" in params:
            body["temperature"] = params["temperature"]
        body.update(mapped_options(params))
        if self.thinking_tokens:
            body["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_tokens}
        try:
            response = self.client.post("/v1/messages", cast_to=httpx2.Response, body=body, stream=True)
        except anthropic.AnthropicError as exc:
            log.warning("upstream refused the request: %s", type(exc).__name__)
            raise sdk_error(exc, anthropic) from None
        response.request.extensions["timeout"]["read"] = self.body_read_timeout_s
        return AnthropicReply(response)


class AnthropicReply:
    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self._closed = False

    def __iter__(self) -> Iterator[Chunk]:
        prompt_tokens = completion_tokens = 0
        finish = None
        calls: dict[int, int] = {}  # the content blocks that are tool calls: the call's index, by block
        events = sse_data(body_chunks(self._response))
        try:
            for data in events:
                event = json.loads(data)
                kind = event.get("type")
                if kind == "content_block_delta":
                    delta = event["delta"]
                    if delta.get("type") == "text_delta" and delta["text"]:
                        yield delta["text"]
                    elif delta.get("type") == "thinking_delta" and delta["thinking"]:
                        yield Reasoning(delta["thinking"])
                    elif delta.get("type") == "input_json_delta" and event.get("index") in calls:
                        yield ToolCallDelta(calls[event["index"]], arguments=delta["partial_json"])
                elif kind == "content_block_start" and event["content_block"].get("type") == "tool_use":
                    block = event["content_block"]
                    calls[event["index"]] = len(calls)
                    yield ToolCallDelta(calls[event["index"]], block["id"], block["name"])
                elif kind == "message_start":
                    usage = event["message"].get("usage") or {}
                    prompt_tokens = usage.get("input_tokens", 0)
                    completion_tokens = usage.get("output_tokens", 0)
                elif kind == "message_delta":
                    completion_tokens = (event.get("usage") or {}).get("output_tokens", completion_tokens)
                    reason = (event.get("delta") or {}).get("stop_reason")
                    finish = FINISH.get(reason, "stop") if reason else finish
                elif kind == "message_stop":
                    break
                elif kind == "error":
                    raise mid_answer_error(event.get("error"))
        except ProviderError:
            raise
        except Exception as exc:
            if self._closed:
                return  # closed on purpose: the engine already knows why
            log.warning("upstream stream failed: %s", type(exc).__name__)
            raise sdk_error(exc, anthropic) from None
        if self._closed:
            return
        if finish is None:  # the body ended (the socket closed) before the answer did
            raise ProviderError("upstream_error", "the model server closed the stream before the answer was complete")
        yield Usage(prompt_tokens, completion_tokens)
        yield Finish(finish)
        try:
            for _ in events:  # the end of the body: the connection can then be used again
                pass
        except Exception:
            pass  # the answer is whole; the connection is just not reused

    def close(self) -> None:
        self._closed = True
        close_response(self._response)
