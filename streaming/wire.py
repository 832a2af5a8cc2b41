"""Wire formats: pure functions from events to bytes, all of them in this module.

Events are dicts with a `type` (see DESIGN.md). A framing encodes a batch of events that a reader
took from the log in one go; consecutive `delta` (or `reasoning`, `refusal`) events are merged first, so a
burst of tokens becomes one frame and one write.
"""

from __future__ import annotations

import json
from typing import Protocol

# Events are plain values the service built: no cycles to look for (`check_circular` costs a tenth).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
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
        if kind == "delta" or kind == "reasoning" or kind == "refusal":
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
    """Only the answer's text (or the model's refusal); a failure adds a last line
    `[error] <code>: <message>`."""

    media_type = "text/plain; charset=utf-8"
    heartbeat = None

    def encode(self, events: list[dict], offset: int) -> bytes:
        out = []
        for event in events:
            if event["type"] == "delta" or event["type"] == "refusal":
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

    `start` gives the role chunk, `delta`, `reasoning` and `refusal` give `content`,
    `reasoning_content` and `refusal` chunks, `tool_call_delta` a `tool_calls` chunk
    (`tool_call_delta()`; the whole `tool_call` gives none), `logprobs` the logprobs of the text
    chunk before it (in that chunk when they come in one batch), `choice` a chunk of another
    choice (`n` > 1), `done` the chunk with the `finish_reason` (then, when asked, a usage chunk
    with no choices). An error is `data: {"error": {...}}`, which the SDK raises as `APIError`;
    it reads nothing after that, so no `[DONE]` follows. Every chunk is the same JSON around a
    different `delta`: that JSON is built once, at `start`, so that a chunk costs one encoded
    string.
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
            elif kind == "refusal":
                out.append(self._chunk(f'{{"refusal":{_string(event["text"])}}}'))
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


