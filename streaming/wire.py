"""Wire formats: pure functions from events to bytes, all of them in this module.

Events are dicts with a `type` (see DESIGN.md). A framing encodes a batch of events that a reader
took from the log in one go; consecutive `delta` (or `reasoning`) events are merged first, so a
burst of tokens becomes one frame and one write.
"""

from __future__ import annotations

import json
from typing import Protocol

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_encode_string = json.encoder.encode_basestring  # a str as a JSON string, exactly as `_encode` writes it
# Line separators that JSON may hold raw but that `str.splitlines()` breaks lines at: a client
# splitting NDJSON that way would cut an object in two. Escaped, they are the same JSON.
_SEPARATORS = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}


def _escape_separators(text: str) -> str:
    if "\u2028" in text or "\u2029" in text or "\x85" in text:  # rare: scanning costs less than translate
        return text.translate(_SEPARATORS)
    return text


def _json(value: object) -> str:
    return _escape_separators(_encode(value))


def _string(text: str) -> str:
    """A str as a JSON string, exactly as `_json` writes it."""
    return _escape_separators(_encode_string(text))


def event_json(event: dict) -> str:
    """An event as compact JSON. A text event (`delta`, `reasoning`: nearly every frame of a
    stream) is written directly, which costs a tenth of the generic encoder, and so is a tool
    call's fragment after its first (nearly every frame of a call)."""
    if len(event) == 2 and "text" in event:
        return f'{{"type":"{event["type"]}","text":{_string(event["text"])}}}'
    if len(event) == 3 and "arguments" in event:
        return f'{{"type":"tool_call_delta","index":{event["index"]},"arguments":{_string(event["arguments"])}}}'
    return _json(event)


def coalesce(events: list[dict], offset: int) -> list[tuple[int, dict]]:
    """(sequence number, event) pairs, runs of text events of one type merged into the last."""
    if len(events) == 1:  # a token at a time, the common case when the model is slower than the socket
        return [(offset, events[0])]
    merged: list[tuple[int, dict]] = []
    run: list[str] = []
    for seq, event in enumerate(events, offset):
        kind = event["type"]
        if kind == "delta" or kind == "reasoning":
            run.append(event["text"])
            following = events[seq - offset + 1]["type"] if seq - offset + 1 < len(events) else None
            if following == kind:
                continue
            event = {"type": kind, "text": "".join(run)} if len(run) > 1 else event
            run = []
        merged.append((seq, event))
    return merged


def sse(data: str, event: str | None = None, event_id: str | None = None, retry_ms: int | None = None) -> str:
    """One Server-Sent Events frame. `data` must hold no line break (it is JSON here)."""
    head = ""
    if event_id is not None:
        head += f"id: {event_id}\n"
    if retry_ms is not None:
        head += f"retry: {retry_ms}\n"
    if event is not None:
        head += f"event: {event}\n"
    return f"{head}data: {data}\n\n"


class Framing(Protocol):
    media_type: str
    heartbeat: bytes | None

    def encode(self, events: list[dict], offset: int) -> bytes: ...


class SSEFraming:
    """`id: <message_id>:<seq>`, `event: <type>`, `data: <json>`; `retry` on the first frame."""

    media_type = "text/event-stream"
    heartbeat = b": ping\n\n"

    def __init__(self, message_id: str, retry_ms: int) -> None:
        self.message_id = message_id
        self.retry_ms: int | None = retry_ms

    def encode(self, events: list[dict], offset: int) -> bytes:
        out = []
        for seq, event in coalesce(events, offset):
            out.append(sse(event_json(event), event["type"], f"{self.message_id}:{seq}", self.retry_ms))
            self.retry_ms = None
        return "".join(out).encode()


class NDJSONFraming:
    """One JSON object a line; `index` added when the answer is one item of a batch (a tool call
    event's own `index` is then its `call_index`)."""

    media_type = "application/x-ndjson"
    heartbeat = b'{"type":"ping"}\n'

    def __init__(self, index: int | None = None) -> None:
        self.index = index

    def encode(self, events: list[dict], offset: int) -> bytes:
        if self.index is None:
            lines = [event_json(event) for _, event in coalesce(events, offset)]
        else:
            lines = [_json(self._item(event)) for _, event in coalesce(events, offset)]
        return ("\n".join(lines) + "\n").encode()

    def _item(self, event: dict) -> dict:
        if "index" in event:
            return {**event, "call_index": event["index"], "index": self.index}
        return {**event, "index": self.index}


class TextFraming:
    """Only the answer's text; a failure adds a last line `[error] <code>: <message>`."""

    media_type = "text/plain; charset=utf-8"
    heartbeat = None

    def encode(self, events: list[dict], offset: int) -> bytes:
        out = []
        for event in events:
            if event["type"] == "delta":
                out.append(event["text"])
            elif event["type"] == "error":
                out.append(f"\n[error] {event['error']['code']}: {event['error']['message']}\n")
        return "".join(out).encode()


