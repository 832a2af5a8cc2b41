"""Conversations in PostgreSQL (`DATABASE_URL=postgres://...`), for several hosts at once.

The same rows as the SQLite file (`psql $DATABASE_URL -c 'table messages'`) and the same queries
(`sql.py`). psycopg 3 with a pool of `DATABASE_POOL_SIZE` connections per worker process, opened
lazily in the worker (never in gunicorn's master). psycopg waits for the server through `select`,
which gevent patches (supported from psycopg 3.1.14 on), so a slow query holds only its own
greenlet; the pool's own threads are greenlets there too.

A process's writes go in groups, one transaction for those that come together (group commit,
as SQLite's: see `PostgresStore.transaction`), and its reads on connections of their own, one
round trip each.

A server that is down or unreachable is StoreUnavailable within `TIMEOUT_S` (connecting, waiting
for a pooled connection, or a statement), never a hang; the pool reconnects by itself once it is
back. The schema is migrated by the first transaction of each process, under an advisory lock,
so that workers and hosts starting at the same moment apply each version once; a server that is
down at boot delays the migration, not the boot.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Settings
from . import FailureLog, StoreUnavailable
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
    # version 4: what an answer's request said of itself that an API echoes, JSON (sqlite.py's 8)
    """
    ALTER TABLE messages ADD COLUMN request TEXT;
    """,
    # version 5: sqlite.py's 9 (the streaming rows' three indexes become one, and one of the rows
    # whose stop was asked for)
    """
    DROP INDEX messages_streaming_by_owner;
    DROP INDEX messages_leases;
    DROP INDEX messages_streaming_by_worker;
    CREATE INDEX messages_live ON messages (owner, conversation_id, lease_until) WHERE status = 'streaming';
    CREATE INDEX messages_stops ON messages (worker) WHERE status = 'streaming' AND stop_requested_at IS NOT NULL;
    """,
]
MIGRATION_LOCK = 0x5354524D  # any constant the service's processes agree on ("STRM")
TIMEOUT_S = 5


def UNAVAILABLE(psycopg) -> tuple[type[Exception], ...]:  # noqa: N802
    """The errors that mean the database cannot be used (down, unreachable, read-only, a pool
    that gave no connection in time, a deadlock): StoreUnavailable."""
    return psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction


class Transaction:
    """A psycopg connection inside a transaction, taking the shared SQL's `?` placeholders."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple = ()):
        return self.conn.execute(placeholders(sql), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.conn.cursor().executemany(placeholders(sql), rows)


@functools.cache
def placeholders(sql: str) -> str:
    """The shared SQL's `?` as psycopg's `%s` (the queries are a few dozen constants)."""
    return sql.replace("?", "%s")


class Statements:
    """The statements of a group's transaction, sent together (see `PostgresStore.transaction`):
    a write waits, bound on the client side (psycopg's `ClientCursor.mogrify`, its own quoting),
    and goes with the next read, or the COMMIT, in one query of several statements (the simple
    query protocol): one round trip, where each statement sent alone waited for its own
    (`?` placeholders, as `Transaction`)."""

    def __init__(self, conn) -> None:
        import psycopg

        self.conn = conn
        self.binder = psycopg.ClientCursor(conn)
        self.pending: list[str] = []
        self.sent = 0  # how many times statements went out

    def execute(self, sql: str, params: tuple = ()):
        statement = self.binder.mogrify(placeholders(sql), params)
        if sql.startswith("SELECT") or " RETURNING " in sql:  # a read: its result is wanted now
            return self.send(statement)
        self.pending.append(statement)
        return None

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        sql = placeholders(sql)
        self.pending.extend(self.binder.mogrify(sql, row) for row in rows)

    def send(self, last: str | None = None):
        """Send what waits (and `last`): the cursor of the last statement's result."""
        statements = [*self.pending, last] if last else self.pending
        self.pending = []
        self.sent += 1
        cursor = self.conn.execute(";".join(statements))  # no parameters: the query goes as it is
        for _ in statements[1:]:
            cursor.nextset()
        return cursor


class _Group:
    """Transactions committed together on one connection: `done` once committed, or failed with `error`."""

    def __init__(self, conn) -> None:
        self.statements = Statements(conn)
        self.done = threading.Event()
        self.error: Exception | None = None


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
        self._writing = threading.Lock()  # held by the transaction of the group that runs its statements
        self._group: _Group | None = None  # the transaction open for the ones that come together

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
                self._group = None
            return self._pool

    def _unavailable(self, pool, exc: Exception) -> StoreUnavailable:
        # The other pooled connections may be as dead as this one (the server restarted):
        # the pool checks them in the background, so that the next request gets a live one.
        if self._checking.acquire(blocking=False):  # one check at a time, not one per failed request
            threading.Thread(target=self._check_pool, args=(pool,), daemon=True).start()
        return self.failures.failed("a transaction", exc)

    @contextmanager
    def autocommit(self) -> Iterator[Transaction]:
        """A pooled connection of its own, each statement a transaction: one round trip a read."""
        import psycopg

        pool = self.pool()
        try:
            with pool.connection() as conn:
                if not self._migrated:
                    self.migrate(conn)
                yield Transaction(conn)
        except UNAVAILABLE(psycopg) as exc:
            raise self._unavailable(pool, exc) from None

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """One transaction, committed on success; the process's transactions that come together
        are committed together (group commit), as SQLite's are (see sqlite.py): the first one
        takes a connection and runs, its writes kept (`Statements`) until a read needs an answer;
        it gives the others that are ready a turn (`sleep(0)`), each of which runs in a savepoint
        of its own, and then sends what waits with COMMIT: BEGIN, the writes of every turn and
        COMMIT in one round trip. Turns that begin or end together (a burst of new streams) thus
        cost one round trip and one commit, where each cost four or five (BEGIN, each statement,
        COMMIT, every one a wait for the server and then for the gevent hub, each wait a
        tenth of a millisecond of CPU in gevent's `poll`) while holding one of the
        `DATABASE_POOL_SIZE` connections.

        The groups of a process run one at a time (`_writing`), so that two transactions of the
        same process never wait for each other's row locks (a deadlock: the leases' checkpoint
        and the turns that end meanwhile touch the same rows in no common order). So a write
        that waits for a lock (another host's transaction) holds up the process's other writes,
        not its reads nor its streams, up to the statement timeout. A failure (the server went
        away, a deadlock with another host) fails the whole group: StoreUnavailable for each."""
        import psycopg

        pool, deadline = self.pool(), time.monotonic() + TIMEOUT_S
        if not self._writing.acquire(timeout=TIMEOUT_S):
            raise self.failures.failed("waiting for the group of transactions", TimeoutError()) from None
        group = self._group
        if group is not None:
            try:
                with self._joined(group) as db:
                    yield db
            except UNAVAILABLE(psycopg) as exc:
                raise self._unavailable(pool, exc) from None
            finally:
                self._writing.release()
            group.done.wait()
            if group.error is not None:
                raise StoreUnavailable("the transaction was rolled back")
            return
        held = True
        try:
            with pool.connection(timeout=max(0.0, deadline - time.monotonic())) as conn:
                if not self._migrated:
                    self.migrate(conn)
                group = _Group(conn)
                db = group.statements
                db.pending.append("BEGIN")
                self._group = group
                try:
                    try:
                        yield db
                    except BaseException as exc:  # none has joined yet: undo it all, the group is over
                        self._group = None
                        if db.sent and not isinstance(exc, psycopg.Error):  # (which is rolled back below)
                            db.pending.append("ROLLBACK")
                            db.send()
                        raise
                    self._writing.release()
                    held = False
                    time.sleep(0)  # the others that are ready join the group
                    self._writing.acquire()
                    held = True
                    self._group = None
                    if group.error is not None:  # one that joined failed: so did the whole group
                        raise StoreUnavailable("the transaction was rolled back")
                    db.pending.append("COMMIT")
                    db.send()
                except psycopg.Error as exc:
                    theirs, group.error = group.error is not None, exc
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
                    if theirs:  # the error of one that joined: not this one's
                        raise StoreUnavailable("the transaction was rolled back") from None
                    raise
                except StoreUnavailable as exc:
                    group.error = exc
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
                    raise
        except UNAVAILABLE(psycopg) as exc:
            raise self._unavailable(pool, exc) from None
        finally:
            if held:
                self._writing.release()
            if group is not None:
                group.done.set()

    @contextmanager
    def _joined(self, group: _Group) -> Iterator[Statements]:
        """A transaction in the open `group`, in a savepoint of its own (the caller holds `_writing`);
        one that fails before any of its statements went out is dropped from the group, unsent."""
        import psycopg

        if group.error is not None:
            raise StoreUnavailable("the transaction was rolled back")
        db = group.statements
        mark, sent = len(db.pending), db.sent
        db.pending.append("SAVEPOINT one")
        try:
            yield db
        except psycopg.Error as exc:  # the whole transaction is lost: all of the group fails
            group.error = exc
            raise
        except BaseException:
            if db.sent == sent:
                del db.pending[mark:]
            else:
                db.pending += ["ROLLBACK TO one", "RELEASE one"]
            raise
        db.pending.append("RELEASE one")

    def migrate(self, conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version").fetchone()["v"]
            for number, script in enumerate(SCHEMA[version:], version + 1):
                conn.execute(script)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
        self._migrated = True
