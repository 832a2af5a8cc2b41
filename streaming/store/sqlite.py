"""Conversations as rows in a SQLite file anyone can inspect (`sqlite3 instance/streaming.db`).

Several gunicorn workers share the file: WAL mode, a busy timeout and short transactions.
Tokens are never written one by one: the answer's row is written when it ends.

Each process keeps one connection, and its threads (or greenlets) take turns on it: a
transaction here lasts a fraction of a millisecond, and under gevent SQLite blocks the whole
worker anyway. Opening and closing a connection per operation cost far more: closing the last
connection checkpoints the log every time. Commits do not wait for the disk
(`synchronous = NORMAL`, safe in WAL mode: a crash of the process loses nothing, a power cut at
most the last turns, and the file is never corrupted). The log is copied into the database file
by a checkpoint every second, in a real thread, instead of by whichever commit crosses 1,000
pages (SQLite's default): that commit took milliseconds, in the middle of a request, and under
gevent it stalled every stream of the worker meanwhile. See docs/performance.md for the figures.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Settings
from ..threads import in_real_thread, start_thread
from . import ConversationBusy, ConversationNotFound, TooManyStreams

log = logging.getLogger(__name__)

SCHEMA = [
    # version 1
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        system TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,               -- user | assistant
        content TEXT NOT NULL,
        status TEXT NOT NULL,             -- complete | streaming | error | interrupted
        error_code TEXT,
        model TEXT,
        usage TEXT,                       -- JSON {prompt_tokens, completion_tokens}
        finish_reason TEXT,
        ttft_ms INTEGER,
        duration_ms INTEGER,
        events TEXT,                      -- JSON event log, for Last-Event-ID replay (a delta as its text)
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, created_at);
    CREATE INDEX conversations_by_update ON conversations (updated_at);
    """,
    # version 2: conversations belong to the API key that made them ('' when the service is open)
    """
    ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at);
    """,
    # version 3: the per-key stream count reads only the rows that are streaming
    """
    CREATE INDEX messages_streaming ON messages (conversation_id) WHERE status = 'streaming';
    """,
    # version 4: a message carries its conversation's owner, so that the per-key stream count is
    # one range of an index of the streaming rows (it joined every streaming row to its conversation)
    """
    ALTER TABLE messages ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    UPDATE messages SET owner = (SELECT owner FROM conversations c WHERE c.id = messages.conversation_id);
    CREATE INDEX messages_streaming_by_owner ON messages (owner, created_at) WHERE status = 'streaming';
    """,
]


