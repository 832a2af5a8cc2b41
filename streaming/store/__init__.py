"""Conversation storage behind one small interface: SQLite (the embedded default) or PostgreSQL.

A turn is a user message and the assistant message that answers it. Both rows are written when
the turn begins (the assistant's with status `streaming`, which is what makes a second turn on the
same conversation a 409), and the assistant's row is completed in one short transaction when the
answer ends: `complete`, `error` or `interrupted`, with whatever text it had.

A `streaming` row carries a lease: the worker producing it (`worker`) and until when it vouches
for it (`lease_until`). The worker renews the leases of all its answers, and checkpoints their
text, in one batched write every few seconds (`lease.Leaser`); a row whose lease ran out belongs
to a dead worker, and any worker then saves it as interrupted with code `worker_lost`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from ..config import Settings

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"

# An answer's event log as it is kept and stored: its events, a `delta` as its bare text (nearly
# every event of a log is one), so that the log is saved without a pass that rewrites it.
Log = list[dict | str]


def new_id() -> str:
    """A new row id, as 32 hex digits: a UUIDv7 (RFC 9562), its first 48 bits the time in
    milliseconds and 74 of the rest random. Ids made one after the other sort in that order, so
    that each index keyed by an id (a message's, its conversation's) grows at its end, in pages
    that the turns just before wrote too, where uuid4's random ids dirtied a page of each index
    anywhere in the file for every row."""
    bits = int.from_bytes(os.urandom(10), "big")  # 80 random bits, 74 of them kept
    return f"{time.time_ns() // 1_000_000:012x}7{bits >> 68:03x}{1 << 63 | bits & (1 << 62) - 1:016x}"


class Refused(Exception):
    """The store's refusal of a turn (or of a deletion). Raised before the transaction wrote
    anything but the saving of dead workers' turns (`reap`), which stands on its own: so a
    transaction that is refused needs nothing undone (see SQLiteStore.transaction)."""


class ConversationNotFound(Refused):
    pass


class ConversationBusy(Refused):
    pass


class TooManyStreams(Refused):
    pass


class UnknownToolCall(Refused):
    """A tool result answers a call that the conversation's last answer did not make: the
    position of that result in the turn's input, and its call id."""

    def __init__(self, position: int, call_id: str) -> None:
        super().__init__(position, call_id)
        self.position = position
        self.call_id = call_id


class StoreUnavailable(Exception):
    """The database cannot be reached or written (down, full, read-only): a 503 before a stream
    starts, a `storage_error` event after. The message names the cause, never a URL or password."""


class FailureLog:
    """Log a server that keeps failing once a minute, with the count, not a traceback per call."""

    EVERY_S = 60.0

    def __init__(self, subject: str = "the store") -> None:
        self.subject = subject
        self.failures = 0
        self.logged_at = -self.EVERY_S

    def failed(self, what: str, exc: BaseException) -> StoreUnavailable:
        self.failures += 1
        now = time.monotonic()
        if now - self.logged_at >= self.EVERY_S:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.error("%s is unavailable (%s failed, %d time(s) since the last line): %s: %s",
                      self.subject, what, self.failures, type(exc).__name__, first_line)
            self.logged_at, self.failures = now, 0
        return StoreUnavailable(f"{type(exc).__name__}: the database could not be used")


class Store(Protocol):
    name: str
    lost_events: Callable[[str], Log | None] | None  # see live.LiveLog.events


    def begin_turn(
        self,
        conversation_id: str | None,
        message_id: str,
        prompt: str,
        system: str | None,
        model: str,
        history: tuple[dict, ...] = (),
        owner: str = "",
        max_streams: int | None = None,
        worker: str = "",
        keep: bool = True,
        tool_results: tuple[dict, ...] = (),
        request: dict | None = None,
    ) -> tuple[str, list[dict]]:
        """Record the user's message (or the `tool_results`, `{"role": "tool", "tool_call_id",
        "content"}` messages, when the turn's input is those; UnknownToolCall when one answers a
        call that the last answer did not make) and a `streaming` placeholder for the answer, leased to
        `worker`; return the conversation id (a new one when None) and the messages to send:
        system first, then the earlier turns as `{"role", "content"}` dicts, then this prompt.
        `history` (earlier messages the client sent itself) starts a new conversation with those
        turns, unless they are exactly a stored conversation of the owner's (same system prompt,
        same turns): this is then its next turn; or they are that conversation but for its failed
        last turn, whose prompt was this one: this retry then replaces that turn. Without `keep`,
        a new conversation is made, and deleted when the answer ends (or its worker is lost).
        `request` (what the request said of itself that an API echoes) is kept with the answer.
        Only the `owner`'s conversations are seen; ConversationBusy while an answer streams in the
        conversation; TooManyStreams when the owner already has `max_streams` answers streaming
        with a live lease (on every worker and host: the rows are the count)."""

    def end_turn(self, message_id: str, status: str, log: Log, error_code: str | None) -> None:
        """Complete the assistant's row from the answer's event log (or delete the conversation,
        when it was begun without `keep`)."""

    def checkpoint(self, worker: str, answers: dict[str, Log | None]) -> None:
        """Renew the leases of `worker`'s answers and save the event log of those whose value is
        not None (the others have not changed since the last one), in one transaction."""

    def stop_requests(self, worker: str) -> list[str]:
        """The ids of `worker`'s answers whose stop was requested (`request_stop`)."""

    def reap(self) -> list[str]:
        """Save every streaming turn whose lease ran out as interrupted (`worker_lost`), with its
        last checkpoint; return their message ids."""

    def streaming_turn(self, conversation_id: str, owner: str = "") -> str | None:
        """The message id of the answer streaming in the owner's conversation, if any."""

    def request_stop(self, message_id: str) -> None:
        """Ask the worker that produces the answer to stop it (it asks every second)."""

    def check(self, worker: str) -> None:
        """A write and a read, for /healthz: StoreUnavailable when either fails."""

    def message(self, message_id: str, owner: str = "") -> dict | None:
        """The message's row, with `events`: the event log so far (its last checkpoint while it
        streams)."""

    def conversation(self, conversation_id: str, owner: str = "") -> dict | None: ...

    def conversations(self, limit: int, before: float | None, owner: str = "") -> list[dict]: ...

    def delete(self, conversation_id: str, owner: str = "") -> bool:
        """Remove the conversation; False when the owner has none of that id, ConversationBusy
        while an answer in it is streaming (on whichever worker: it would be lost on its end)."""


def open_store(settings: Settings, instance_path: str) -> Store:
    """PostgreSQL for a `postgres://` or `postgresql://` DATABASE_URL, SQLite otherwise."""
    if settings.database_url.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresStore

        return PostgresStore(settings)
    from .sqlite import SQLiteStore

    return SQLiteStore.from_url(settings, instance_path)
