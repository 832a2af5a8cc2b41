"""Client-side helpers: read streams as a user's program would, recording when each part came."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def begin_together(server) -> tuple[str, list[tuple[int, str]]]:
    """60 turns at once on `server` (a conftest `Server`; 30 clients, each leaving at the headers), every
    third into a conversation that is busy: those are 409s, and the 40 others are begun, saved and
    each kept whole (its prompt, its answer as it ended). (The busy conversation's id, the turns
    begun by their number and conversation id.)"""
    from .conftest import wait_for

    busy = requests.post(server.url + "/chat", json={"prompt": "long"}, stream=True, timeout=30)
    busy_id = busy.headers["X-Conversation-Id"]

    def ask(i: int) -> tuple[int, str | None]:
        body = {"prompt": f"turn {i}", **({"conversation_id": busy_id} if i % 3 == 0 else {})}
        with requests.post(server.url + "/chat", json=body, stream=True, timeout=30) as answer:
            return answer.status_code, answer.headers.get("X-Conversation-Id")  # and leaves

    with ThreadPoolExecutor(30) as pool:
        results = list(enumerate(pool.map(ask, range(60))))
    busy.close()
    assert {code for i, (code, _) in results if i % 3 == 0} == {409}
    begun = [(i, conversation) for i, (code, conversation) in results if i % 3]
    assert len(begun) == 40 and all(code == 200 for i, (code, _) in results if i % 3)
    wait_for(lambda: all(turn["status"] != "streaming" for _, c in begun
                         for turn in server.get(f"/conversations/{c}").json()["messages"]),
             what="every turn begun to be saved")
    for i, conversation in begun:
        messages = server.get(f"/conversations/{conversation}").json()["messages"]
        assert (messages[0]["role"], messages[0]["content"]) == ("user", f"turn {i}")
        assert messages[1]["status"] in ("complete", "interrupted")
    return busy_id, begun
