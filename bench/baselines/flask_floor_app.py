"""The design's floor: the naive Flask baseline plus the least that the service's design asks of
every stream, and nothing else. A producer thread (a greenlet under gevent) reads the model and
appends to the answer's log, waking the response's generator with an `Event`; the generator,
which owns the client, writes whatever is new as one frame. The turn is saved in SQLite as it
begins (a user and a `streaming` assistant row, committed before the first byte) and as it ends
(the answer, committed before the last frame). No ids, typed events, limits, metrics, logs,
heartbeats or deadlines: what the service costs above this is its own code.

`gunicorn -k gevent bench.baselines.flask_floor_app:app`; pace as the naive baseline;
FLOOR_DB is the SQLite file (a new one is made).
"""

import json
import os
import sqlite3
import threading
import time
import uuid

from flask import Flask, Response, request, stream_with_context
from gevent import spawn_raw  # the producer as the service starts it under gevent: a raw greenlet

TTFT_S = float(os.environ.get("DEMO_TTFT_MS", "0")) / 1000
RATE = float(os.environ.get("DEMO_TOKENS_PER_S", "0"))
TOKENS = int(os.environ.get("DEMO_TOKENS", "60"))
WORDS = "streaming tokens flow from the model through the engine to the socket".split()

app = Flask(__name__)
_db: sqlite3.Connection | None = None


def db() -> sqlite3.Connection:
    """The worker's connection (opened after the fork); its calls never yield to another greenlet."""
    global _db
    if _db is None:
        _db = sqlite3.connect(os.environ["FLOOR_DB"], isolation_level=None, check_same_thread=False)
        _db.execute("PRAGMA journal_mode = WAL")
        _db.execute("PRAGMA synchronous = NORMAL")
        _db.execute("CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL,"
                    " role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL)")
    return _db


def begin_turn(prompt: str) -> str:
    conversation_id, message_id, now = uuid.uuid4().hex, uuid.uuid4().hex, time.time()
    with db():  # one transaction, committed on leaving
        db().executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", [
            (uuid.uuid4().hex, conversation_id, "user", prompt, "complete", now),
            (message_id, conversation_id, "assistant", "", "streaming", now),
        ])
    return message_id


def end_turn(message_id: str, text: str) -> None:
    with db():
        db().execute("UPDATE messages SET content = ?, status = 'complete' WHERE id = ?", (text, message_id))


@app.get("/chat/sse")
def chat_sse():
    message_id = begin_turn(request.args.get("prompt", ""))
    log: list[str] = []
    state = {"ended": False, "changed": threading.Event()}

    def wake() -> None:
        woken, state["changed"] = state["changed"], threading.Event()
        woken.set()

    def produce() -> None:
        if TTFT_S > 0:
            time.sleep(TTFT_S)
        for i in range(TOKENS):
            log.append(" " + WORDS[i % len(WORDS)])
            wake()
            if RATE > 0:
                time.sleep(1 / RATE)
        end_turn(message_id, "".join(log))
        state["ended"] = True
        wake()

    def generate():
        sent = 0
        while True:
            changed, ended = state["changed"], state["ended"]
            if sent < len(log):
                new, sent = "".join(log[sent:]), len(log)
                yield f"data: {json.dumps({'content': new})}\n\n"
            elif ended:
                break
            else:
                changed.wait()
        yield "data: [DONE]\n\n"

    spawn_raw(produce)
    time.sleep(0)  # the producer's first turn, as the service gives it
    return Response(stream_with_context(generate()), mimetype="text/event-stream")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
