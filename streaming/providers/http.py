"""What the providers that read an HTTP stream through an SDK share: the SDK's HTTP client, what
the SDK's errors mean, the stream's Server-Sent Events, and closing it from any thread."""

from __future__ import annotations

import functools
import select
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
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


class _Stream(httpcore2.NetworkStream):
    """httpcore's stream with `is_readable` asked of the kernel directly, and what `body_chunks`
    needs to read a chunked body below httpx: the bytes of the response that came after its head
    (kept from the first reads after each request is written, until the head's end), and bytes put
    back, which the next read returns."""

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream
        self._head: bytes | None = None  # the response's first bytes, while its head's end is not among them
        self.after_head: bytes | None = None  # what came after the head in the same reads
        self._put_back = b""
        self._poll: Any = None  # a poll object with the socket in it, made on the first check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._put_back:
            data, self._put_back = self._put_back[:max_bytes], self._put_back[max_bytes:]
            return data
        data = self._stream.read(max_bytes, timeout)
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end >= 0 or not data:
                whole = end >= 0 and self._head.startswith(b"HTTP/1.1 200 ")
                self.after_head = self._head[end + 4 :] if whole else None
                self._head = None
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._head, self.after_head = b"", None  # a new request: its response's head comes next
        self._stream.write(buffer, timeout)

    def put_back(self, data: bytes) -> None:
        self._put_back = data

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._stream.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # whether the socket has bytes (or its end) to read now: one poll(2)
            if self._poll is None:
                sock = self._stream.get_extra_info("socket")
                if sock is None:
                    return False
                self._poll = _poll()
                self._poll.register(sock, select.POLLIN)
            return bool(self._poll.poll(0))
        return self._stream.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    """A network backend (the kernel's sockets by default) whose streams are `_Stream`s."""

    def __init__(self, backend: httpcore2.NetworkBackend | None = None) -> None:
        self._backend = backend or httpcore2.SyncBackend()

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


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


def warm(client: Any) -> None:
    """Make the SDK `client`'s platform headers now, in the worker as it starts: the SDK finds them
    once for the process (`platform.processor()`, which runs `uname -p` in a subprocess) and caches
    them only then, so that every request of the first ones made together (200 clients starting
    at once, a deploy's reconnects) ran that subprocess."""
    client.platform_headers()


def body_chunks(response: httpx2.Response) -> Iterator[bytes]:
    """The body of a streamed `response` of the SDK's client, as bytes. A chunked HTTP/1.1 body
    (what a streaming server sends) is read here off the connection's stream, its chunks decoded
    as they come; any other body through httpx (`iter_bytes`).

    httpx hands each of a stream's chunks up through h11's parser and seven generators (httpcore's
    connection, pool and stream, httpx's transport, client and response, its decoders): in one
    gevent process reading 200 streams, 46 us of CPU a chunk against 31 us here (its request
    included; a bare socket and parser, 14 us). At the body's end the
    connection goes back to the pool as httpx would leave it: what h11 was left holding after the
    head (the start of the body) is completed, the last chunk is put back on the stream, and
    httpx reads those to the body's end, so that h11 ends the message itself."""
    stream = response.extensions.get("network_stream")
    if (not isinstance(stream, _Stream) or stream.after_head is None or response.http_version != "HTTP/1.1"
            or response.headers.get("transfer-encoding", "").lower() != "chunked"
            or response.headers.get("content-encoding", "identity").lower() != "identity"):
        return response.iter_bytes()
    return _chunked(response, stream, stream.after_head)


def _chunked(response: httpx2.Response, stream: _Stream, held: bytes) -> Iterator[bytes]:
    """The chunks of a chunked body read off `stream`, where h11 holds `held`, the body's start."""
    sock = stream.get_extra_info("socket")
    if sock is not None and not isinstance(stream.get_extra_info("ssl_object"), ssl.SSLObject):
        # TCP, or TLS that the socket decrypts itself: read from the socket, not through
        # httpcore's stream, which sets its timeout and enters a context manager on each read.
        # With no timeout: under gevent a read that waits with one arms and cancels a timer
        # each time (nearly every chunk of a paced stream). A silent body is ended by the
        # engine instead, at its first-token and idle deadlines (or once no reader is left):
        # it closes the reply, which shuts the socket down and so wakes this read.
        sock.settimeout(None)
        recv = functools.partial(sock.recv, 65536)
    else:  # TLS in TLS (a proxy's), decrypted by httpcore's stream, with the request's read timeout
        recv = functools.partial(stream.read, 65536, response.request.extensions.get("timeout", {}).get("read"))
    buffer = held  # the bytes not yet decoded, from `start` on in the body
    start = 0  # where `buffer` begins in the body
    rest_of_held = b""  # the body from the end of `held` to the end of the chunk it ends in
    while True:
        line_end = buffer.find(b"\r\n")
        while line_end < 0:
            buffer += _read(recv)
            line_end = buffer.find(b"\r\n")
        size = int(buffer[:line_end].split(b";", 1)[0], 16)  # chunk extensions are ignored
        if size == 0:
            break
        end = line_end + 2 + size + 2  # the chunk's data and its CRLF
        while len(buffer) < end:
            buffer += _read(recv)
        if buffer[end - 2 : end] != b"\r\n":
            raise httpcore2.RemoteProtocolError("malformed chunk")
        if start < len(held) < start + end:
            rest_of_held = buffer[len(held) - start : end]
        yield buffer[line_end + 2 : end - 2]
        buffer, start = buffer[end:], start + end
    while b"\r\n\r\n" not in buffer:  # the last chunk: its size 0, its trailers, its end
        buffer += _read(recv)
    # h11 holds `held`: given the rest of the chunk that `held` ends in, it has whole chunks, and
    # then this last one (the buffer begins with it) makes a whole body; or `held` reaches into it.
    stream.put_back(rest_of_held + buffer if start >= len(held) else buffer[len(held) - start :])
    for _ in response.iter_raw():
        pass


def _read(recv: Callable[[], bytes]) -> bytes:
    data = recv()
    if not data:
        raise httpcore2.RemoteProtocolError("the server closed the connection mid-body")
    return data


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
