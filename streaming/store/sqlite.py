"""Conversations as rows in a SQLite file anyone can inspect (`sqlite3 instance/streaming.db`).

Several gunicorn workers share the file: WAL mode, a busy timeout and short transactions.
Tokens are never written one by one: the answer's row is checkpointed every few seconds with
the leases (see `lease.py`) and written when it ends.

Each process keeps one connection, and its threads (or greenlets) take turns on it: a
transaction here lasts a fraction of a millisecond, and under gevent SQLite blocks the whole
worker anyway. Opening and closing a connection per operation cost far more: closing the last
connection checkpoints the log every time. Commits do not wait for the disk
(`synchronous = NORMAL`, safe in WAL mode: a crash of the process loses nothing, a power cut at
most the last turns, and the file is never corrupted).

The log is copied into the database file by a checkpoint in a real thread, instead of by
whichever commit crosses 1,000 pages (SQLite's default): that commit took milliseconds, in the
middle of a request, and under gevent it stalled every stream of the worker meanwhile. Copying
is not enough under a steady load: the log starts again from its beginning only once a
checkpoint has copied all of it, which never happens while every millisecond brings a commit,
so the log grew without end (300 MB after 6,000 one-token answers), and every transaction got
slower as it grew. Past `RESTART_FRAMES` the checkpoint restarts the log, holding off writers
for the moment it takes; a writer waits for that (or for another worker's transaction) by
sleeping, which under gevent lets the worker's other requests and streams run, instead of in
SQLite's busy handler, which would stall them all. See docs/performance.md for the figures.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Settings
from ..threads import in_real_thread, start_thread
from . import FailureLog, Refused, StoreUnavailable
from .sql import SQLStore

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
    # version 5: leases (see store/__init__.py) replace "stale after MAX_STREAM_S + 60 s"; a turn
    # streaming when the file was upgraded keeps that much time; /healthz writes its own row
    """
    ALTER TABLE messages ADD COLUMN worker TEXT;
    ALTER TABLE messages ADD COLUMN lease_until REAL;
    ALTER TABLE messages ADD COLUMN stop_requested_at REAL;
    UPDATE messages SET lease_until = created_at + 660 WHERE status = 'streaming';
    CREATE INDEX messages_leases ON messages (lease_until) WHERE status = 'streaming';
    CREATE INDEX messages_streaming_by_worker ON messages (worker) WHERE status = 'streaming';
    CREATE TABLE health (worker TEXT PRIMARY KEY, checked_at REAL NOT NULL);
    """,
    # version 6: a /v1 request whose earlier messages are a stored conversation continues it
    # (sql.history_digest; conversations stored before have none and are not found that way);
    # one whose `keep` is 0 (/v1's `store: false`) goes when its answer ends
    """
    ALTER TABLE conversations ADD COLUMN history_hash TEXT;
    CREATE INDEX conversations_by_history ON conversations (owner, history_hash);
    ALTER TABLE conversations ADD COLUMN keep INTEGER NOT NULL DEFAULT 1;
    """,
    # version 7: tool calls are messages too: an assistant's calls (JSON, OpenAI's shape) and the
    # call that a `tool` message's result answers
    """
    ALTER TABLE messages ADD COLUMN tool_calls TEXT;
    ALTER TABLE messages ADD COLUMN tool_call_id TEXT;
    """,
    # version 8: what an answer's request said of itself that an API echoes (the Responses API's
    # `tools`, `metadata`, `temperature`, ...), JSON, on the assistant's row
    """
    ALTER TABLE messages ADD COLUMN request TEXT;
    """,
    # version 9: fewer index entries a turn. The four indexes of the streaming rows become one,
    # (owner, conversation_id, lease_until), for the per-key count, a conversation's streaming
    # answer and the reap, and one of the rows whose stop was asked for, which is nearly always
    # empty; conversations_by_update goes (every listing is the owner's: conversations_by_owner)
    """
    DROP INDEX messages_streaming;
    DROP INDEX messages_streaming_by_owner;
    DROP INDEX messages_leases;
    DROP INDEX messages_streaming_by_worker;
    DROP INDEX conversations_by_update;
    CREATE INDEX messages_live ON messages (owner, conversation_id, lease_until) WHERE status = 'streaming';
    CREATE INDEX messages_stops ON messages (worker) WHERE status = 'streaming' AND stop_requested_at IS NOT NULL;
    """,
]


class _Group:
    """Transactions committed together: set `done` once committed, or failed with `error`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None


