"""The stream engine: one answer is an append-only log of events.

A producer thread (a greenlet under gevent, which patches `threading`) reads the provider's reply
and appends events; every response generator tails the log from its own offset.

Waking the readers costs one `threading.Event` per append: the producer swaps in a fresh one and
sets the old one, which every reader that found nothing new is waiting on. Under gevent that is
a third of the cost of a `Condition`, whose wait and notify are written in Python. A reader waits
without a timeout: when its heartbeat or a deadline falls due first, the process's `Clock` wakes
it (a timer for each wait was an eighth of the cost of a token).

The reader owns time: it sends heartbeats, enforces the first-token, idle and total deadlines, and
takes everything appended since its last write as one chunk, so writes coalesce by themselves when
tokens outrun the socket. When the last reader leaves and the answer's grace has passed (for an
SSE answer, `RESUME_GRACE_S`, time for an EventSource to reconnect; none for the others), the
answer is stopped: the reply is closed, which releases the upstream, and the producer ends.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

from .config import Settings
from .providers.base import (
    ChoiceDelta,
    Finish,
    Logprobs,
    ProviderError,
    Reasoning,
    Refusal,
    Reply,
    Status,
    ToolCallDelta,
    Usage,
)
from .store import Log
from .threads import run_soon, start_thread
from .tool_calls import delta_event, message_calls, whole_calls
from .wire import Framing

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
STORAGE_ERROR = {"code": "storage_error", "message": "the answer could not be saved; it is kept and saved later"}


class Answer:
    """One answer in progress: its event log, its timings and its outcome.

    Events are plain dicts with a `type`; their index in the log is their sequence number. The log
    keeps a `delta` as its bare text (a dict per token was most of the memory of a stream) and
    hands readers dicts. Only the producer appends until the end; the terminal event (`done` or
    `error`) is appended once, by the producer or by `stop()`, whichever comes first.
    """

    def __init__(
        self,
        reply: Reply,
        *,
        message_id: str,
        conversation_id: str | None,
        model: str | None,
        settings: Settings,
        on_end: Callable[[Answer, Log], None] | None = None,
        context: dict | None = None,
        resume_grace_s: float = 0.0,
    ) -> None:
        self.reply = reply
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.settings = settings
        self.on_end = on_end
        self.context = context or {}  # who asked, for logs and ownership; the engine ignores it
        self.resume_grace_s = resume_grace_s  # how long it runs on without readers, for a reconnect
        self.heartbeats = 0
        self.saved = threading.Event()  # set once the producer has ended and the turn is saved
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.last_upstream_at = self.started
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.error: dict | None = None  # {"code", "message"} once it failed or was stopped
        self.ended = False
        self._produced = False
        self._readers = 0
        self._lock = threading.Lock()  # for the end of the log and the count of readers
        self._changed = threading.Event()  # set, and replaced, when the log grows
        self._wake_at = math.inf  # when the clock must wake the readers (the first one due)
        self.tokens = 0  # the deltas (and tool call fragments) in the log
        self.calls: dict[int, set[str]] = {}  # the tool calls begun, by index (see `delta_event`)
        self._log: Log = [
            {"type": "start", "conversation_id": conversation_id, "message_id": message_id, "model": model},
            {"type": "status", "stage": "thinking"},
        ]

    # -- the producer ---------------------------------------------------------------------

    def start(self) -> Answer:
        """Start the producer and give it a first turn before the first read (`sleep(0)`: one
        round of the gevent hub; a switch of threads otherwise), so that what the model has
        ready at once goes out with the first write instead of after it."""
        run_soon(self._produce)
        time.sleep(0)
        return self

    def _produce(self) -> None:
        error = None
        try:
            for chunk in self.reply:
                if self.ended:
                    break
                if type(chunk) is str:
                    self._append(chunk)
                elif isinstance(chunk, Reasoning):
                    self._append({"type": "reasoning", "text": chunk.text})
                elif isinstance(chunk, Refusal):
                    self._append({"type": "refusal", "text": chunk.text})
                elif isinstance(chunk, Usage):
                    self.usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                elif isinstance(chunk, ToolCallDelta):
                    self._append(delta_event(chunk, self.calls))
                    self.tokens += 1
                elif isinstance(chunk, Finish):
                    self.finish_reason = chunk.reason
                    if self.calls:
                        self._end_calls()
                    self._finish(None)  # now: the reply may still read the end of its body
                elif isinstance(chunk, Status):
                    self._append({"type": "status", "stage": chunk.stage}, token=False)
                elif isinstance(chunk, Logprobs):
                    self._append({"type": "logprobs", "content": chunk.content}, token=False)
                elif isinstance(chunk, ChoiceDelta):
                    self._append(choice_event(chunk), token=bool(chunk.text))
        except ProviderError as exc:
            error = {"code": exc.code, "message": exc.message}
        except Exception:
            if not self.ended:  # a reply closed under the producer's feet fails as it likes
                log.exception("provider failed mid-stream")
                error = {"code": "upstream_error", "message": "the model failed unexpectedly"}
        finally:
            self.reply.close()
        self._finish(error)

    def _end_calls(self) -> None:
        """The calls are whole: a `tool_call` event for each. A server that names no reason for
        an answer that called tools (some say "stop") ends it with "tool_calls", as OpenAI does."""
        for call in whole_calls(self._log):
            self._append(call, token=False)
        if self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def _finish(self, error: dict | None) -> None:
        """Save the turn, then append the terminal event (unless `stop()` did); once only."""
        with self._lock:  # from here on only this thread touches the log
            if self._produced:
                return
            self._produced = True
            stopped = self.ended
            if not stopped:
                self.error = error
                terminal = self._done_event() if error is None else {"type": "error", "error": error}
        if self.on_end is not None:
            try:  # saved before the terminal event goes out, so that the next turn sees it
                self.on_end(self, self.log() if stopped else [*self._log, terminal])
            except Exception:  # a turn that could not be saved is no success (on_end logged why)
                if not stopped:
                    self.error = STORAGE_ERROR
                    terminal = {"type": "error", "error": self.error}
        if not stopped:
            self._end(terminal)
        self.saved.set()

    def _append(self, event: dict | str, token: bool = True) -> None:
        now = time.monotonic()
        with self._lock:
            if self.ended:
                return
            if self.first_token_at is None and token:
                self.first_token_at = now
            self.last_upstream_at = now
            self._log.append(event)
            self.tokens += type(event) is str
        self._wake()

    def _end(self, event: dict) -> None:
        with self._lock:
            if self.ended:
                return
            self._terminate(event)
        self._wake()

    def _terminate(self, event: dict) -> None:
        """Append the terminal event; the caller holds the lock and saw no terminal event yet."""
        self.ended = True
        self.ended_at = time.monotonic()
        self._log.append(event)

    def _wake(self) -> None:
        """Wake every reader waiting for the log to grow (see `wait`)."""
        woken, self._changed = self._changed, threading.Event()
        woken.set()

    def _done_event(self) -> dict:
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": self.tokens}
        return {
            "type": "done",
            "finish_reason": self.finish_reason or "stop",
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},  # as OpenAI's
            "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
        }

    @property
    def ttft_ms(self) -> int | None:
        return None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000)

    @property
    def duration_ms(self) -> int:
        return round(((self.ended_at if self.ended else time.monotonic()) - self.started) * 1000)

    @property
    def text(self) -> str:
        return "".join([e for e in self._log if type(e) is str])

    @property
    def tool_calls(self) -> list[dict]:
        """The answer's tool calls in OpenAI's message shape (`tool_calls.message_calls`)."""
        return message_calls(self._log) if self.calls else []

    # -- stopping -------------------------------------------------------------------------

    def stop(self, code: str, message: str) -> None:
        """End the answer now with an error event and release the upstream (any thread)."""
        with self._lock:
            if self.ended or self._produced:
                return
            self.error = {"code": code, "message": message}
            self._terminate({"type": "error", "error": self.error})
        self._wake()
        self.reply.close()

    def attach(self) -> None:
        with self._lock:  # the clock watches an answer exactly while it has readers
            self._readers += 1
            CLOCK.watch(self)

    def detach(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0:
                CLOCK.unwatch(self)
            abandoned = self._readers == 0 and not self.ended
        if not abandoned:
            return
        if self.resume_grace_s > 0:
            timer = threading.Timer(self.resume_grace_s, self._stop_if_abandoned)
            timer.daemon = True
            timer.start()
        else:
            self._stop_if_abandoned()

    def _stop_if_abandoned(self) -> None:
        if self._readers == 0:
            self.stop(INTERRUPTED, "the client went away before the answer was complete")

    # -- readers --------------------------------------------------------------------------

    def events(self, offset: int) -> list[dict]:
        """The events from `offset` on."""
        return [{"type": "delta", "text": e} if type(e) is str else e for e in self._log[offset:]]

    def log(self, start: int = 0, end: int | None = None) -> Log:
        """The log from `start` to `end` as it is stored (see `store.Log`)."""
        return self._log[start:end]

    def size(self) -> int:
        return len(self._log)

    def wait(self, offset: int, due: float) -> list[dict]:
        """The events from `offset` on, waiting for one to arrive or for the `time.monotonic()`
        `due` to pass (give or take a tick of the clock), whichever comes first."""
        changed = self._changed  # taken before looking: an append after the look sets this one
        if len(self._log) <= offset and not self.ended:
            with self._lock:
                self._wake_at = min(self._wake_at, due)
            changed.wait()
        return self.events(offset)

    def deadline(self) -> tuple[float, str]:
        """When the upstream must next show life, and which limit that is (see `overdue`)."""
        s = self.settings
        if self.first_token_at is None:
            first = self.started + s.first_token_timeout_s, "first_token"
        else:
            first = self.last_upstream_at + s.idle_timeout_s, "idle"
        return min(first, (self.started + s.max_stream_s, "total"))

    def overdue(self, limit: str) -> str:
        """What a client is told when `limit` has passed."""
        s = self.settings
        return {
            "first_token": f"no token within {s.first_token_timeout_s:g} s",
            "idle": f"no token for {s.idle_timeout_s:g} s",
            "total": f"the answer took longer than {s.max_stream_s:g} s",
        }[limit]


def choice_event(chunk: ChoiceDelta) -> dict:
    """`{"type": "choice", "index", "text"?, "logprobs"?, "finish_reason"?}`: what the chunk has."""
    event = {"type": "choice", "index": chunk.index}
    if chunk.text:
        event["text"] = chunk.text
    if chunk.logprobs:
        event["logprobs"] = chunk.logprobs
    if chunk.finish_reason:
        event["finish_reason"] = chunk.finish_reason
    return event


class Clock:
    """Wakes the readers of each watched answer when the first of them falls due.

    One thread (a greenlet under gevent) per process looks at every answer with readers each
    `TICK_S`: a few microseconds a tick for thousands of answers, where a timer for each wait
    cost microseconds a token. Heartbeats and deadlines are met to within a tick."""

    TICK_S = 0.05

    def __init__(self) -> None:
        self.answers: set[Answer] = set()
        self._pid = 0
        self._lock = threading.Lock()

    def watch(self, answer: Answer) -> None:
        with self._lock:
            if self._pid != os.getpid():  # started lazily, and again in a forked child
                self._pid = os.getpid()
                start_thread(self._run, "reader-clock")
        self.answers.add(answer)

    def unwatch(self, answer: Answer) -> None:
        self.answers.discard(answer)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            now = time.monotonic()
            for answer in list(self.answers):
                if now >= answer._wake_at:
                    answer._wake_at = math.inf
                    answer._wake()


CLOCK = Clock()


def tail_events(answer: Answer, offset: int = 0) -> Iterator[list[dict]]:
    """Batches of new events from `offset` until the terminal one; an empty batch is a heartbeat.

    Enforces the answer's deadlines while waiting. Leaving (GeneratorExit, when the client went
    away) detaches from the answer, which stops it once no reader is left."""
    heartbeat_s = answer.settings.heartbeat_s
    answer.attach()
    try:
        last_write = time.monotonic()
        while True:
            deadline, limit = answer.deadline()
            events = answer.wait(offset, min(deadline, last_write + heartbeat_s))
            if events:
                offset += len(events)
                yield events
                if answer.ended and offset == answer.size():
                    return
                last_write = time.monotonic()
                continue
            if answer.ended:  # and `offset` is past its end: nothing more will come
                return
            now = time.monotonic()
            if now >= deadline:
                answer.stop("upstream_timeout", answer.overdue(limit))
            elif now >= last_write + heartbeat_s:
                yield []
                last_write = now
    finally:
        answer.detach()


def frames(
    answer: Answer, framing: Framing, offset: int = 0, client_gone: Callable[[], bool] | None = None
) -> Iterator[bytes]:
    """The answer's bytes in `framing`, from event `offset` on, heartbeats included."""
    return encode_batches(tail_events(answer, offset), framing, offset, client_gone, answer)


def encode_batches(
    batches: Iterator[list[dict]],
    framing: Framing,
    offset: int = 0,
    client_gone: Callable[[], bool] | None = None,
    answer: Answer | None = None,
) -> Iterator[bytes]:
    """Batches of events (an empty one: a heartbeat is due) as bytes in `framing`; heartbeats
    are counted on `answer`.

    At each heartbeat `client_gone` is asked too: a write to a closed socket usually succeeds
    once, and a framing without heartbeats (plain text) writes nothing while the model is silent.
    The first chunk may be empty: it makes the server send the headers at once."""
    first = True
    for events in batches:
        if events:
            data = framing.encode(events, offset)
            offset += len(events)
            if data or first:
                first = False
                yield data
        elif client_gone is not None and client_gone():
            return
        elif framing.heartbeat:
            if answer is not None:
                answer.heartbeats += 1
            yield framing.heartbeat


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client closed its end of `sock`, seen without reading or writing."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
