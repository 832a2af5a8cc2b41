"""Starting an answer for a chat request, and turning it into a streamed response.

Shared by every endpoint: the request is checked, the turn recorded, the provider asked (an
upstream that refuses answers with a JSON error here, before any stream starts), and the answer's
producer started. When the answer ends, the turn is saved with its outcome.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from flask import Response, current_app, request, stream_with_context

from .config import Settings
from .engine import INTERRUPTED, Answer, frames, peer_closed
from .errors import ApiError
from .params import ChatRequest
from .providers.base import Provider, ProviderError
from .store import ConversationBusy, ConversationNotFound, Store
from .wire import Framing

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Service:
    """What the app holds for the process: settings, provider, store and the answers in flight."""

    settings: Settings
    provider: Provider
    store: Store
    live: dict[str, Answer] = field(default_factory=dict)


def service() -> Service:
    return current_app.extensions["streaming"]


def begin_answer(chat: ChatRequest) -> Answer:
    svc = service()
    message_id = uuid.uuid4().hex
    model = chat.model or svc.provider.default_model
    try:
        conversation_id, messages = svc.store.begin_turn(
            chat.conversation_id, message_id, chat.prompt, chat.system, model, chat.history
        )
    except ConversationNotFound:
        raise ApiError(404, "not_found", "no such conversation") from None
    except ConversationBusy:
        raise ApiError(409, "conversation_busy", "an answer is still streaming in this conversation") from None
    try:
        reply = svc.provider.stream(messages, {"model": model, **chat.provider_params()})
    except ProviderError as exc:
        svc.store.end_turn(message_id, "error", [], exc.code)
        raise
    answer = Answer(
        reply,
        message_id=message_id,
        conversation_id=conversation_id,
        model=model,
        settings=svc.settings,
        on_end=lambda answer, events: save_turn(svc, answer, events),
    )
    svc.live[message_id] = answer
    return answer.start()


def save_turn(svc: Service, answer: Answer, events: list[dict]) -> None:
    try:
        code = answer.error and answer.error["code"]
        status = "complete" if code is None else "interrupted" if code in (INTERRUPTED, "shutdown") else "error"
        svc.store.end_turn(answer.message_id, status, events, code)
    finally:
        svc.live.pop(answer.message_id, None)


def streamed(answer: Answer, framing: Framing, offset: int = 0) -> Response:
    """A streaming response of `answer` in `framing`; it reads nothing from the request later."""
    sock = request.environ.get("gunicorn.socket")
    client_gone = (lambda: peer_closed(sock)) if sock is not None else None
    headers = {**STREAM_HEADERS, "X-Conversation-Id": answer.conversation_id, "X-Message-Id": answer.message_id}
    body = stream_with_context(frames(answer, framing, offset, client_gone))
    return Response(body, content_type=framing.media_type, headers=headers)
