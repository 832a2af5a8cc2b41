"""What the providers that read an HTTP stream through an SDK share: the stream's Server-Sent
Events, and closing it from any thread."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx2


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
