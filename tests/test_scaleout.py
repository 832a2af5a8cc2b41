"""Past one machine: PostgreSQL shared by two hosts (two gunicorn masters on two ports), leases
that save the turn of a SIGKILLed worker, stop from another process, and a store that fails.

The tests parametrised with STORES run against SQLite too: there the two masters share one file,
as the workers of one host do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from .conftest import STORES, Server, start_server, store_url, wait_for
from .streams import begin_together, read_sse


@pytest.fixture(params=STORES)
def database_url(request, tmp_path) -> str:
    return store_url(request.param, request, tmp_path)


def worker_pids(server: Server) -> list[int]:
    master = server.process.pid
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def turn(server: Server, conversation_id: str, message_id: str, **kwargs) -> dict:
    messages = server.get(f"/conversations/{conversation_id}", **kwargs).json()["messages"]
    return next(m for m in messages if m["id"] == message_id)


def data_lines(lines) -> list[dict]:
    """The events of the SSE lines that remain (requests' `iter_lines`)."""
    return [json.loads(line[5:]) for line in lines if line.startswith("data:")]


def open_stream(server: Server, prompt: str, **kwargs) -> requests.Response:
    response = requests.post(server.url + "/chat", json={"prompt": prompt}, stream=True, timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    return response


def test_healthz_names_the_store_and_checks_it(serve, database_url):
    health = serve().get("/healthz").json()
    kind = "postgres" if database_url.startswith("postgres") else "sqlite"
    assert health["status"] == "ok"
    assert health["store"] == {"name": kind, "reachable": True, "writable": True}
    assert "postgres" not in json.dumps(health).replace('"postgres"', "")  # no URL, user or password


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_heroku_style_urls_with_sslmode_require(tmp_path, postgres, scheme):
    url = postgres.url(postgres.create_database(), sslmode="require").replace("postgresql://", f"{scheme}://")
    server = start_server(tmp_path, "gevent", database_url=url)
    try:
        got = read_sse(server.url + "/chat/sse", json_body={"prompt": "over TLS"})
        assert got.events[-1]["type"] == "done"
        assert server.get("/healthz").json()["store"]["name"] == "postgres"
        import psycopg

        with psycopg.connect(postgres.url()) as conn:
            ssl = conn.execute("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                               " WHERE a.application_name = 'flask-llm-streaming'").fetchall()
        assert ssl and all(row[0] for row in ssl)  # every connection of the service is encrypted
    finally:
        server.stop()


def test_a_conversation_started_on_one_host_continues_on_another(serve, database_url):
    a, b = serve("gevent"), serve("gthread")
    first = read_sse(a.url + "/chat/sse", json_body={"prompt": "on A"})
    conversation_id = first.events[0]["conversation_id"]
    second = read_sse(b.url + "/chat/sse", json_body={"prompt": "on B", "conversation_id": conversation_id})
    assert second.text.startswith('This is turn 2. You said: "on B".')
    messages = a.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [m["content"] for m in messages[::2]] == ["on A", "on B"]
    assert [m["status"] for m in messages] == ["complete"] * 4


def test_the_per_key_limit_counts_streams_on_every_host(serve, database_url):
    env = {"API_KEYS": "sk-one,sk-two", "MAX_STREAMS_PER_KEY": 2, "DEMO_HANG_AFTER": 2, "IDLE_TIMEOUT_S": 600,
           "HEARTBEAT_S": 0.2}
    a, b = serve("gevent", **env), serve("gevent", **env)
    one = {"Authorization": "Bearer sk-one"}
    held = [open_stream(a, "held on A", headers=one), open_stream(b, "held on B", headers=one)]
    for host in (a, b):
        refused = host.post("/chat", json={"prompt": "third"}, headers=one)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        assert refused.headers["Retry-After"]
    other = open_stream(b, "another key", headers={"Authorization": "Bearer sk-two"})
    held[0].close()
    wait_for(lambda: a.get("/healthz", headers=one).json()["streams_in_flight"] == 0, what="A's stream to end")
    held.append(open_stream(a, "freed", headers=one))
    for response in (*held, other):
        response.close()


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_a_sigkilled_worker_leaves_its_turn_saved_as_worker_lost(serve, database_url, worker_class):
    """The worker producing an answer is SIGKILLed: within the lease the turn is interrupted,
    `worker_lost`, with the text of its last checkpoint; a reader on the other host is told; the
    conversation and the key's stream count are free again."""
    env = {"LEASE_S": 1.5, "API_KEYS": "sk-k", "MAX_STREAMS_PER_KEY": 1, "DEMO_TOKENS_PER_S": 20, "RESUME_GRACE_S": 600,
           "DEMO_TOKENS": 5000, "HEARTBEAT_S": 0.2}
    key = {"Authorization": "Bearer sk-k"}
    a, b = serve(worker_class, **env), serve("gevent", **env)
    seen = read_sse(a.url + "/chat/sse", json_body={"prompt": "doomed"}, headers=key,
                    until=lambda got: len(got.of("delta")) >= 3)
    conversation_id, message_id = seen.events[0]["conversation_id"], seen.events[0]["message_id"]
    wait_for(lambda: turn(b, conversation_id, message_id, headers=key)["content"].startswith(seen.text),
             what="a checkpoint of what the client saw")
    remote: list[dict] = []  # a reconnect that the router sent to B, while A still produces it
    reader = threading.Thread(target=lambda: remote.extend(read_sse(
        b.url + "/chat/sse", method="GET", headers={**key, "Last-Event-ID": seen.ids[-1]}).events))
    reader.start()
    checkpointed = turn(b, conversation_id, message_id, headers=key)["content"]
    for pid in worker_pids(a):
        os.kill(pid, signal.SIGKILL)
    lost = wait_for(lambda: (t := turn(b, conversation_id, message_id, headers=key))["status"] != "streaming" and t,
                    what="the lost turn to be saved")
    assert lost["status"] == "interrupted" and lost["error_code"] == "worker_lost"
    assert lost["content"].startswith(checkpointed) and lost["content"].startswith(seen.text)
    reader.join(timeout=30)
    assert remote and remote[-1]["type"] == "error" and remote[-1]["error"]["code"] == "worker_lost"
    again = read_sse(b.url + "/chat/sse", headers=key, json_body={"prompt": "after", "conversation_id": conversation_id,
                                                                  "max_tokens": 3})
    assert again.events[-1]["type"] == "done"  # the conversation, and the key's only stream, are free


@pytest.mark.parametrize("on", ["same", "other"])
def test_stop_ends_the_answer_wherever_it_runs(serve, database_url, on):
    env = {"DEMO_HANG_AFTER": 3, "IDLE_TIMEOUT_S": 600, "HEARTBEAT_S": 0.2}
    a = serve("gevent", **env)
    b = a if on == "same" else serve("gthread", **env)
    response = requests.get(a.url + "/chat/sse", params={"prompt": "stop me"}, stream=True, timeout=30)
    lines = response.iter_lines(chunk_size=None, decode_unicode=True)
    events = []
    for line in lines:
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
            if "".join(e["text"] for e in events if e["type"] == "delta") == "This is turn":  # then it hangs
                break
    conversation_id = events[0]["conversation_id"]
    stopped = b.post(f"/conversations/{conversation_id}/stop")
    assert stopped.status_code == 200, stopped.text
    saved = stopped.json()
    assert saved["status"] == "interrupted" and saved["error_code"] == "stopped"
    assert saved["content"] == "".join(e["text"] for e in events if e["type"] == "delta")
    rest = data_lines(lines)
    assert rest[-1]["type"] == "error" and rest[-1]["error"]["code"] == "stopped"
    again = b.post(f"/conversations/{conversation_id}/stop")
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


def test_stop_only_reaches_the_owners_answers(serve, database_url):
    env = {"API_KEYS": "sk-a,sk-b", "DEMO_HANG_AFTER": 2, "IDLE_TIMEOUT_S": 600, "HEARTBEAT_S": 0.2}
    server = serve("gevent", **env)
    held = open_stream(server, "mine", headers={"Authorization": "Bearer sk-a"})
    conversation_id = held.headers["X-Conversation-Id"]
    theirs = server.post(f"/conversations/{conversation_id}/stop", headers={"Authorization": "Bearer sk-b"})
    assert theirs.status_code == 404
    mine = server.post(f"/conversations/{conversation_id}/stop", headers={"Authorization": "Bearer sk-a"})
    assert mine.status_code == 200 and mine.json()["status"] == "interrupted"
    held.close()


def test_workers_and_hosts_starting_together_migrate_once(tmp_path, postgres):
    url = postgres.url(postgres.create_database())
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda i: start_server(tmp_path, "gevent", {"WEB_CONCURRENCY": "2"},
                                                       database_url=url), range(3)))
    try:
        for server in servers:
            assert read_sse(server.url + "/chat/sse", json_body={"prompt": "x"}).events[-1]["type"] == "done"
        import psycopg

        from streaming.store.postgres import SCHEMA

        with psycopg.connect(url) as conn:  # each version once
            versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(number,) for number in range(1, len(SCHEMA) + 1)]
    finally:
        for server in servers:
            server.stop()


