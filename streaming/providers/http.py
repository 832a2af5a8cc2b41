"""What the providers that read an HTTP stream through an SDK share: what the SDK's errors mean,
the stream's Server-Sent Events, and closing it from any thread."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import ModuleType

import httpx2

from .base import ProviderError


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


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The `data` of each Server-Sent Event in `lines`; comments and other fields are skipped."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


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