def tool_call_delta(event: dict) -> str:
    """A `tool_call_delta` event as a chunk's `delta`, OpenAI's way: the call's `id`, `type` and
    `function.name` on its first fragment only, then pieces of `function.arguments`, written
    directly (nearly every fragment is one; a fifth of the cost of the generic encoder)."""
    if "id" not in event and "name" not in event:
        arguments = _string(event["arguments"])
        return f'{{"tool_calls":[{{"index":{event["index"]},"function":{{"arguments":{arguments}}}}}]}}'
    call: dict = {"index": event["index"]}
    if "id" in event:
        call["id"] = event["id"]
    if "name" in event:  # the first fragment, even from a server that gives its calls no id
        call["type"] = "function"
    function = {"name": event["name"]} if "name" in event else {}
    call["function"] = {**function, "arguments": event["arguments"]}
    return _json({"tool_calls": [call]})


class OpenAIFraming:
    """OpenAI's `data: <chat.completion.chunk>` frames, then `data: [DONE]`.

    `start` gives the role chunk, `delta` and `reasoning` give `content` and `reasoning_content`
    chunks, `tool_call_delta` a `tool_calls` chunk (`tool_call_delta()`; the whole `tool_call`
    gives none), `logprobs` the logprobs of the text chunk before it (in that chunk when they
    come in one batch), `choice` a chunk of another choice (`n` > 1), `done` the chunk with the
    `finish_reason` (then, when asked, a usage chunk with no choices). An error is
    `data: {"error": {...}}`, which the SDK raises as `APIError`; it reads nothing after that, so
    no `[DONE]` follows. Every chunk is the same JSON around a different
    `delta`: that JSON is built once, at `start`, so that a chunk costs one encoded string.
    """

    media_type = "text/event-stream"
    heartbeat = b": ping\n\n"

    def __init__(self, created: int, include_usage: bool = False) -> None:
        self.created = created
        self.include_usage = include_usage
        self._meta: dict = {}
        self._head = self._tail = ""
        self._usage = {"usage": None} if include_usage else {}
        self._choices: set[int] = set()  # the other choices (`n` > 1) that had their first chunk

    def _chunk(self, delta: str, finish_reason: str = "null", logprobs: str = "null") -> str:
        return f'{self._head}{delta},"logprobs":{logprobs},"finish_reason":{finish_reason}{self._tail}'

    def encode(self, events: list[dict], offset: int) -> bytes:
        out = []
        previous: dict = {}
        for _, event in coalesce(events, offset):
            kind = event["type"]
            if kind == "delta":
                out.append(self._chunk(f'{{"content":{_string(event["text"])}}}'))
            elif kind == "reasoning":
                out.append(self._chunk(f'{{"reasoning_content":{_string(event["text"])}}}'))
            elif kind == "tool_call_delta":
                out.append(self._chunk(tool_call_delta(event)))
            elif kind == "start":
                self._meta = {
                    "id": f"chatcmpl-{event['message_id']}",
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": event["model"],
                }
                self._head = f'data: {_json(self._meta)[:-1]},"choices":[{{"index":0,"delta":'
                self._tail = '}],"usage":null}\n\n' if self.include_usage else "}]}\n\n"
                out.append(self._chunk('{"role":"assistant","content":""}'))
            elif kind == "done":
                out.append(self._chunk("{}", _json(event["finish_reason"])))
                if self.include_usage:
                    out.append(f"data: {_json({**self._meta, 'choices': [], 'usage': event['usage']})}\n\n")
                out.append("data: [DONE]\n\n")
            elif kind == "error":
                error = event["error"]
                body = {"message": error["message"], "type": "server_error", "param": None, "code": error["code"]}
                out.append(f"data: {_json({'error': body})}\n\n")
            elif kind == "logprobs" or kind == "choice":
                if kind == "logprobs" and previous.get("type") == "delta":
                    out.pop()  # the text's chunk, sent again with its logprobs
                out.append(self._choice_chunk(event, previous))
            previous = event
        return "".join(out).encode()

    def _choice_chunk(self, event: dict, previous: dict) -> str:
        """The chunk of a `logprobs` event (choice 0's, in the chunk of the text it is about when
        that is the one before, which the caller drops) or of a `choice` event (another choice,
        `n` > 1; its first chunk says its role, as choice 0's does)."""
        if event["type"] == "logprobs":
            logprobs = _json({"content": event["content"], "refusal": None})
            delta = f'{{"content":{_string(previous["text"])}}}' if previous.get("type") == "delta" else "{}"
            return self._chunk(delta, logprobs=logprobs)
        delta = {"content": event["text"]} if "text" in event else {}
        if event["index"] not in self._choices:
            self._choices.add(event["index"])
            delta = {"role": "assistant", "content": "", **delta}
        choice = {"index": event["index"], "delta": delta,
                  "logprobs": {"content": event["logprobs"], "refusal": None} if "logprobs" in event else None,
                  "finish_reason": event.get("finish_reason")}
        return f"data: {_json({**self._meta, 'choices': [choice], **self._usage})}\n\n"
