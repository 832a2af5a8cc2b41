"""`POST /batch`: several prompts answered concurrently as one NDJSON stream.

Each item is an ordinary answer (its own turn, conversation and deadlines); a relay thread per
running item tails it and hands encoded lines to the response generator through a queue, which
writes whatever is waiting as one chunk. A client that leaves stops every item still running;
items not started yet never start.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from flask import Blueprint, Response, request, stream_with_context

from . import metrics
from .engine import INTERRUPTED, Answer, peer_closed, tail_events
from .errors import ApiError
from .params import ChatRequest, invalid, number_field, parse_chat_request, request_fields, required_prompt
from .providers.base import ProviderError
from .turns import STREAM_HEADERS, begin_answer, model_for, service
from .wire import NDJSONFraming

bp = Blueprint("batch", __name__)


@bp.post("/batch")
def batch():
    settings = service().settings
    fields = request_fields(request)
    prompts = fields.pop("prompts", None)
    if not isinstance(prompts, list) or not prompts:
        raise invalid("'prompts' must be a non-empty list of strings")
    if len(prompts) > settings.max_batch:
        raise invalid(f"a batch holds at most {settings.max_batch} prompts (MAX_BATCH)")
    concurrency = number_field(fields, "concurrency", int, 1, settings.max_batch_concurrency)
    fields.pop("concurrency", None)
    if "conversation_id" in fields:
        raise invalid("each batch item starts its own conversation: 'conversation_id' is not allowed")
    if "prompt" in fields:
        raise invalid("a batch takes its prompts as 'prompts': 'prompt' is not allowed")
    for index, prompt in enumerate(prompts):  # the fields the items share are checked below, once for all
        try:
            required_prompt({"prompt": prompt}, settings.max_prompt_chars)
        except ApiError as exc:
            raise invalid(f"prompts[{index}]: {exc.message}") from None
    chats = [parse_chat_request({**fields, "prompt": p}, settings.max_prompt_chars) for p in prompts]
    model_for(chats[0], service().provider)  # one model for every item: an unknown one is a 400, not an error per item
    sock = request.environ.get("gunicorn.socket")
    body = stream_with_context(
        batch_lines(chats, concurrency or min(4, settings.max_batch_concurrency), settings.heartbeat_s, sock)
    )
    return Response(body, content_type=NDJSONFraming.media_type, headers=STREAM_HEADERS, direct_passthrough=True)


def relay(answer: Answer, index: int, out: queue.SimpleQueue) -> None:
    framing, offset = NDJSONFraming(index), 0
    for events in tail_events(answer):
        if events:
            out.put(framing.encode(events, offset))
            offset += len(events)
    out.put(index)  # this item has ended


def batch_lines(chats: list[ChatRequest], concurrency: int, heartbeat_s: float, sock=None) -> Iterator[bytes]:
    out: queue.SimpleQueue = queue.SimpleQueue()
    pending = list(enumerate(chats))[::-1]
    running: dict[int, Answer] = {}
    ok = failed = 0
    try:
        while pending or running:
            while pending and len(running) < concurrency:
                index, chat = pending.pop()
                try:
                    answer = begin_answer(chat)
                except (ApiError, ProviderError) as exc:
                    failed += 1
                    error = {"type": "error", "error": {"code": exc.code, "message": exc.message}}
                    yield NDJSONFraming(index).encode([error], 0)
                    continue
                running[index] = answer
                threading.Thread(target=relay, args=(answer, index, out), daemon=True).start()
            if not running:
                continue
            try:
                items = [out.get(timeout=heartbeat_s)]
            except queue.Empty:
                if sock is not None and peer_closed(sock):
                    return
                metrics.HEARTBEATS.inc()  # the batch's own: its items' answers count none
                yield NDJSONFraming.heartbeat
                continue
            while not out.empty():  # everything waiting goes out as one write
                items.append(out.get())
            lines = []
            for item in items:
                if isinstance(item, int):
                    ended = running.pop(item)
                    ok, failed = (ok + 1, failed) if ended.error is None else (ok, failed + 1)
                else:
                    lines.append(item)
            if lines:
                yield b"".join(lines)
        yield NDJSONFraming().encode([{"type": "batch_done", "ok": ok, "failed": failed}], 0)
    finally:
        for answer in running.values():
            answer.stop(INTERRUPTED, "the client went away before the batch was complete")