def test_a_slow_query_does_not_stall_the_gevent_workers_other_streams(serve, postgres, tmp_path):
    """One greenlet waits on a query that a lock holds up; the worker's other stream runs on."""
    import psycopg

    url = postgres.url(postgres.create_database())
    server = start_server(tmp_path, "gevent", {"DEMO_TOKENS_PER_S": "20", "DEMO_TOKENS": "20"}, database_url=url)
    try:
        stream = requests.get(server.url + "/chat/sse", params={"prompt": "keeps its pace"}, stream=True, timeout=30)
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE health IN ACCESS EXCLUSIVE MODE")  # /healthz writes there
            slow: list[requests.Response] = []
            waiting = threading.Thread(target=lambda: slow.append(server.get("/healthz")))
            waiting.start()
            body = stream.text  # the whole answer, while the lock holds /healthz's query
            assert not slow and waiting.is_alive()  # it is still waiting on its query
        waiting.join(timeout=30)
        assert '"type":"done"' in body and body.count("event: delta") == 20
        assert slow[0].status_code == 200
    finally:
        server.stop()


def test_postgres_stopped_mid_run(tmp_path, own_postgres):
    """503s while it is down, a running stream ends with an error event, nothing saved is lost,
    and the service recovers by itself once the server is back."""
    url = own_postgres.url(own_postgres.create_database())
    server = start_server(tmp_path, "gevent", {"DEMO_TOKENS_PER_S": "20", "DEMO_TOKENS": "60", "LEASE_S": "3"},
                          database_url=url)
    try:
        kept = read_sse(server.url + "/chat/sse", json_body={"prompt": "kept", "max_tokens": 5})
        conversation_id = kept.events[0]["conversation_id"]
        running = requests.get(server.url + "/chat/sse", params={"prompt": "running"}, stream=True, timeout=30)
        own_postgres.stop()
        refused = server.post("/chat", json={"prompt": "while down"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert "postgres" not in refused.text.lower()
        health = server.get("/healthz")
        assert health.status_code == 503 and health.json()["store"]["reachable"] is False
        events = data_lines(running.iter_lines(chunk_size=None, decode_unicode=True))
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "storage_error"
        said = "".join(e["text"] for e in events if e["type"] == "delta")
        own_postgres.start()
        wait_for(lambda: server.get("/healthz").status_code == 200, what="the service to recover")
        messages = server.get(f"/conversations/{conversation_id}").json()["messages"]
        assert messages[1]["content"] == kept.text and messages[1]["status"] == "complete"
        message_id = events[0]["message_id"]
        saved = wait_for(lambda: (t := turn(server, events[0]["conversation_id"], message_id))["status"] != "streaming"
                         and t, what="the answer that ended while the store was down to be saved")
        assert saved["content"] == said and saved["error_code"] == "storage_error"
        assert read_sse(server.url + "/chat/sse", json_body={"prompt": "back"}).events[-1]["type"] == "done"
        log = server.log.read_text()
        assert log.count("the store is unavailable") == 1 and "Traceback" not in log  # one line a minute
    finally:
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only, as in CI): a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("mounting a tmpfs failed: the disk-full test needs root")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_disk_that_fills_mid_answer_ends_the_stream_with_storage_error(tmp_path, small_disk):
    server = start_server(tmp_path, "gevent", {"DEMO_TOKENS_PER_S": "2000", "DEMO_TOKENS": "20000",
                                               "LEASE_S": "600"}, db=small_disk / "streaming.db")
    try:
        response = requests.get(server.url + "/chat/sse", params={"prompt": "fill"}, stream=True, timeout=30)
        lines = response.iter_lines(chunk_size=None, decode_unicode=True)
        first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        filler = small_disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until it is full
        events = data_lines(lines)
        assert events[-1] == {"type": "error", "error": events[-1]["error"]}
        assert events[-1]["error"]["code"] == "storage_error"
        assert not [e for e in events if e["type"] == "done"]
        log = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        assert [(e["outcome"], e["error_code"]) for e in log if e["message_id"] == first["message_id"]] == [
            ("error", "storage_error")]
        filler.unlink()  # room again: the turn is saved, whole, with the next renewal of the leases
        said = "".join(e["text"] for e in events if e["type"] == "delta")
        saved = wait_for(lambda: (t := turn(server, first["conversation_id"], first["message_id"]))["status"]
                         != "streaming" and t, what="the turn to be saved once there is room")
        assert saved["content"] == said and saved["error_code"] == "storage_error"
    finally:
        server.stop()


def test_a_sigkilled_worker_leaves_nothing_of_a_store_false_answer(serve, database_url):
    """`store: false` holds when the worker dies mid-answer: the turn's reaper deletes it."""
    env = {"LEASE_S": 1.5, "DEMO_TOKENS_PER_S": 20, "DEMO_TOKENS": 5000, "HEARTBEAT_S": 0.2}
    a, b = serve("gevent", **env), serve("gevent", **env)
    body = {"model": "demo", "messages": [{"role": "user", "content": "forget me"}], "stream": True, "store": False}
    with requests.post(a.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as response:
        conversation_id = response.headers["X-Conversation-Id"]
        assert b.get(f"/conversations/{conversation_id}").status_code == 200  # while it streams
        for pid in worker_pids(a):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: b.get(f"/conversations/{conversation_id}").status_code == 404, what="the conversation to go")
    assert b.get("/conversations").json()["conversations"] == []


def test_turns_begun_together_on_postgres_commit_together_and_each_stands_alone(tmp_path, postgres):
    """A gevent worker commits the turns that begin together in one PostgreSQL transaction
    (group commit), each in a savepoint: one refused (its conversation is busy) takes nothing of
    the others with it, and each one begun is kept."""
    import psycopg

    url = postgres.url(postgres.create_database())
    server = start_server(tmp_path, "gevent", {"DEMO_TOKENS": "200", "DEMO_TOKENS_PER_S": "20"}, database_url=url)
    try:
        busy_id, _ = begin_together(server)
        with psycopg.connect(url) as conn:
            kept = conn.execute("SELECT count(*) FROM conversations WHERE id <> %s", (busy_id,)).fetchone()[0]
            commits = conn.execute(  # (the cluster tracks when each transaction, or savepoint, committed)
                "SELECT count(DISTINCT pg_xact_commit_timestamp(xmin)) FROM messages"
                " WHERE role = 'user' AND conversation_id <> %s",  # prompts stay as their turn's begin wrote them
                (busy_id,),
            ).fetchone()[0]
        assert kept == 40  # the refused turns left nothing
        assert commits < kept
    finally:
        server.stop()


def test_text_is_saved_as_it_was_written_on_each_store(serve, database_url):
    """A group's writes are bound on the client side on PostgreSQL (psycopg's own quoting): text
    with quotes, backslashes, percent signs and any character comes back as it was sent."""
    prompt = "100% sure %s %(x)s '; DROP TABLE messages; -- \\ \" é 中 😀"
    server = serve()
    answer = read_sse(server.url + "/chat/sse", json_body={"prompt": prompt, "system": "be %s 'brief'"})
    conversation = server.get(f"/conversations/{answer.events[0]['conversation_id']}").json()
    assert conversation["system"] == "be %s 'brief'"
    assert [m["content"] for m in conversation["messages"]] == [prompt, answer.text]
