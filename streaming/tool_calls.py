"""Tool calls: the events an answer's calls are streamed as, and the whole calls they add up to.

A provider yields `ToolCallDelta` fragments; the engine appends each as a `tool_call_delta`
event (`id` and `name` only on a call's first fragment) and, once the answer is
whole, one `tool_call` event per call with its whole arguments. The stored turn and the whole
completion hold the calls in OpenAI's message shape (`message_calls`), assembled from the
fragments, so that a turn cut short keeps the fragments it had.
"""

from __future__ import annotations

from collections.abc import Iterable

from .providers.base import ToolCallDelta


def delta_event(chunk: ToolCallDelta, given: dict[int, set[str]]) -> dict:
    """The fragment's event. A call's `id` and `name` go out once, with the first fragment that
    has them (`given` keeps count, by index): some servers repeat them on every fragment, and a
    client that accumulates OpenAI's chunks would join the repeats ("get_weatherget_weather")."""
    event: dict = {"type": "tool_call_delta", "index": chunk.index}
    keys = given.setdefault(chunk.index, set())
    for key, value in (("id", chunk.id), ("name", chunk.name)):
        if value is not None and key not in keys:
            event[key] = value
            keys.add(key)
    event["arguments"] = chunk.arguments
    return event


def whole_calls(log: Iterable[dict | str]) -> list[dict]:
    """The `tool_call` events that the log's `tool_call_delta` events add up to, by index."""
    calls: dict[int, dict] = {}
    for event in log:
        if type(event) is dict and event["type"] == "tool_call_delta":
            call = calls.setdefault(event["index"], {"type": "tool_call", "index": event["index"], "id": None,
                                                     "name": None, "arguments": []})
            call["id"] = call["id"] or event.get("id")
            call["name"] = call["name"] or event.get("name")
            call["arguments"].append(event["arguments"])
    return [{**call, "arguments": "".join(call["arguments"])} for _, call in sorted(calls.items())]


def message_call(event: dict) -> dict:
    """A `tool_call` event in OpenAI's message shape, as a client sends it back in its history."""
    return {"id": event["id"], "type": "function", "function": {"name": event["name"], "arguments": event["arguments"]}}


def message_calls(log: Iterable[dict | str]) -> list[dict]:
    """The log's tool calls in OpenAI's message shape (what it has of them, when cut short)."""
    return [message_call(call) for call in whole_calls(log)]


def unknown_call(messages: list[dict], start: int = 0) -> int | None:
    """The position of the first tool result from `start` on that answers a call which the
    assistant message before it did not make, if any."""
    made: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            made = {call["id"] for call in message.get("tool_calls") or ()}
        elif message["role"] == "tool" and i >= start and message["tool_call_id"] not in made:
            return i
    return None
