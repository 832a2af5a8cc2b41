"""Client-side helpers: read streams as a user's program would, recording when each part came."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
import sseclient


@dataclass
class Received:
    events: list[dict] = field(default_factory=list)  # each with "type" and the arrival "at"
    ids: list[str] = field(default_factory=list)
    retry: str | None = None

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.of("delta"))


def read_sse(url: str, *, method: str = "POST", json_body: dict | None = None, headers: dict | None = None,
             until: Callable[[Received], bool] | None = None) -> Received:
    """Parse an SSE response with sseclient-py; closes the connection early once `until` holds."""
    response = requests.request(method, url, json=json_body, headers=headers, stream=True, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    received = Received()
    client = sseclient.SSEClient(response.iter_content(chunk_size=None))
    try:
        for message in client.events():
            event = json.loads(message.data)
            assert event["type"] == message.event
            received.events.append({**event, "at": time.monotonic()})
            received.ids.append(message.id)
            if message.retry is not None and received.retry is None:
                received.retry = message.retry
            if until is not None and until(received):
                break
    finally:
        response.close()
    return received


def read_raw(url: str, **kwargs) -> tuple[requests.Response, list[tuple[float, bytes]]]:
    """The response and its body as (arrival time, bytes) reads, as the socket delivered them."""
    response = requests.post(url, stream=True, timeout=30, **kwargs)
    chunks = [(time.monotonic(), chunk) for chunk in response.raw.stream(65536, decode_content=False) if chunk]
    return response, chunks
