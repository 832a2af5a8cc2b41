"""What the providers that read an HTTP stream through an SDK share: the SDK's HTTP client, what
the SDK's errors mean, the stream's Server-Sent Events, and closing it from any thread."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import httpcore2
import httpx2

from .base import ProviderError

try:  # gevent's `select.poll`, once patched in, waits on its hub even for a zero timeout
    from gevent.monkey import get_original

    _poll = get_original("select", "poll")
except ImportError:
    _poll = select.poll


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has bytes (or its end) to read now: one poll(2) with no wait."""
    poll = _poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


class _Stream(httpcore2.NetworkStream):
    """httpcore's stream with `is_readable` asked of the kernel directly."""

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._stream.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            sock = self._stream.get_extra_info("socket")
            return sock is not None and _readable(sock)
        return self._stream.get_extra_info(info)


class _Backend(httpcore2.SyncBackend):
    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(super().connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(super().connect_unix_socket(*args, **kwargs))


def http_client(sdk: ModuleType) -> httpx2.Client:
    """The SDK's own HTTP client (`sdk.DefaultHttpxClient`: its limits, timeouts, redirects) on a
    pool whose check of an idle connection costs a poll(2), not a turn of the gevent hub.

    Before each request and after each response, httpcore asks every idle connection of the pool
    whether the server closed it; gevent's zero-timeout `poll` costs 11 us against 0.6 us, and 200
    answers that end together make about 20,000 such checks. httpx2's transport passes no network
    backend on to its pool, so the pool's is set here."""
    transport = httpx2.HTTPTransport(limits=sdk.DEFAULT_CONNECTION_LIMITS)
    transport._pool._network_backend = _Backend()
    return sdk.DefaultHttpxClient(transport=transport)


def sdk_error(exc: Exception, sdk: ModuleType) -> ProviderError:
    """A stable code, status and safe message for what `sdk` (`openai` or `anthropic`, whose
    errors are the same classes by name) raised."""
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError("upstream_timeout", "the model server did not answer in time")
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError("upstream_unavailable", "the model server could not be reached")
    if isinstance(exc, sdk.RateLimitError):
        return ProviderError("rate_limited", "the model server is rate limiting; retry later", 429)
    if isinstance(exc, getattr(sdk, "OverloadedError", ())):  # Anthropic's 529
        return ProviderError("upstream_unavailable", "the model server is overloaded; retry later")
    if isinstance(exc, sdk.NotFoundError):
        return ProviderError("model_not_found", "the model server has no such model", 400)
    if isinstance(exc, (sdk.BadRequestError, sdk.UnprocessableEntityError)):
        return ProviderError("invalid_request", "the model server rejected the request", 400)
    if isinstance(exc, (sdk.AuthenticationError, sdk.PermissionDeniedError)):
        return ProviderError("upstream_error", "the model server refused this service's credentials")
    if isinstance(exc, sdk.APIStatusError):
        return ProviderError("upstream_error", f"the model server failed (HTTP {exc.status_code})")
    return ProviderError("upstream_error", "the model server sent a broken or failed stream")


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data` of each Server-Sent Event in a body read as `chunks` of bytes (a response's
    `iter_bytes()`); comments and other fields are skipped. Lines end with LF, CRLF or CR, as the
    spec allows, and are split here rather than by httpx's `iter_lines()`, whose three layers of
    generators (bytes, text, lines) cost more than the rest of reading a chunk."""
    data: list[bytes] = []
    rest = b""
    for chunk in chunks:
        rest += chunk
        if b"\r" in rest:  # a CR at the end may be the first half of a CRLF: kept for the next chunk
            held = b"\r" if rest.endswith(b"\r") else b""
            rest = rest[: len(rest) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + held
        *lines, rest = rest.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif not line and data:
                yield b"\n".join(data).decode()
                data = []
    rest = rest.removesuffix(b"\r")
    if rest.startswith(b"data:"):  # a last line without its end
        data.append(rest[6:] if rest.startswith(b"data: ") else rest[5:])
    if data:
        yield b"\n".join(data).decode()


def close_response(response: httpx2.Response) -> None:
    """Release the connection: a response read to its end has closed itself and gone back to the
    pool; one cut short is shut down, then closed. The shutdown comes first: closing the response
    from another thread does not wake a thread blocked reading it (under gevent it does; the
    shutdown is harmless there)."""
    if not response.is_closed:
        network_stream = response.extensions.get("network_stream")
        sock = network_stream and network_stream.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    response.close()
