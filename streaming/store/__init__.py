"""Conversation storage behind one small interface; SQLite is the embedded default.

A turn is a user message and the assistant message that answers it. Both rows are written when
the turn begins (the assistant's with status `streaming`, which is what makes a second turn on the
same conversation a 409), and the assistant's row is completed in one short transaction when the
answer ends: `complete`, `error` or `interrupted`, with whatever text it had.
"""

from __future__ import annotations

from typing import Protocol

from ..config import Settings


class ConversationNotFound(Exception):
    pass


class ConversationBusy(Exception):
    pass


class TooManyStreams(Exception):
    pass


class Store(Protocol):
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
    ) -> tuple[str, list[dict]]:
        """Record the user's message and a `streaming` placeholder for the answer; return the
        conversation id (a new one when None) and the messages to send: system first, then the
        earlier turns as `{"role", "content"}` dicts, then this prompt. `history` (earlier
        messages the client sent itself) starts a new conversation with those turns. Only the
        `owner`'s conversations are seen; TooManyStreams when the owner already has
        `max_streams` answers streaming (across every worker: the rows are the count)."""

    def end_turn(self, message_id: str, status: str, events: list[dict], error_code: str | None) -> None:
        """Complete the assistant's row from the answer's event log."""

    def message(self, message_id: str, owner: str = "") -> dict | None:
        """The message's row, with `events`: the event log of an ended answer (empty until then)."""

    def conversation(self, conversation_id: str, owner: str = "") -> dict | None: ...

    def conversations(self, limit: int, before: float | None, owner: str = "") -> list[dict]: ...

    def delete(self, conversation_id: str, owner: str = "") -> bool:
        """Remove the conversation; False when the owner has none of that id, ConversationBusy
        while an answer in it is streaming (on whichever worker: it would be lost on its end)."""


def open_store(settings: Settings, instance_path: str) -> Store:
    from .sqlite import SQLiteStore

    return SQLiteStore.from_url(settings, instance_path)
