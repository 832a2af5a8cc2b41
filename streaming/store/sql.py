"""The queries that SQLite and PostgreSQL share: one `SQLStore`, whose subclasses say only how to
open a transaction and how to migrate their schema.

The SQL is written once, with `?` placeholders and the same table and column names on both
(PostgreSQL's `messages.rowid` is a column named after SQLite's implicit one), so that the two
stores cannot drift apart. Every row is read by column name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from ..config import Settings
from ..tool_calls import message_calls, unknown_call
from . import WORKER_LOST, ConversationBusy, ConversationNotFound, Log, TooManyStreams, UnknownToolCall, new_id

LOST_MESSAGE = "the worker producing this answer stopped before the answer was complete"


# a Log as stored: JSON (plain values the service built: no cycles to look for)
encode_log = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


# `json.dumps(..., ensure_ascii=False, sort_keys=True)` exactly (the stored digests depend on it),
# without the encoder that it makes anew on every call.
_encode_step = json.JSONEncoder(ensure_ascii=False, sort_keys=True, check_circular=False).encode
quoted = json.encoder.encode_basestring  # how that encoder writes a string (its C function)


def load_log(stored: str | None) -> Log:
    return json.loads(stored) if stored else []


def decode_events(stored: str | None) -> list[dict]:
    """A stored log as the events that readers get."""
    return [{"type": "delta", "text": e} if type(e) is str else e for e in load_log(stored)]


def text_of(log: Log) -> str:
    """The answer's text; when the model refused (and wrote none), its refusal."""
    text = "".join([e for e in log if type(e) is str])
    return text or "".join([e["text"] for e in log if type(e) is dict and e["type"] == "refusal"])


def chain(digest: str | None, role: str, content: str, tool_calls: list | None = None,
          tool_call_id: str | None = None) -> str:
    """The digest of a conversation's history one message on (see `history_digest`); a message's
    tool calls, or the call a tool's result answers, count too."""
    if tool_calls or tool_call_id:
        text = _encode_step([digest, role, content, tool_calls or None, tool_call_id])
    elif type(content) is not str:
        text = _encode_step([digest, role, content])
    else:  # the encoder's text for three strings (or null and two), written without its walk of the list
        text = f"[{'null' if digest is None else quoted(digest)}, {quoted(role)}, {quoted(content)}]"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def step(digest: str | None, message: dict) -> str:
    return chain(digest, message["role"], message["content"], message.get("tool_calls"), message.get("tool_call_id"))


def turn_input(prompt: str, tool_results: tuple[dict, ...]) -> list[dict]:
    """A turn's input as messages: the tools' results, or else the user's prompt."""
    return list(tool_results) or [{"role": "user", "content": prompt}]


def stored_message(row) -> dict:
    """A message row as the conversation's message: `{"role", "content"}`, with `tool_calls`
    (an assistant's) or `tool_call_id` (a tool's result) where it has them."""
    message = {"role": row["role"], "content": row["content"]}
    if row["tool_calls"]:
        message["tool_calls"] = json.loads(row["tool_calls"])
    if row["tool_call_id"] is not None:
        message["tool_call_id"] = row["tool_call_id"]
    return message


def message_row(message: dict) -> tuple[str, str, str | None, str | None]:
    """(role, content, tool_calls, tool_call_id): a message's columns."""
    calls = message.get("tool_calls")
    return message["role"], message["content"], calls and encode_log(calls), message.get("tool_call_id")


def upstream_messages(messages: list[dict]) -> list[dict]:
    """The messages as OpenAI's API takes them: an assistant's that only called tools has null
    content, and the calls no result answers (a turn that was cut short, or whose client asked
    something else instead) are left out, since an upstream refuses calls without their results."""
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    sent = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [c for c in message["tool_calls"] if c["id"] in answered]}
            if not message["tool_calls"]:
                del message["tool_calls"]
            elif not message["content"]:
                message["content"] = None
        sent.append(message)
    return sent


