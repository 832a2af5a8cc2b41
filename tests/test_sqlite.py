"""What only the embedded default does: a SQLite file that upgrades in place and is copied out of
its write-ahead log as the service runs."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from streaming.store.sqlite import SCHEMA

from .conftest import wait_for
from .streams import begin_together, read_sse


def test_a_version_3_file_upgrades_with_its_streams_and_owners(serve, tmp_path):
    """A file written before messages carried their owner: after the upgrade, a key's streaming
    turn still counts against its stream limit, and its conversation is still its own."""
    db, key = tmp_path / "v3.db", "sk-upgrade-31c2"
    owner, now = hashlib.sha256(key.encode()).hexdigest()[:8], time.time()
    old = sqlite3.connect(db)
    for script in SCHEMA[:3]:
        old.executescript(script)
    old.execute("PRAGMA user_version = 3")
    old.execute("INSERT INTO conversations (id, owner, created_at, updated_at) VALUES ('c1', ?, ?, ?)",
                (owner, now, now))
    old.execute("INSERT INTO messages (id, conversation_id, role, content, status, created_at)"
                " VALUES ('m1', 'c1', 'assistant', '', 'streaming', ?)", (now,))
    old.commit()
    old.close()
    server = serve(db=db, API_KEYS=f"{key},sk-other-9e0f", MAX_STREAMS_PER_KEY=1)
    refused = server.post("/chat", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    other = server.post("/chat", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-other-9e0f"})
    assert other.status_code == 200
    mine = server.get("/conversations/c1", headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200 and mine.json()["messages"][0]["status"] == "streaming"



@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_turns_reach_the_database_file_while_the_service_runs(serve, tmp_path, worker_class):
    """The write-ahead log is copied into the database file as the service runs, not only once
    1,000 pages have piled up: a finished turn shows in the file itself, read without the log."""
    db = tmp_path / "checkpointed.db"
    server = serve(worker_class, db=db)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "into the file"})
    message_id = got.events[0]["message_id"]

    def in_the_file() -> bool:
        reader = sqlite3.connect(f"file:{db}?immutable=1", uri=True)  # the file alone, no log
        try:
            row = reader.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
        except sqlite3.DatabaseError:  # a page caught mid-write: look again
            return False
        finally:
            reader.close()
        return row == ("complete",)

    wait_for(in_the_file, what="the turn to be checkpointed into the database file")


def test_the_log_stays_small_while_turns_keep_coming(serve, tmp_path):
    """Under a steady stream of turns the write-ahead log is restarted, not only copied: it stayed
    past 100 MB after 1,500 one-token answers (a log that grows without end fills the disk, and
    every transaction got slower as it grew)."""
    db = tmp_path / "busy.db"
    server = serve("gevent", db=db, DEMO_TOKENS=1)

    def ask(i: int) -> int:
        return requests.post(server.url + "/chat", json={"prompt": f"turn {i}"}, timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(ask, range(1500))) == {200}
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size < 40 * 2**20, f"the log holds {wal.stat().st_size / 2**20:.0f} MB"


def test_turns_begun_together_are_saved_or_refused_each_on_its_own(serve, tmp_path):
    """Turns that arrive together are committed together (group commit): one refused (its
    conversation is busy) takes nothing of the others with it, and each one begun is kept."""
    db = tmp_path / "together.db"
    server = serve("gevent", db=db, DEMO_TOKENS=200, DEMO_TOKENS_PER_S=20)
    begin_together(server)
    kept = sqlite3.connect(db).execute("SELECT count(*) FROM conversations").fetchone()[0]
    assert kept == 41  # the busy one and the forty begun; the refused turns left nothing


def test_a_turn_ends_in_another_process_than_the_one_that_began_it(tmp_path):
    """A process ends the turns it began without reading their conversation first (it keeps what
    it needs); a turn begun by another process's store is read, and ends the same way."""
    from streaming.config import Settings
    from streaming.store.sqlite import SQLiteStore

    path = str(tmp_path / "two.db")
    began, ends = SQLiteStore(path, Settings()), SQLiteStore(path, Settings())
    conversation_id, _ = began.begin_turn(None, "m1", "hello", None, "demo", worker="w")
    ends.end_turn("m1", "complete", [{"type": "start"}, "hi there", {"type": "done"}], None)
    turn = ends.conversation(conversation_id)["messages"][-1]
    assert (turn["status"], turn["content"]) == ("complete", "hi there")
    history = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"})
    assert began.begin_turn(None, "m2", "next", None, "demo", history=history, worker="w")[0] == conversation_id


