"""`stream_response()`: any iterable of text (or of typed events) as a streamed Flask response.

The iterable becomes the reply of an engine `Answer`, exactly as a provider's reply does, so it
gets what every endpoint of the service gets: it is read apart from the response, heartbeats go
out while it is slow, its deadlines hold, and a client that leaves stops it.

The iterable is read in a thread of its own (a greenlet under gevent), the pump, which hands
what it yields to the answer's producer: so that closing it can interrupt a `next()` that
blocks. Closing a generator from another thread while it runs is impossible (`ValueError:
generator already executing`); instead `GeneratorExit` is raised inside it, where it waits:
under gevent by throwing it into the pump's greenlet, at once; in a thread as an asynchronous
exception (`PyThreadState_SetAsyncExc`), which is seen at its next Python instruction, so a
generator blocked in one long call into C (a `time.sleep(60)`, a socket read) leaves when that
call returns. Either way its `finally` runs, in the pump.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import queue
import threading
from collections.abc import Iterable, Iterator

from flask import Response, copy_current_request_context, current_app, has_request_context

from .config import Settings
from .engine import Answer
from .providers.base import Chunk, Finish, ProviderError, Reasoning, Status, ToolCallDelta, Usage
from .store import new_id
from .threads import start_thread, under_gevent
from .turns import streamed
from .wire import Framing, NDJSONFraming, SSEFraming, TextFraming

log = logging.getLogger(__name__)

FAILED = "the stream failed unexpectedly; see the server's log"
_END = object()  # the pump has nothing more


class SourceReply:
    """A user's iterable as an engine `Reply`: its values as they come, `close()` from any thread."""

    def __init__(self, source: Iterable) -> None:
        self._source = source
        # The source runs in the request's context, as the response's own generator would
        # (`stream_with_context`): it may read `request`, `g` and `current_app`.
        self._read = copy_current_request_context(self._read) if has_request_context() else self._read
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._done = False  # the pump has left the source (set by the pump)
        self._runner: object = None  # the pump's thread id, or its greenlet under gevent
        self._lock = threading.Lock()  # one close at a time

    def start(self) -> SourceReply:
        start_thread(self._pump, "stream-source")
        return self

    def _pump(self) -> None:
        if under_gevent():
            from gevent import getcurrent

            self._runner = getcurrent()
        else:
            self._runner = threading.get_ident()
        try:
            self._read()
        except GeneratorExit:  # interrupted by close() outside the source: nothing more to do
            pass
        finally:
            self._done = True
            self._queue.put(_END)

    def _read(self) -> None:
        try:
            if self._closed:  # closed before it started
                return
            for item in self._source:
                self._queue.put(item)
                if self._closed:
                    break
        except GeneratorExit:
            pass  # close() interrupted it: its `finally` has run
        except ProviderError as exc:  # raised on purpose: its message is meant for the client
            self._queue.put(exc)
        except Exception:
            log.exception("the stream's source failed")
            self._queue.put(ProviderError("internal_error", FAILED, 500))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:  # a generator suspended at a `yield`: its `finally` runs now
                close()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            item = self._queue.get()
            if item is _END or self._closed:
                return
            if isinstance(item, ProviderError):
                raise item
            yield chunk(item)

    def close(self) -> None:
        """Stop the source, interrupting it where it waits (see the module's docstring)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_END)  # the producer may be waiting for the next value
            runner = self._runner
            if runner is None or self._done:
                return
            if under_gevent():
                import gevent

                gevent.kill(runner, GeneratorExit)  # asynchronous: thrown when the hub runs it
            else:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(runner), ctypes.py_object(GeneratorExit))


def chunk(item: object) -> Chunk:
    """What the engine takes from a value of the source: text, or one of the service's events."""
    if type(item) is str or isinstance(item, (Reasoning, Usage, Finish, Status, ToolCallDelta)):
        return item
    if isinstance(item, dict):
        kind = item.get("type")
        if kind == "delta":
            return str(item["text"])
        if kind == "reasoning":
            return Reasoning(str(item["text"]))
        if kind == "status":
            return Status(str(item["stage"]))
        if kind == "tool_call_delta":
            return ToolCallDelta(int(item["index"]), item.get("id"), item.get("name"), str(item.get("arguments", "")))
        if kind == "error":
            raise ProviderError(str(item["error"]["code"]), str(item["error"]["message"]), 500)
        if kind == "done":
            return Finish(item.get("finish_reason") or "stop")
    raise TypeError("a stream yields text or events of type delta, reasoning, status, tool_call_delta, error or"
                    f" done, not {item!r}")


FRAMINGS = ("sse", "ndjson", "text")


def stream_response(
    source: Iterable,
    framing: str = "sse",
    *,
    heartbeat_s: float | None = None,
    first_token_timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
    max_stream_s: float | None = None,
) -> Response:
    """Stream `source`, an iterable of text (or of the service's typed events, as dicts with a
    `type`), as Server-Sent Events (`event:`, `id:` and JSON `data:`), NDJSON or plain text.

    The limits default to the app's settings (`app.config`, then the environment: `HEARTBEAT_S`,
    `FIRST_TOKEN_TIMEOUT_S`, `IDLE_TIMEOUT_S`, `MAX_STREAM_S`). An exception in `source` ends the
    stream with an `error` event (`internal_error`; a `ProviderError` raised there gives its own
    code and message); a client that leaves closes it (its `finally` runs)."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
    limits = {"heartbeat_s": heartbeat_s, "first_token_timeout_s": first_token_timeout_s,
              "idle_timeout_s": idle_timeout_s, "max_stream_s": max_stream_s}
    settings = app_settings()
    if any(value is not None for value in limits.values()):
        settings = dataclasses.replace(settings, **{k: v for k, v in limits.items() if v is not None})
    message_id = new_id()
    answer = Answer(SourceReply(source).start(), message_id=message_id, conversation_id=None, model=None,
                    settings=settings)
    wire: Framing = {"sse": lambda: SSEFraming(message_id, settings.sse_retry_ms), "ndjson": NDJSONFraming,
                     "text": TextFraming}[framing]()
    return streamed(answer.start(), wire)


def app_settings() -> Settings:
    """The settings of the current app: its `LLMStreaming` service's, or read from its config
    (then the environment) once."""
    extensions = current_app.extensions
    service = extensions.get("streaming")
    if service is not None:
        return service.settings
    if "streaming.settings" not in extensions:
        extensions["streaming.settings"] = Settings.from_config(current_app.config)
    return extensions["streaming.settings"]
