"""Starting an answer for a chat request, and turning it into a streamed response.

Shared by every endpoint: the limits are checked, the turn recorded, the provider asked (an
upstream that refuses answers with a JSON error here, before any stream starts), and the answer's
producer started. When the answer ends, the turn is saved with its outcome, one log line is
written and the metrics are updated.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

from flask import Response, current_app, g, request, stream_with_context

from . import metrics
from .config import Settings
from .engine import INTERRUPTED, STORAGE_ERROR, Answer, frames, peer_closed, tail_events
from .errors import ApiError
from .lease import STOPPED, Leaser
from .live import LiveLog
from .params import ChatRequest
from .providers.base import Provider, ProviderError
from .store import (
    ConversationBusy,
    ConversationNotFound,
    Log,
    Store,
    StoreUnavailable,
    TooManyStreams,
    UnknownToolCall,
    new_id,
)
from .wire import Framing

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SHUTDOWN = "shutdown"
INTERRUPTIONS = (INTERRUPTED, SHUTDOWN, STOPPED)  # an answer cut short, saved as `interrupted`

log = logging.getLogger(__name__)

stream_log = logging.getLogger("streaming.streams")


class LineHandler(logging.StreamHandler):
    """Each record's message as one line, written and flushed under one hold of the handler's
    lock. (`StreamHandler` formats the record, then takes its lock again to flush; under gevent
    that lock is `threading`'s RLock written in Python: a third of the cost of a line.)"""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(record.getMessage() + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def log_streams_to_stdout() -> None:
    """One JSON line per stream, to stdout as Heroku expects: the service's own logging, set up by
    `create_app()`. In a host app the lines go wherever its logging sends `streaming.streams`."""
    if not stream_log.handlers:
        handler = LineHandler(sys.stdout)
        stream_log.addHandler(handler)
        stream_log.setLevel(logging.INFO)
        stream_log.propagate = False


@dataclass
class Service:
    """What the app holds for the process: settings, provider, store and the answers in flight."""

    settings: Settings
    provider: Provider
    store: Store
    live_log: LiveLog
    live: dict[str, Answer] = field(default_factory=dict)
    worker: str = ""  # host:pid:nonce, this process's name in the store's leases
    url_prefix: str = ""  # where the app mounts the service ("" at its root)
    leaser: Leaser = field(init=False)
    _pid: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.leaser = Leaser(self.store, self.live, self.settings.lease_s)
        self.store.lost_events = self.live_log.events  # a dead worker's turn is saved with all it had

    def ensure_running(self) -> None:
        """Name this process and start its background work, once (again in a forked child)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
                self.leaser.start(self.worker)
                self.live_log.start(self.worker, self.live)
                self._pid = os.getpid()

    def shut_down(self, wait_s: float) -> None:
        """End every answer in flight (the worker is stopping) and wait for their turns to be saved."""
        answers = list(self.live.values())
        for answer in answers:
            answer.stop(SHUTDOWN, "the server is restarting; please retry")
        for answer in answers:
            answer.saved.wait(wait_s)


def service() -> Service:
    """The app's service. (Through the proxy's own object: on Python 3.11 an attribute read
    through a Werkzeug `LocalProxy` first fails, and formats an AttributeError, before the
    proxy's `__getattr__` finds it; this is read four times a request.)"""
    return current_app._get_current_object().extensions["streaming"]


def stop_answer(conversation_id: str, owner: str, wait_s: float = 10.0) -> dict:
    """Stop the answer streaming in the owner's conversation, on whichever worker or host
    produces it (through the store when it is another one, which looks every `STOP_POLL_S`),
    and return its turn once saved; 404 when nothing of the owner's streams there."""
    svc = service()
    message_id = svc.store.streaming_turn(conversation_id, owner)
    if message_id is None:
        raise ApiError(404, "not_found", "no answer is streaming in this conversation")
    answer = svc.live.get(message_id)
    if answer is not None:
        answer.stop(STOPPED, "the answer was stopped by request")
        answer.saved.wait(wait_s)
    else:
        svc.live_log.request_stop(message_id)
    deadline = time.monotonic() + wait_s
    while True:
        svc.store.reap()  # a worker that died cannot stop its answer: its lease tells
        turn = next(m for m in svc.store.conversation(conversation_id, owner)["messages"] if m["id"] == message_id)
        if turn["status"] != "streaming" or time.monotonic() > deadline:
            return turn
        time.sleep(0.05)


def too_many(message: str) -> ApiError:
    return ApiError(429, "too_many_streams", message, {"Retry-After": "1"})


def busy() -> ApiError:
    return ApiError(409, "conversation_busy", "an answer is still streaming in this conversation")


def model_for(chat: ChatRequest, provider: Provider) -> str:
    """The model that answers `chat`: the one it names, when `provider` has it, or its default."""
    model = chat.model or provider.default_model
    if not provider.accepts(model):
        raise ApiError(400, "model_not_found", f"no model named {model!r} here (GET /v1/models lists them)")
    return model


SERVICE_PARAMS = frozenset({"max_tokens", "temperature"})  # which every provider takes


def check_options(chat: ChatRequest, provider: Provider) -> None:
    """A 400 naming a field of `chat` that `provider` does not honour: each provider declares the
    optional fields it does (`options`), and none is dropped silently."""
    refused = sorted(set(chat.provider_params()) - SERVICE_PARAMS - getattr(provider, "options", frozenset()))
    if refused:
        exc = ApiError(400, "invalid_request", f"'{refused[0]}' is not supported by this server's model"
                                               f" (the {provider.name} provider)")
        exc.param = refused[0]  # OpenAI's `param`, for /v1
        raise exc


def begin_answer(chat: ChatRequest, resumable: bool = False) -> Answer:
    """Start answering `chat`. A `resumable` answer (one whose client can come back for the rest:
    SSE's `Last-Event-ID`) runs on for `RESUME_GRACE_S` after its last reader left."""
    svc = service()
    settings = svc.settings
    if 0 < settings.max_streams_per_worker <= len(svc.live):
        raise too_many(f"this worker is at its limit of {settings.max_streams_per_worker} streams")
    model = model_for(chat, svc.provider)
    check_options(chat, svc.provider)
    message_id, key_id = new_id(), g.key_id
    context = {"request_id": g.request_id, "key_id": key_id, "endpoint": request.path}
    try:
        conversation_id, messages = svc.store.begin_turn(
            chat.conversation_id, message_id, chat.prompt, chat.system, model, chat.history,
            # An open service has no keys to count by: only the per-worker limit holds there.
            owner=key_id, max_streams=(settings.max_streams_per_key or None) if key_id else None,
            worker=svc.worker, keep=chat.store, tool_results=chat.tool_results, request=chat.echo,
        )
    except ConversationNotFound:
        raise ApiError(404, "not_found", "no such conversation") from None
    except ConversationBusy:
        raise busy() from None
    except UnknownToolCall as exc:
        raise ApiError(400, "invalid_request", f"tool_results[{exc.position}]: the conversation's last answer"
                       f" made no tool call with the id {exc.call_id!r}") from None
    except TooManyStreams:
        raise too_many(f"this API key has {settings.max_streams_per_key} streams open already") from None
    asked = time.monotonic()
    try:
        reply = svc.provider.stream(messages, {"model": model, **chat.provider_params()})
    except Exception as exc:  # refused before the first token, or the provider's code failed: a turn
        # that failed all the same, saved so (its conversation is free for the next turn at once)
        code = exc.code if isinstance(exc, ProviderError) else "internal_error"
        svc.store.end_turn(message_id, "error", [], code)
        metrics.stream_started(context["endpoint"])
        duration_ms = round((time.monotonic() - asked) * 1000)
        record_end(context, conversation_id, message_id, "error", code, None, 0, duration_ms, 0)
        raise
    answer = Answer(
        reply,
        message_id=message_id,
        conversation_id=conversation_id,
        model=model,
        settings=settings,
        on_end=lambda answer, log: save_turn(svc, answer, log),
        context=context,
        resume_grace_s=settings.resume_grace_s if resumable else 0.0,
    )
    svc.live[message_id] = answer
    svc.live_log.follow(answer)
    metrics.stream_started(context["endpoint"])
    return answer.start()


def outcome(answer: Answer) -> tuple[str, str | None]:
    """The status and error code an answer is saved with."""
    code = answer.error and answer.error["code"]
    return ("complete" if code is None else "interrupted" if code in INTERRUPTIONS else "error"), code


def save_turn(svc: Service, answer: Answer, log: Log) -> None:
    """Save the ended answer. When that fails the client is told (`storage_error`, unless the
    answer was stopped and its last event sent already) and the leases' thread tries again every
    second, with the answer as it ended (its last event is the one the client got), until the
    store takes it."""
    status, code = outcome(answer)
    try:
        svc.store.end_turn(answer.message_id, status, log, code)
    except Exception as exc:
        if not isinstance(exc, StoreUnavailable):  # which the store logged already
            log.exception("saving the turn failed")

        def save_again() -> None:
            saved_status, saved_code = outcome(answer)
            svc.store.end_turn(answer.message_id, saved_status, answer.log(), saved_code)

        svc.leaser.unsaved[answer.message_id] = save_again
        if not answer.ended:
            status, code = "error", STORAGE_ERROR["code"]
        raise
    finally:
        svc.live.pop(answer.message_id, None)
        record_end(answer.context, answer.conversation_id, answer.message_id, status, code, answer.ttft_ms,
                   answer.tokens, answer.duration_ms, answer.heartbeats)


def record_end(context: dict, conversation_id: str, message_id: str, status: str, code: str | None,
               ttft_ms: int | None, tokens: int, duration_ms: int, heartbeats: int) -> None:
    """The metrics and the one JSON log line of an answer that ended."""
    metrics.stream_ended(status, code, ttft_ms, duration_ms, tokens, heartbeats)
    stream_log.info(json.dumps({
        **context,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "outcome": status,
        "error_code": code,
        "ttft_ms": ttft_ms,
        "tokens": tokens,
        "duration_ms": duration_ms,
    }))


def collect(answer: Answer) -> list[dict]:
    """Every event of an answer that succeeded (the non-streaming endpoints); a failure is an
    ApiError, since nothing has been sent yet.

    The client is looked at once a heartbeat while the model writes: when it has gone, the
    answer is stopped (and saved as interrupted) instead of running on for nobody."""
    sock = request.environ.get("gunicorn.socket")
    every_s, looked = answer.settings.heartbeat_s, time.monotonic()
    events: list[dict] = []
    with closing(tail_events(answer)) as batches:  # leaving early stops the answer, as for a stream
        for batch in batches:
            events += batch
            if sock is not None and time.monotonic() - looked >= every_s:
                looked = time.monotonic()
                if peer_closed(sock):
                    raise ApiError(499, INTERRUPTED, "the client went away before the answer was complete")
    if events[-1]["type"] == "error":
        error = events[-1]["error"]
        if error["code"] == SHUTDOWN:  # the worker is restarting: a retry goes to another one
            raise ApiError(503, SHUTDOWN, error["message"], {"Retry-After": "1"})
        raise ApiError(503 if error["code"].startswith("upstream") else 500, error["code"], error["message"])
    return events


def streamed(answer: Answer, framing: Framing, offset: int = 0) -> Response:
    """A streaming response of `answer` in `framing`; it reads nothing from the request later."""
    return streamed_bytes(frames(answer, framing, offset, client_gone()), framing, answer.conversation_id,
                          answer.message_id)


def streamed_bytes(body: Iterator[bytes], framing: Framing, conversation_id: str | None,
                   message_id: str) -> Response:
    """The body is bytes already, so Werkzeug passes it straight to the server (`direct_passthrough`)
    instead of wrapping it in two more layers of iteration that every write would go through.
    (`stream_response()`'s answers belong to no conversation.)"""
    headers = {**STREAM_HEADERS, "X-Message-Id": message_id}
    if conversation_id is not None:
        headers["X-Conversation-Id"] = conversation_id
    return Response(stream_with_context(body), content_type=framing.media_type, headers=headers,
                    direct_passthrough=True)


def client_gone():
    """A function telling whether the request's client left, where gunicorn hands its socket."""
    sock = request.environ.get("gunicorn.socket")
    return (lambda: peer_closed(sock)) if sock is not None else None
