"""Conversations in PostgreSQL (`DATABASE_URL=postgres://...`), for several hosts at once.

The same rows as the SQLite file (`psql $DATABASE_URL -c 'table messages'`) and the same queries
(`sql.py`). psycopg 3 with a pool of `DATABASE_POOL_SIZE` connections per worker process, opened
lazily in the worker (never in gunicorn's master). psycopg waits for the server through `select`,
which gevent patches (supported from psycopg 3.1.14 on), so a slow query holds only its own
greenlet; the pool's own threads are greenlets there too.

A server that is down or unreachable is StoreUnavailable within `TIMEOUT_S` (connecting, waiting
for a pooled connection, or a statement), never a hang; the pool reconnects by itself once it is
back. The schema is migrated by the first transaction of each process, under an advisory lock,
so that workers and hosts starting at the same moment apply each version once; a server that is
down at boot delays the migration, not the boot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Settings
from . import FailureLog
from .sql import SQLStore

SCHEMA = [
    # version 1: what SQLite's file reached in its version 5
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        system TEXT,
        owner TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE messages (
        rowid BIGINT GENERATED ALWAYS AS IDENTITY,  -- named as SQLite's: the order of a turn's rows
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        owner TEXT NOT NULL DEFAULT '',
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
        worker TEXT,                      -- host:pid:nonce of the process producing a streaming answer
        lease_until DOUBLE PRECISION,     -- ... which vouches for it until then
        stop_requested_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, created_at);
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at);
    CREATE INDEX messages_streaming_by_owner ON messages (owner, created_at) WHERE status = 'streaming';
    CREATE INDEX messages_leases ON messages (lease_until) WHERE status = 'streaming';
    CREATE INDEX messages_streaming_by_worker ON messages (worker) WHERE status = 'streaming';
    CREATE TABLE health (worker TEXT PRIMARY KEY, checked_at DOUBLE PRECISION NOT NULL);
    """,
    # version 2: SQLite's version 6 (a /v1 request whose earlier messages are a stored
    # conversation continues it; one whose `keep` is 0 goes when its answer ends)
    """
    ALTER TABLE conversations ADD COLUMN history_hash TEXT;
    CREATE INDEX conversations_by_history ON conversations (owner, history_hash);
    ALTER TABLE conversations ADD COLUMN keep INTEGER NOT NULL DEFAULT 1;
    """,
    # version 3: SQLite's version 7 (tool calls: an assistant's, and the call a result answers)
    """
    ALTER TABLE messages ADD COLUMN tool_calls TEXT;
    ALTER TABLE messages ADD COLUMN tool_call_id TEXT;
    """,
]
MIGRATION_LOCK = 0x5354524D  # any constant the service's processes agree on ("STRM")
TIMEOUT_S = 5


class Transaction:
    """A psycopg connection inside a transaction, taking the shared SQL's `?` placeholders."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple = ()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.conn.cursor().executemany(sql.replace("?", "%s"), rows)


class PostgresStore(SQLStore):
    name = "postgres"
    FOR_UPDATE = " FOR UPDATE"  # READ COMMITTED: without it, two turns begun together both pass the busy check

    def __init__(self, settings: Settings) -> None:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "DATABASE_URL names PostgreSQL: install its driver with"
                " `pip install -r requirements.txt -r requirements-postgres.txt`"
            ) from None
        super().__init__(settings)
        self.url = settings.database_url
        self.pool_size = max(1, settings.database_pool_size)
        self.failures = FailureLog()
        self._lock = threading.Lock()
        self._pool = None
        self._pid = 0
        self._migrated = False
        self._checking = threading.Lock()

    def _check_pool(self, pool) -> None:
        try:
            pool.check()
        finally:
            self._checking.release()

    def pool(self):
        """The process's pool, opened at its first use (and again in a forked child)."""
        with self._lock:
            if self._pid != os.getpid():
                import psycopg
                from psycopg.rows import dict_row
                from psycopg_pool import ConnectionPool

                def configure(conn: psycopg.Connection) -> None:
                    conn.execute(f"SET statement_timeout = '{TIMEOUT_S}s'")

                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=TIMEOUT_S,
                    open=False,
                    configure=configure,
                    kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": TIMEOUT_S,
                            "application_name": "flask-llm-streaming"},
                )
                self._pool.open(wait=False)
                self._pid, self._migrated = os.getpid(), False
            return self._pool

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        import psycopg

        unavailable = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)
        pool = self.pool()
        try:
            with pool.connection() as conn:
                if not self._migrated:
                    self.migrate(conn)
                with conn.transaction():
                    yield Transaction(conn)
        except unavailable as exc:
            # The other pooled connections may be as dead as this one (the server restarted):
            # the pool checks them in the background, so that the next request gets a live one.
            if self._checking.acquire(blocking=False):  # one check at a time, not one per failed request
                threading.Thread(target=self._check_pool, args=(pool,), daemon=True).start()
            raise self.failures.failed("a transaction", exc) from None

    def migrate(self, conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version").fetchone()["v"]
            for number, script in enumerate(SCHEMA[version:], version + 1):
                conn.execute(script)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
        self._migrated = True