def history_digest(system: str | None, messages: list[dict] | tuple[dict, ...]) -> str:
    """What identifies a conversation's history: its system prompt and its messages in order.

    A conversation's `history_hash` is the digest of its messages once its last turn is complete
    (what a client sends as the earlier messages of its next turn), and the digest through the
    last prompt while that turn streams or after it failed (what a retry of it sends, prompt
    included). Each turn moves it on by one or two steps of `chain`, from the previous value."""
    return moved_on(system_digest(system or ""), messages)


@functools.lru_cache(maxsize=64)
def system_digest(system: str) -> str:
    """The digest of a history before its first message: the same for nearly every conversation."""
    return chain(None, "system", system)


def moved_on(digest: str, messages: list[dict] | tuple[dict, ...]) -> str:
    """The digest of a history `messages` further on."""
    for message in messages:
        digest = step(digest, message)
    return digest


class SQLStore:
    name = "sql"
    # What the live log knows of a dead worker's answer, beyond its last checkpoint (`live`).
    lost_events: Callable[[str], Log | None] | None = None
    # Appended to the read of the conversation that a turn begins in, so that two turns begun
    # together in it wait for each other (PostgreSQL's row lock; SQLite's transactions take turns).
    FOR_UPDATE = ""

    def __init__(self, settings: Settings) -> None:
        self.history_chars = settings.history_chars
        self.lease_s = settings.lease_s
        # message id -> (conversation id, its history_hash, keep) of each turn begun here and not
        # yet ended: a turn ends in the process that began it, so its end reads nothing first.
        self._turns: dict[str, tuple[str, str, bool]] = {}

    def transaction(self) -> AbstractContextManager:
        """A connection for one short transaction, committed on success, with `execute(sql, params)`
        (returning a cursor) and `executemany(sql, rows)`; StoreUnavailable when the database
        cannot be used."""
        raise NotImplementedError

    def autocommit(self) -> AbstractContextManager:
        """A connection as `transaction`'s, on which each statement may be a transaction of its own
        (for reads, which see a snapshot per statement in a READ COMMITTED transaction anyway, and
        single writes): outside PostgreSQL's group commit, so that a read never waits for a group."""
        return self.transaction()

    # -- turns ----------------------------------------------------------------------------

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
        now = time.time()
        inputs = turn_input(prompt, tool_results)
        columns, echo = [message_row(m) for m in inputs], request and encode_log(request)  # (before any write)
        with self.transaction() as db:
            if max_streams is not None:
                streaming = db.execute(  # counts no further than the limit, and no dead worker's turn
                    "SELECT count(*) AS n FROM (SELECT 1 FROM messages"
                    " WHERE status = 'streaming' AND owner = ? AND lease_until >= ? LIMIT ?) AS live",
                    (owner, now, max_streams),
                ).fetchone()["n"]
                if streaming >= max_streams:
                    raise TooManyStreams(owner)
            retry, digest = False, None  # (the digest of the history through this turn's input)
            if conversation_id is None:
                following = history_digest(system, history)
                digest = moved_on(following, inputs)
                if history and keep:
                    conversation_id, retry = self._stored_as(db, now, owner, following, digest)
            if conversation_id is None:
                conversation_id, earlier = new_id(), list(history)
                self._check_calls(earlier, inputs)
                stored = [(new_id(), conversation_id, owner, *message_row(m), now) for m in history]
                db.execute(
                    "INSERT INTO conversations (id, system, owner, created_at, updated_at, history_hash, keep)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, system, owner, now, now, digest, int(keep)),
                )
                if stored:
                    db.executemany(
                        "INSERT INTO messages (id, conversation_id, owner, role, content, tool_calls, tool_call_id,"
                        " status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'complete', ?)",
                        stored,
                    )
            else:
                row = db.execute(
                    "SELECT system FROM conversations WHERE id = ? AND owner = ?" + self.FOR_UPDATE,
                    (conversation_id, owner),
                ).fetchone()
                if row is None:
                    raise ConversationNotFound(conversation_id)
                self._reap(db, now, conversation_id)
                rows = db.execute(
                    "SELECT id, role, content, tool_calls, tool_call_id, status FROM messages"
                    " WHERE conversation_id = ? ORDER BY created_at, rowid",
                    (conversation_id,),
                ).fetchall()
                if any(r["status"] == "streaming" for r in rows):
                    raise ConversationBusy(conversation_id)
                gone = rows[-len(inputs) - 1:] if retry else []  # a retry's failed last turn: its input, its answer
                earlier = [stored_message(r) for r in rows[:len(rows) - len(gone)]]
                self._check_calls(earlier, inputs)
                if gone:  # ... goes: its retry takes its place
                    db.executemany("DELETE FROM messages WHERE id = ?", [(r["id"],) for r in gone])
                if digest is None:  # (a conversation found by its history has the history's own)
                    digest = history_digest(row["system"], [*earlier, *inputs])
                db.execute(
                    "UPDATE conversations SET updated_at = ?, history_hash = ? WHERE id = ?",
                    (now, digest, conversation_id),
                )
                system = system if system is not None else row["system"]
            db.executemany(
                "INSERT INTO messages (id, conversation_id, owner, role, content, tool_calls, tool_call_id, status,"
                " model, worker, lease_until, created_at, request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    *[(new_id(), conversation_id, owner, *c, "complete", None, None, None, now, None) for c in columns],
                    (message_id, conversation_id, owner, "assistant", "", None, None, "streaming", model, worker,
                     now + self.lease_s, now, echo),
                ],
            )
        self._turns[message_id] = (conversation_id, digest, keep)
        messages = upstream_messages(self.trim(earlier) + inputs)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return conversation_id, messages

    @staticmethod
    def _check_calls(earlier: list[dict], inputs: list[dict]) -> None:
        """UnknownToolCall when a tool result of `inputs` answers a call that the last answer did
        not make (before the turn writes anything: see `Refused`)."""
        unknown = unknown_call([*earlier, *inputs], len(earlier))
        if unknown is not None:
            raise UnknownToolCall(unknown - len(earlier), inputs[unknown - len(earlier)]["tool_call_id"])

    def _stored_as(self, db, now: float, owner: str, following: str, retried: str) -> tuple[str | None, bool]:
        """The owner's conversation that the request's earlier messages are (`following`, their
        `history_digest`; `retried`, the same through this turn's input), and whether the
        request retries its last turn: (id, False) when they are exactly its messages and its last
        turn is complete; (id, True) when they are its messages but for its last turn, which
        failed (or was cut short), and that turn's input (prompt or tool results) was this one;
        (None, False) otherwise.
        ConversationBusy while the turn it would retry is streaming."""
        row = db.execute(  # (`+updated_at`: SQLite looks it up by its hash, not through every conversation of
            # the owner in the order of conversations_by_owner, which its planner would pick for the ORDER BY)
            "SELECT id, history_hash FROM conversations WHERE owner = ? AND history_hash IN (?, ?)"
            " ORDER BY +updated_at DESC LIMIT 1" + self.FOR_UPDATE,
            (owner, following, retried),
        ).fetchone()
        if row is None:
            return None, False
        self._reap(db, now, row["id"])
        last = db.execute(
            "SELECT status FROM messages WHERE conversation_id = ? AND role = 'assistant'"
            " ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (row["id"],),
        ).fetchone()
        if last["status"] == "streaming":
            raise ConversationBusy(row["id"])
        retry = row["history_hash"] == retried
        if retry == (last["status"] == "complete"):  # its history only looks like the request's
            return None, False
        return row["id"], retry

    def trim(self, history: list[dict]) -> list[dict]:
        """The newest turns that fit in the history budget (counted in characters); never a tool's
        result without the call it answers, which an upstream would refuse."""
        budget, kept = self.history_chars, []
        for message in reversed(history):
            budget -= len(message["content"])
            if budget < 0:
                break
            kept.append(message)
        while kept and kept[-1]["role"] == "tool":
            kept.pop()
        return kept[::-1]

    def end_turn(self, message_id: str, status: str, log: Log, error_code: str | None) -> None:
        done = log[-1] if log and type(log[-1]) is dict and log[-1]["type"] == "done" else {}
        with self.transaction() as db:
            known = self._turns.get(message_id)
            if known is None:  # begun by another process (its turns are all in `_turns` otherwise)
                row = db.execute(
                    "SELECT c.id, c.history_hash, c.keep FROM conversations c"
                    " JOIN messages m ON m.conversation_id = c.id WHERE m.id = ?",
                    (message_id,),
                ).fetchone()
                if row is None:  # deleted meanwhile (its turn had been saved as worker_lost)
                    return
                known = row["id"], row["history_hash"], bool(row["keep"])
            conversation_id, digest, keep = known
            # The conversation's row before the message's, in the order that begin_turn takes them
            # (no deadlock between the two on PostgreSQL). A conversation deleted meanwhile (its
            # turn had been saved as worker_lost) has neither row: nothing is written.
            if not keep:
                db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            else:
                text, calls = text_of(log), message_calls(log)
                if status == "complete":  # its history now ends with this answer (unless a turn came after)
                    db.execute(
                        "UPDATE conversations SET history_hash = ? WHERE id = ? AND history_hash = ?",
                        (chain(digest, "assistant", text, calls), conversation_id, digest),
                    )
                db.execute(
                    "UPDATE messages SET content = ?, tool_calls = ?, status = ?, error_code = ?, usage = ?,"
                    " finish_reason = ?, ttft_ms = ?, duration_ms = ?, events = ?, finished_at = ? WHERE id = ?",
                    (
                        text,
                        encode_log(calls) if calls else None,
                        status,
                        error_code,
                        encode_log(done["usage"]) if "usage" in done else None,
                        done.get("finish_reason"),
                        done.get("ttft_ms"),
                        done.get("duration_ms"),
                        encode_log(log),
                        time.time(),
                        message_id,
                    ),
                )
        self._turns.pop(message_id, None)

    # -- leases ---------------------------------------------------------------------------

    def checkpoint(self, worker: str, answers: dict[str, Log | None]) -> None:
        until = time.time() + self.lease_s
        logs = [(until, text_of(log), encode_log(log), m) for m, log in answers.items() if log is not None]
        leases = [(until, m) for m, e in answers.items() if e is None]
        with self.transaction() as db:
            if logs:
                db.executemany(
                    "UPDATE messages SET lease_until = ?, content = ?, events = ?"
                    " WHERE id = ? AND status = 'streaming'",
                    logs,
                )
            if leases:
                db.executemany("UPDATE messages SET lease_until = ? WHERE id = ? AND status = 'streaming'", leases)

    def stop_requests(self, worker: str) -> list[str]:
        with self.autocommit() as db:
            rows = db.execute(
                "SELECT id FROM messages WHERE worker = ? AND status = 'streaming' AND stop_requested_at IS NOT NULL",
                (worker,),
            ).fetchall()
        return [row["id"] for row in rows]

    def reap(self) -> list[str]:
        with self.transaction() as db:
            return self._reap(db, time.time())

    def _reap(self, db, now: float, conversation_id: str | None = None) -> list[str]:
        """Save the streaming turns whose lease ran out (of one conversation, or all) as
        interrupted, from their last checkpoint; a worker that reaps the same turn at the same
        moment finds it no longer streaming and leaves it."""
        where, params = ("AND conversation_id = ?", (now, conversation_id)) if conversation_id else ("", (now,))
        rows = db.execute(
            "SELECT id, conversation_id, model, events FROM messages"
            f" WHERE status = 'streaming' AND lease_until < ? {where}",
            params,
        ).fetchall()
        reaped = []
        for row in rows:
            log = (self.lost_events and self.lost_events(row["id"])) or load_log(row["events"]) or [
                {"type": "start", "conversation_id": row["conversation_id"], "message_id": row["id"],
                 "model": row["model"]},
            ]
            log.append({"type": "error", "error": {"code": WORKER_LOST, "message": LOST_MESSAGE}})
            calls = message_calls(log)
            updated = db.execute(  # (RETURNING, not rowcount: see PostgresStore.transaction)
                "UPDATE messages SET status = 'interrupted', error_code = ?, content = ?, tool_calls = ?, events = ?,"
                " finished_at = ? WHERE id = ? AND status = 'streaming' RETURNING id",
                (WORKER_LOST, text_of(log), encode_log(calls) if calls else None, encode_log(log), now, row["id"]),
            ).fetchone()
            if updated:
                reaped.append(row["id"])
                db.execute("DELETE FROM conversations WHERE id = ? AND keep = 0", (row["conversation_id"],))
        return reaped

    def streaming_turn(self, conversation_id: str, owner: str = "") -> str | None:
        with self.autocommit() as db:
            row = db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND owner = ? AND status = 'streaming'",
                (conversation_id, owner),
            ).fetchone()
        return row and row["id"]

    def request_stop(self, message_id: str) -> None:
        with self.autocommit() as db:
            db.execute(
                "UPDATE messages SET stop_requested_at = ? WHERE id = ? AND status = 'streaming'",
                (time.time(), message_id),
            )

    def check(self, worker: str) -> None:
        with self.autocommit() as db:
            db.execute(
                "INSERT INTO health (worker, checked_at) VALUES (?, ?)"
                " ON CONFLICT (worker) DO UPDATE SET checked_at = excluded.checked_at",
                (worker, time.time()),
            )

    # -- reading --------------------------------------------------------------------------

    def message(self, message_id: str, owner: str = "") -> dict | None:
        with self.autocommit() as db:
            row = db.execute("SELECT * FROM messages WHERE id = ? AND owner = ?", (message_id, owner)).fetchone()
        if row is None:
            return None
        request = row["request"] and json.loads(row["request"])
        return {**dict(row), "events": decode_events(row["events"]), "request": request}

    def conversation(self, conversation_id: str, owner: str = "") -> dict | None:
        with self.autocommit() as db:
            row = db.execute(
                "SELECT id, system, owner, created_at, updated_at FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
            if row is None:
                return None
            turns = db.execute(
                "SELECT id, role, content, tool_calls, tool_call_id, status, error_code, model, usage, finish_reason,"
                " ttft_ms, duration_ms, created_at, finished_at FROM messages WHERE conversation_id = ?"
                " ORDER BY created_at, rowid",
                (conversation_id,),
            ).fetchall()
        messages = []
        for turn in turns:
            message = dict(turn)
            message["usage"] = json.loads(message["usage"]) if message["usage"] else None
            message["tool_calls"] = json.loads(message["tool_calls"]) if message["tool_calls"] else None
            messages.append(message)
        return {**dict(row), "messages": messages}

    def conversations(self, limit: int, before: float | None, owner: str = "") -> list[dict]:
        with self.autocommit() as db:
            rows = db.execute(
                "SELECT c.id, c.system, c.owner, c.created_at, c.updated_at,"
                " (SELECT content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user'"
                " ORDER BY created_at, rowid LIMIT 1) AS title FROM conversations c"
                " WHERE c.owner = ? AND c.updated_at < ? ORDER BY c.updated_at DESC LIMIT ?",
                (owner, before if before is not None else float("inf"), limit),
            ).fetchall()
        return [dict(r) for r in rows]

    def delete(self, conversation_id: str, owner: str = "") -> bool:
        with self.transaction() as db:
            self._reap(db, time.time(), conversation_id)
            if db.execute(
                "SELECT 1 AS busy FROM messages WHERE conversation_id = ? AND owner = ? AND status = 'streaming'",
                (conversation_id, owner),
            ).fetchone():
                raise ConversationBusy(conversation_id)
            return db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ? RETURNING id", (conversation_id, owner)
            ).fetchone() is not None

