"""The chat endpoints: the same request answered as plain text, as Server-Sent Events, or whole."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from .engine import encode_batches
from .params import parse_chat_request, request_fields
from .turns import (
    STREAM_HEADERS,
    begin_answer,
    client_gone,
    collect,
    service,
    streamed,
    streamed_bytes,
)
from .wire import Framing, SSEFraming, TextFraming

bp = Blueprint("chat", __name__)


def chat_request():
    return parse_chat_request(request_fields(request), service().settings.max_prompt_chars)


@bp.route("/chat", methods=["GET", "POST"])
def chat_text():
    return streamed(begin_answer(chat_request()), TextFraming())


@bp.route("/chat/sse", methods=["GET", "POST"])
def chat_sse():
    retry_ms = service().settings.sse_retry_ms
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id:  # an empty id is what an EventSource sends when it saw no event
        return resume(last_event_id, retry_ms)
    answer = begin_answer(chat_request(), resumable=True)
    return streamed(answer, SSEFraming(answer.message_id, retry_ms))


def no_content() -> Response:
    """204, which tells an EventSource to stop reconnecting: no body, so no Content-Type either (a
    client that checks it, as httpx-sse does, would find Flask's default `text/html`)."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def resume(last_event_id: str, retry_ms: int) -> Response:
    """A reconnect never starts a second answer: it tails the live answer from where the client
    left, replays the rest of an ended one, or gets 204 (which tells EventSource to stop)."""
    message_id, _, seq = last_event_id.partition(":")
    if not (seq.isascii() and seq.isdigit()) or len(seq) > 18:
        return no_content()
    return replay(message_id, SSEFraming(message_id, retry_ms), int(seq) + 1) or no_content()


def replay(message_id: str, framing: Framing, offset: int) -> Response | None:
    """The owner's answer from event `offset` on in `framing`: tailed while it is live (through the
    live log when another process produces it), the stored rest of an ended one; None when there
    is no such answer of the owner's, or nothing from `offset` on."""
    svc = service()
    answer = svc.live.get(message_id)
    if answer is not None and answer.context["key_id"] == g.key_id:
        if offset > answer.size() or (answer.ended and offset == answer.size()):  # nothing left, or
            return None  # an id this answer has not sent
        return streamed(answer, framing, offset)
    stored, conversation_id = None, svc.live_log.streaming_conversation(message_id, g.key_id)
    if conversation_id is None:
        stored = svc.store.message(message_id, g.key_id)
        if stored is None or stored["role"] != "assistant":
            return None
        conversation_id = stored["conversation_id"]
    if stored is None or stored["status"] == "streaming":  # produced by another worker or host
        batches = svc.live_log.tail(message_id, g.key_id, offset, svc.settings.heartbeat_s)
        body = encode_batches(batches, framing, offset, client_gone())
        return streamed_bytes(body, framing, conversation_id, message_id)
    events = stored["events"][offset:]
    if not events:
        return None
    headers = {**STREAM_HEADERS, "X-Conversation-Id": conversation_id, "X-Message-Id": message_id}
    return Response(framing.encode(events, offset), content_type=framing.media_type, headers=headers)


@bp.post("/chat/blocking")
def chat_blocking():
    answer = begin_answer(chat_request())
    end = collect(answer)[-1]
    return jsonify(
        conversation_id=answer.conversation_id,
        message_id=answer.message_id,
        text=answer.text,
        tool_calls=answer.tool_calls,
        finish_reason=end["finish_reason"],
        usage=end["usage"],
        ttft_ms=end["ttft_ms"],
        duration_ms=end["duration_ms"],
    )
