"""Live answers seen from other processes: how a reader on another worker or host follows an
answer that it does not produce, and how a stop reaches the producer.

Readers on the producing worker always tail the answer in memory (`engine.Answer`). For the
others, one interface, two implementations, picked by configuration:
- `checkpoints.StoreLog` (the default): the answer's checkpoints in the store, every
  `LEASE_S / 3`; stops through a flag in the store that the producer looks at every second.
- `redis_streams.RedisLog` (`REDIS_URL`): the answer's events in a Redis Stream, flushed by the
  producer about 20 times a second; stops over Redis pub/sub, at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from ..config import Settings
from ..store import Log, Store

if TYPE_CHECKING:
    from ..engine import Answer


class LiveLog(Protocol):
    name: str

    def start(self, worker: str, live: dict[str, Answer]) -> None:
        """Start this process's background work (once per process)."""

    def follow(self, answer: Answer) -> None:
        """A new answer that this process produces."""

    def tail(self, message_id: str, owner: str, offset: int, heartbeat_s: float) -> Iterator[list[dict]]:
        """Batches of events of an answer produced elsewhere, from `offset` to its last event (a
        reader that saw more than is known gets just that last one); an empty batch is a
        heartbeat."""

    def streaming_conversation(self, message_id: str, owner: str) -> str | None:
        """The conversation of the owner's answer when this log alone shows it streaming, so that a
        reconnect to another host needs no read of the store; None: ask the store."""

    def request_stop(self, message_id: str) -> None:
        """Ask the producer of the answer, wherever it runs, to stop it."""

    def events(self, message_id: str) -> Log | None:
        """Every event known of the answer (as stored), for saving the turn of a dead worker;
        None: nothing more than the store's checkpoint."""

    def check(self) -> dict:
        """For /healthz: what the log depends on, and whether it is reachable."""


def open_live_log(settings: Settings, store: Store) -> LiveLog:
    if settings.redis_url:
        from .redis_streams import RedisLog

        return RedisLog(settings, store)
    from .checkpoints import StoreLog

    return StoreLog(settings, store)