class SQLiteStore:
    CHECKPOINT_S = 1.0

    def __init__(self, path: str, settings: Settings) -> None:
        self.path = path
        self.history_chars = settings.history_chars
        # A `streaming` row older than the longest possible stream belongs to a dead process.
        self.stale_after_s = settings.max_stream_s + 60
        self.migrate()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    @classmethod
    def from_url(cls, settings: Settings, instance_path: str) -> SQLiteStore:
        url = settings.database_url
        if not url:
            os.makedirs(instance_path, exist_ok=True)
            path = os.path.join(instance_path, "streaming.db")
        elif url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
        else:
            raise ValueError("DATABASE_URL must be sqlite:///<path> (or unset for the default file)")
        return cls(path, settings)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """The process's connection for one short transaction, committed on success."""
        with self._lock:
            if self._pid != os.getpid():  # opened lazily, and again in a forked child
                self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
                self._db.row_factory = sqlite3.Row
                self._db.execute("PRAGMA foreign_keys = ON")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute("PRAGMA wal_autocheckpoint = 0")  # see checkpoints()
                self._pid = os.getpid()
                start_thread(self.checkpoints, "sqlite-checkpoints")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def checkpoints(self) -> None:
        """Copy the log into the database file every `CHECKPOINT_S`, for as long as the process
        lives. PASSIVE never waits for, nor blocks, the workers' reads and writes."""
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        while True:
            time.sleep(self.CHECKPOINT_S)
            try:
                in_real_thread(db.execute, "PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                log.exception("checkpointing the SQLite log failed; trying again")

    def migrate(self) -> None:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(SCHEMA[version:], version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        finally:
            db.close()

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
        now = time.time()
        with self.connect() as db:
            if max_streams is not None:
                streaming = db.execute(  # counts no further than the limit
                    "SELECT count(*) FROM (SELECT 1 FROM messages"
                    " WHERE status = 'streaming' AND owner = ? AND created_at >= ? LIMIT ?)",
                    (owner, now - self.stale_after_s, max_streams),
                ).fetchone()[0]
                if streaming >= max_streams:
                    raise TooManyStreams(owner)
            if conversation_id is None:
                conversation_id = uuid.uuid4().hex
                db.execute(
                    "INSERT INTO conversations (id, system, owner, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (conversation_id, system, owner, now, now),
                )
                db.executemany(
                    "INSERT INTO messages (id, conversation_id, owner, role, content, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?, 'complete', ?)",
                    [(uuid.uuid4().hex, conversation_id, owner, m["role"], m["content"], now) for m in history],
                )
                earlier = [{"role": m["role"], "content": m["content"]} for m in history]
            else:
                row = db.execute(
                    "SELECT system FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
                ).fetchone()
                if row is None:
                    raise ConversationNotFound(conversation_id)
                system = system if system is not None else row["system"]
                db.execute(
                    "UPDATE messages SET status = 'interrupted', error_code = 'lost', finished_at = ?"
                    " WHERE conversation_id = ? AND status = 'streaming' AND created_at < ?",
                    (now, conversation_id, now - self.stale_after_s),
                )
                if db.execute(
                    "SELECT 1 FROM messages WHERE conversation_id = ? AND status = 'streaming'", (conversation_id,)
                ).fetchone():
                    raise ConversationBusy(conversation_id)
                earlier = [
                    {"role": r["role"], "content": r["content"]}
                    for r in db.execute(
                        "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid",
                        (conversation_id,),
                    )
                ]
                db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            db.executemany(
                "INSERT INTO messages (id, conversation_id, owner, role, content, status, model, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (uuid.uuid4().hex, conversation_id, owner, "user", prompt, "complete", None, now),
                    (message_id, conversation_id, owner, "assistant", "", "streaming", model, now),
                ],
            )
        messages = self.trim(earlier) + [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return conversation_id, messages

    def trim(self, history: list[dict]) -> list[dict]:
        """The newest turns that fit in the history budget (counted in characters)."""
        budget, kept = self.history_chars, []
        for message in reversed(history):
            budget -= len(message["content"])
            if budget < 0:
                break
            kept.append(message)
        return kept[::-1]

    def end_turn(self, message_id: str, status: str, events: list[dict], error_code: str | None) -> None:
        done = next((e for e in events if e["type"] == "done"), {})
        with self.connect() as db:
            db.execute(
                "UPDATE messages SET content = ?, status = ?, error_code = ?, usage = ?, finish_reason = ?,"
                " ttft_ms = ?, duration_ms = ?, events = ?, finished_at = ? WHERE id = ?",
                (
                    "".join(e["text"] for e in events if e["type"] == "delta"),
                    status,
                    error_code,
                    json.dumps(done["usage"]) if "usage" in done else None,
                    done.get("finish_reason"),
                    done.get("ttft_ms"),
                    done.get("duration_ms"),
                    json.dumps([e["text"] if e["type"] == "delta" else e for e in events], ensure_ascii=False),
                    time.time(),
                    message_id,
                ),
            )

    def message(self, message_id: str, owner: str = "") -> dict | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM messages WHERE id = ? AND owner = ?", (message_id, owner)).fetchone()
        if row is None:
            return None
        events = json.loads(row["events"]) if row["events"] else []
        return {**dict(row), "events": [{"type": "delta", "text": e} if type(e) is str else e for e in events]}

    def conversation(self, conversation_id: str, owner: str = "") -> dict | None:
        with self.connect() as db:
            row = db.execute(
                "SELECT * FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            ).fetchone()
            if row is None:
                return None
            turns = db.execute(
                "SELECT id, role, content, status, error_code, model, usage, finish_reason, ttft_ms,"
                " duration_ms, created_at, finished_at FROM messages WHERE conversation_id = ?"
                " ORDER BY created_at, rowid",
                (conversation_id,),
            ).fetchall()
        messages = []
        for turn in turns:
            message = dict(turn)
            message["usage"] = json.loads(message["usage"]) if message["usage"] else None
            messages.append(message)
        return {**dict(row), "messages": messages}

    def conversations(self, limit: int, before: float | None, owner: str = "") -> list[dict]:
        with self.connect() as db:
            rows = db.execute(
                "SELECT c.*, (SELECT content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user'"
                " ORDER BY created_at, rowid LIMIT 1) AS title FROM conversations c"
                " WHERE c.owner = ? AND c.updated_at < ? ORDER BY c.updated_at DESC LIMIT ?",
                (owner, before if before is not None else float("inf"), limit),
            ).fetchall()
        return [dict(r) for r in rows]

    def delete(self, conversation_id: str, owner: str = "") -> bool:
        with self.connect() as db:
            if db.execute(
                "SELECT 1 FROM messages WHERE conversation_id = ? AND owner = ? AND status = 'streaming'"
                " AND created_at >= ?",
                (conversation_id, owner, time.time() - self.stale_after_s),
            ).fetchone():
                raise ConversationBusy(conversation_id)
            return db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            ).rowcount > 0
