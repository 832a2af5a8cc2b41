"""The default live log: the answer's checkpoints in the store (see `lease.py`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from ..config import Settings
from ..store import Log, Store, StoreUnavailable

POLL_S = 1.0


class StoreLog:
    name = "store"

    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store

    def start(self, worker: str, live: dict) -> None:
        """Nothing: the leases' thread checkpoints the answers and looks for stop requests."""

    def follow(self, answer) -> None:
        pass

    def tail(self, message_id: str, owner: str, offset: int, heartbeat_s: float) -> Iterator[list[dict]]:
        return checkpointed_events(self.store, message_id, owner, offset, heartbeat_s)

    def streaming_conversation(self, message_id: str, owner: str) -> None:
        return None  # the store is this log

    def request_stop(self, message_id: str) -> None:
        self.store.request_stop(message_id)

    def events(self, message_id: str) -> Log | None:
        return None

    def check(self) -> dict:
        return {}


def checkpointed_events(store: Store, message_id: str, owner: str, offset: int,
                        heartbeat_s: float) -> Iterator[list[dict]]:
    """Batches of an answer that another process produces, read from its checkpoints in the
    store (every `LEASE_S / 3`) until it ends. The answer's last event always comes, even to a
    client that saw more than the last checkpoint held: a reader learns that its answer was lost
    with its worker (`worker_lost`)."""
    last_write = time.monotonic()
    while True:
        try:
            row = store.message(message_id, owner)
        except StoreUnavailable:
            yield [{"type": "error", "error": {"code": "storage_error", "message": "the answer could not be read"}}]
            return
        events = [] if row is None else row["events"]
        if row is None or row["status"] != "streaming":
            rest = events[offset:] or events[-1:]
            if rest:
                yield rest
            return
        if events[offset:]:
            yield events[offset:]
            offset, last_write = len(events), time.monotonic()
        elif time.monotonic() - last_write >= heartbeat_s:
            yield []
            last_write = time.monotonic()
        time.sleep(POLL_S)