class SQLiteStore(SQLStore):
    name = "sqlite"
    CHECKPOINT_S = 0.1  # how often the log is looked at (a fraction of a millisecond when idle)
    RESTART_FRAMES = 1000  # pages in the log past which it is restarted (4 MB at SQLite's page size)
    BUSY_TIMEOUT_S = 10.0  # how long a transaction waits for the database before it is refused
    RESTART_WAIT_S = 0.1  # how long a restart waits for a writer or a reader (then: the next time)

    def __init__(self, path: str, settings: Settings) -> None:
        super().__init__(settings)
        self.path = path
        self.migrate()
        self.failures = FailureLog()
        self._lock = threading.Lock()
        self._group: _Group | None = None  # the transaction open for the turns that come together
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
            raise ValueError("DATABASE_URL must be sqlite:///<path>, postgres://... (or unset for the default file)")
        return cls(path, settings)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The process's connection for one short transaction, committed on success. A full disk,
        a read-only file or a lock held too long is StoreUnavailable.

        Transactions that come together are committed together (group commit): the first one
        begins, gives the others that are ready a turn (`sleep(0)`: one round of the gevent hub)
        and commits them all with its own; each returns once the commit it is in has happened. A
        commit's cost is mostly the pages it writes to the log, and the turns that begin together
        share theirs (see docs/performance.md). One that joins and fails takes nothing of the
        others with it when it wrote nothing, or was refused (`Refused`: it wrote nothing that
        needs undoing); one that fails otherwise after it wrote (a fault, a full disk) cannot be
        undone alone, without the savepoint each would need (a tenth of a turn's cost in the
        store): the whole group fails, StoreUnavailable for each."""
        leader = False
        try:
            with self._lock:
                db = self._connection()
                group = self._group
                if group is None:
                    try:
                        self._begin(db)
                    except sqlite3.OperationalError as exc:
                        raise self.failures.failed("BEGIN", exc) from None
                    group = self._group = _Group()
                    leader = True
                changes = db.total_changes
                try:
                    yield db
                except BaseException as exc:
                    failure = self.failures.failed("a transaction", exc) if isinstance(exc, sqlite3.Error) else None
                    if leader and db.in_transaction:  # none has joined yet: undo it all, the group is over
                        db.execute("ROLLBACK")
                        self._group = None
                    elif not db.in_transaction or not (isinstance(exc, Refused) or db.total_changes == changes):
                        # SQLite rolled the whole transaction back (a full disk, say), or this one wrote
                        # what cannot be undone alone: all of the group fails
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        group.error = failure or StoreUnavailable("the transaction was rolled back")
                        self._group = None
                    if failure is not None:
                        raise failure from None
                    raise
        finally:
            if leader:
                self._commit(group)
        group.done.wait()
        if group.error is not None:
            raise StoreUnavailable(str(group.error))

    def _commit(self, group: _Group) -> None:
        time.sleep(0)  # the others that are ready join the group
        with self._lock:
            if self._group is group:
                self._group = None
                try:
                    self._db.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    group.error = self.failures.failed("COMMIT", exc)
            group.done.set()

    def _begin(self, db: sqlite3.Connection) -> None:
        """Take the database's write lock, sleeping while another holds it (see the module's doc)."""
        deadline, pause = time.monotonic() + self.BUSY_TIMEOUT_S, 0.0005
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # opened lazily, and again in a forked child
            # No busy timeout: `_begin` waits instead, the only statement that waits for a lock
            # in WAL mode.
            self._db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint = 0")  # see checkpoints()
            self._pid = os.getpid()
            start_thread(self.checkpoints, "sqlite-checkpoints")
        return self._db

    def checkpoints(self) -> None:
        """Copy the log into the database file every `CHECKPOINT_S`, for as long as the process
        lives, and restart it once it is long. PASSIVE never waits for, nor blocks, the workers'
        reads and writes; RESTART waits for the writer of the moment, then holds off the others
        while it copies what is left, waits for the readers of the old log (a reader holding a
        transaction open, say in the `sqlite3` shell, makes it give up) and starts the log again."""
        db = sqlite3.connect(self.path, timeout=self.RESTART_WAIT_S, isolation_level=None, check_same_thread=False)

        def checkpoint(mode: str) -> int:
            return db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[1]  # the pages in the log

        while True:
            time.sleep(self.CHECKPOINT_S)
            try:
                if in_real_thread(checkpoint, "PASSIVE") > self.RESTART_FRAMES:
                    with self._lock:  # this process's transactions wait their turn, not race it for the lock
                        if self._group is None:  # (one open now holds the lock the restart needs)
                            in_real_thread(checkpoint, "RESTART")
            except sqlite3.Error as exc:
                self.failures.failed("checkpointing the log", exc)

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