class ResponsesFraming:
    """OpenAI's Responses stream: typed events (`event: <type>`, `data: <json>`), each with its
    `sequence_number`, and the `Response` object that they build (`response()`).

    An answer's events become output items: its reasoning a `reasoning` item (`reasoning_text`
    content), its text a `message` item (`output_text`; a refusal's: `refusal`), each tool call a
    `function_call` item. An item opens at
    its first event (`output_item.added`, `content_part.added`) and closes when another kind of
    item begins or the answer ends (`*.done`, `output_item.done`). Nothing is coalesced, so the
    numbering is the same on every read of the same log: a reader resuming after event N
    (`starting_after`) reads the log from its start and is sent what follows N. Every delta of
    an item is the same JSON around a different fragment: built once, when the item opens.
    """

    media_type = "text/event-stream"
    heartbeat = b": ping\n\n"

    def __init__(self, response: dict, starting_after: int = -1) -> None:
        self.base = response  # what the request says of the Response: created_at, instructions, tools, ...
        self.after = starting_after
        self.seq = 0
        self.status = "in_progress"
        self.output: list[dict] = []
        self._text: dict[int, list[str]] = {}  # fragments of each open item's text, by output index
        self._heads: dict[int, str] = {}  # the JSON before a delta of each open item
        self._open: int | None = None  # the open reasoning or message item
        self._kinds: dict[int, str] = {}  # the event type of each text item's content, by output index
        self._calls: dict[int, int] = {}  # a tool call's index -> its open item
        self._end: dict = {"usage": None, "error": None, "incomplete_details": None}
        self._id = ""

    def response(self) -> dict:
        """The Response as the events so far have built it."""
        output = [self._item(i) for i in range(len(self.output))]
        return {**self.base, "id": self._id, "object": "response", "status": self.status, "output": output,
                **self._end}

    def encode(self, events: list[dict], offset: int) -> bytes:
        out: list[str] = []
        for event in events:
            kind = event["type"]
            if kind == "delta" or kind == "reasoning" or kind == "refusal":
                index = self._open
                if index is None or self._kinds[index] != kind:
                    index = self._open_text(out, kind)
                self._text[index].append(event["text"])
                self._delta(out, index, event["text"])
            elif kind == "tool_call_delta":
                index = self._calls.get(event["index"])
                if index is None:
                    index = self._open_call(out, event)
                elif "id" in event or "name" in event:  # from a server that sent them after its first fragment
                    self._name_call(index, event)
                if event["arguments"]:
                    self._text[index].append(event["arguments"])
                    self._delta(out, index, event["arguments"])
            elif kind == "tool_call":
                index = self._calls.pop(event["index"], None)
                if index is None:  # a whole call without fragments
                    index = self._open_call(out, event)
                self._name_call(index, event)
                self._text[index] = [event["arguments"]]
                where = {"item_id": self.output[index]["id"], "output_index": index}
                self._emit(out, "response.function_call_arguments.done", {**where, "arguments": event["arguments"]})
                self._close(out, index, "completed")
            elif kind == "start":
                self._id = f"resp_{event['message_id']}"
                self.base = {**self.base, "model": event["model"]}
                self._emit(out, "response.created", {"response": self.response()})
                self._emit(out, "response.in_progress", {"response": self.response()})
            elif kind == "done":
                finished = "incomplete" if event["finish_reason"] == "length" else "completed"
                for index in self._open_items():
                    self._close(out, index, finished)
                usage = event["usage"]
                self._end["usage"] = {
                    "input_tokens": usage["prompt_tokens"],
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                }
                self.status = finished
                if finished == "incomplete":
                    self._end["incomplete_details"] = {"reason": "max_output_tokens"}
                self._emit(out, f"response.{finished}", {"response": self.response()})
            elif kind == "error":
                for index in self._open_items():  # cut short: left as they were, without their `done`
                    self.output[index]["status"] = "incomplete"
                self._open, self._calls = None, {}
                error = event["error"]
                self._emit(out, "error", {"code": error["code"], "message": error["message"], "param": None})
                code = "rate_limit_exceeded" if error["code"] == "rate_limited" else "server_error"
                self._end["error"] = {"code": code, "message": error["message"]}
                self.status = "failed"
                self._emit(out, "response.failed", {"response": self.response()})
        return "".join(out).encode()

    # -- items ------------------------------------------------------------------------------

    def _item(self, index: int) -> dict:
        """The output item at `index`, with its text so far."""
        item = self.output[index]
        if index not in self._text:
            return item
        text = "".join(self._text[index])
        if item["type"] == "function_call":
            return {**item, "arguments": text}
        kind = self._kinds[index]
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []} if kind == "delta" \
            else {"type": "refusal", "refusal": text} if kind == "refusal" else {"type": "reasoning_text", "text": text}
        return {**item, "content": [part]}

    def _open_items(self) -> list[int]:
        return sorted({*([] if self._open is None else [self._open]), *self._calls.values()})

    def _add(self, out: list[str], item: dict, delta_type: str, delta_fields: str) -> int:
        index = len(self.output)
        self.output.append(item)
        self._text[index] = []
        self._emit(out, "response.output_item.added", {"output_index": index, "item": self._item(index)})
        self._heads[index] = (f'event: {delta_type}\ndata: {{"type":"{delta_type}","item_id":{_string(item["id"])},'
                              f'"output_index":{index},{delta_fields}"delta":')
        return index

    def _open_text(self, out: list[str], kind: str) -> int:
        if self._open is not None:
            self._close(out, self._open, "completed")
        n = len(self.output)
        self._kinds[n] = kind
        if kind != "reasoning":
            item = {"id": f"msg_{self._id[5:]}_{n}", "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            delta_type, fields = ("response.output_text.delta", '"content_index":0,"logprobs":[],') if kind == "delta" \
                else ("response.refusal.delta", '"content_index":0,')
            index = self._add(out, item, delta_type, fields)
        else:
            item = {"id": f"rs_{self._id[5:]}_{n}", "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": []}
            index = self._add(out, item, "response.reasoning_text.delta", '"content_index":0,')
        part = self._item(index)["content"][0]
        self._emit(out, "response.content_part.added",
                   {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part})
        self._open = index
        return index

    def _open_call(self, out: list[str], event: dict) -> int:
        if self._open is not None:
            self._close(out, self._open, "completed")
        item = {"id": f"fc_{self._id[5:]}_{len(self.output)}", "type": "function_call", "call_id": event.get("id"),
                "name": event.get("name"), "arguments": "", "status": "in_progress"}
        index = self._add(out, item, "response.function_call_arguments.delta", "")
        self._calls[event["index"]] = index
        return index

    def _name_call(self, index: int, event: dict) -> None:
        item = self.output[index]
        item["call_id"] = event.get("id") or item["call_id"]
        item["name"] = event.get("name") or item["name"]

    def _close(self, out: list[str], index: int, status: str) -> None:
        item = self._item(index)
        if item["type"] != "function_call":
            part, kind = item["content"][0], self._kinds[index]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if kind == "refusal":
                self._emit(out, "response.refusal.done", {**where, "refusal": part["refusal"]})
            else:
                done = "response.output_text.done" if kind == "delta" else "response.reasoning_text.done"
                extra = {"logprobs": []} if kind == "delta" else {}
                self._emit(out, done, {**where, "text": part["text"], **extra})
            self._emit(out, "response.content_part.done", {**where, "part": part})
        item["status"] = status
        self.output[index] = item
        del self._text[index], self._heads[index]
        if self._open == index:
            self._open = None
        self._emit(out, "response.output_item.done", {"output_index": index, "item": item})

    # -- events ---------------------------------------------------------------------------

    def _emit(self, out: list[str], kind: str, fields: dict) -> None:
        seq, self.seq = self.seq, self.seq + 1
        if seq > self.after:
            out.append(f"event: {kind}\ndata: {_json({'type': kind, **fields, 'sequence_number': seq})}\n\n")

    def _delta(self, out: list[str], index: int, text: str) -> None:
        seq, self.seq = self.seq, self.seq + 1
        if seq > self.after:
            out.append(f'{self._heads[index]}{_string(text)},"sequence_number":{seq}}}\n\n')