def test_a_turn_reads_the_same_however_many_conversations_and_streams_the_file_holds(tmp_path):
    """The lookups of a turn go straight to their rows: continuing a conversation by its history
    (a /v1 request's earlier messages), finding and stopping the answer streaming in one, and a
    key's stream count do as much work with 1,000 other conversations, 400 of them streaming, as
    with none (counted in steps of SQLite's machine, not in time). The history's lookup read
    every conversation of the owner before (SQLite's planner took the index that gives them in
    the order the query wants, not the one of their hashes), and finding the streaming answer
    read every streaming row of the owner."""
    from streaming.config import Settings
    from streaming.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "many.db"), Settings())
    done = [{"type": "start"}, "an answer", {"type": "done"}]
    ids = (f"m{n}" for n in range(10_000))

    def steps(work) -> int:
        count = [0]
        db = store._connection()
        db.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 1)  # (0: go on)
        try:
            work()
        finally:
            db.set_progress_handler(None, 1)
        return count[0]

    def conversation(prompt: str, turns: int = 1) -> tuple[dict, ...]:
        conversation_id, history = None, ()
        for _ in range(turns):
            message_id = next(ids)
            conversation_id, _ = store.begin_turn(conversation_id, message_id, prompt, None, "demo")
            store.end_turn(message_id, "complete", done, None)
            history += ({"role": "user", "content": prompt}, {"role": "assistant", "content": "an answer"})
        return history

    def streaming() -> tuple[str, str]:
        message_id = next(ids)
        return store.begin_turn(None, message_id, "hello", None, "demo")[0], message_id

    def work(history: tuple[dict, ...]) -> dict[str, int]:
        busy, answer = streaming()
        unknown = ({"role": "user", "content": f"never asked {next(ids)}"}, {"role": "assistant", "content": "no"})
        return {
            "continue by history": steps(lambda: store.begin_turn(None, next(ids), "next", None, "demo",
                                                                  history=history)),
            "a history stored nowhere": steps(lambda: store.begin_turn(None, next(ids), "next", None, "demo",
                                                                       history=unknown)),
            "find the streaming answer": steps(lambda: store.streaming_turn(busy)),
            "stop it": steps(lambda: store.request_stop(answer)),
            "a key's count": steps(lambda: store.begin_turn(None, next(ids), "x", None, "demo", owner="key",
                                                            max_streams=5)),
        }

    older = conversation("the older one", 2)
    first = work(conversation("the first one", 2))
    for _ in range(400):
        streaming()
    for i in range(600):
        conversation(f"another {i}")
    then = work(older)
    assert all(then[what] <= first[what] + 20 for what in first), (first, then)


# Turns begun together under gevent in one process, as a worker begins them; the third one's
# message id is taken already, so it fails after it wrote its conversation's row.
TOGETHER = """
from gevent import monkey; monkey.patch_all()
import json, sys, gevent
from streaming.config import Settings
from streaming.store import StoreUnavailable
from streaming.store.sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1], Settings())
store.begin_turn(None, "taken", "before", None, "demo")

def begin(i):
    try:
        return store.begin_turn(None, "taken" if i == 2 else f"m{i}", f"turn {i}", None, "demo")[0]
    except StoreUnavailable:
        return None

print(json.dumps([g.value for g in gevent.joinall([gevent.spawn(begin, i) for i in range(8)])]))
"""


def test_a_turn_that_fails_after_it_wrote_takes_its_group_whole(tmp_path):
    """Turns that join a group commit run without a savepoint each: one that fails after it wrote
    (here its message id is another's: its conversation's row is in) cannot be undone alone, so
    its group fails whole. Each turn then is either begun and saved whole (its conversation, its
    prompt, its streaming answer) or refused with nothing left of it, and the turns that came
    after the failure are begun in a group of their own."""
    path = tmp_path / "faulty.db"
    run = subprocess.run([sys.executable, "-c", TOGETHER, str(path)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    begun = json.loads(run.stdout)
    assert begun[2] is None and all(begun[3:])
    db = sqlite3.connect(path)
    conversations = {row[0] for row in db.execute("SELECT id FROM conversations")}
    assert conversations == {c for c in begun if c} | {db.execute("SELECT conversation_id FROM messages"
                                                                  " WHERE id = 'taken'").fetchone()[0]}
    for conversation in conversations:
        rows = db.execute("SELECT role, status FROM messages WHERE conversation_id = ? ORDER BY rowid",
                          (conversation,)).fetchall()
        assert rows == [("user", "complete"), ("assistant", "streaming")]


def test_row_ids_are_uuid7_in_the_order_they_were_made():
    """A row id is a UUIDv7 as 32 hex digits (as uuid4's `.hex` were): those of later
    milliseconds sort after, so that each index of ids grows at its end."""
    import uuid

    from streaming.store import new_id

    made = [new_id()]
    for _ in range(3):
        while (later := new_id())[:12] == made[-1][:12]:  # the next millisecond
            pass
        made.append(later)
    assert made == sorted(made) and len({new_id() for _ in range(1000)}) == 1000
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).hex == i for i in made)


@pytest.mark.parametrize("message", [
    ("system", ""),
    ("user", 'he said "hi"\n\t\\ é 日本 \U0001F600 \ud800 \x00 \x1f \u2028 </script>'),
    ("assistant", "", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
    ("assistant", None, [{"id": "c1"}]),
    ("assistant", None),
    ("tool", "42", None, "c1"),
])
@pytest.mark.parametrize("digest", [None, "0" * 64])
def test_a_history_digest_is_what_it_was(digest, message):
    """`chain` writes the JSON of a message's fields itself: the digests stored in every file stay
    the ones that `json.dumps(..., ensure_ascii=False, sort_keys=True)` of them gave."""
    from streaming.store.sql import chain

    role, content, *more = message
    fields = [digest, role, content] + ([more[0] or None, more[1] if len(more) > 1 else None] if any(more) else [])
    text = json.dumps(fields, ensure_ascii=False, sort_keys=True)
    assert chain(digest, role, content, *more) == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
