"""Live answers in Redis: two hosts (two gunicorn masters) sharing PostgreSQL and a real
redis-server. A reconnect that the router sends to the other host resumes the live answer, a
stop sent to either host ends it, the rate limit counts both hosts, and Redis may die."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from .conftest import Server, start_server, wait_for
from .streams import read_sse
from .test_scaleout import data_lines, turn, worker_pids


@pytest.fixture
def hosts(tmp_path, postgres, redis_server):
    """`hosts(n, worker_class, **env)`: n servers sharing a fresh database and the Redis server."""
    url = postgres.url(postgres.create_database())
    servers: list[Server] = []

    def start(n: int = 2, worker_class: str = "gevent", redis_url: str | None = None, **env) -> list[Server]:
        for _ in range(n):
            full = {"DATABASE_URL": url, "REDIS_URL": redis_url or redis_server.url(), "HEARTBEAT_S": "0.2",
                    **{k: str(v) for k, v in env.items()}}
            servers.append(start_server(tmp_path, worker_class, full))
        return servers[-n:]

    yield start
    for server in servers:
        server.stop(quick=True)


def seq(event_id: str) -> int:
    return int(event_id.rsplit(":", 1)[1])


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_a_reconnect_on_another_host_resumes_the_live_answer(hosts, worker_class):
    pace = {"RESUME_GRACE_S": 30, "DEMO_TOKENS_PER_S": 40, "DEMO_TOKENS": 120, "LEASE_S": 600}  # no checkpoints
    a, = hosts(1, "gevent", **pace)
    b, = hosts(1, worker_class, **pace)
    first = read_sse(a.url + "/chat/sse", json_body={"prompt": "hop"}, until=lambda got: len(got.text) > 30)
    conversation_id, message_id = first.events[0]["conversation_id"], first.events[0]["message_id"]
    live_on_b: list[str] = []  # the turn's status in the store when B sent its first text

    def first_text(got) -> bool:
        if got.text and not live_on_b:
            live_on_b.append(turn(a, conversation_id, message_id)["status"])  # B may be one sync worker, busy
        return False

    rest = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]}, until=first_text)
    assert live_on_b == ["streaming"]  # B followed the answer as it was written, not once it ended
    assert rest.events[-1]["type"] == "done"
    assert rest.events[0]["type"] == "delta" and seq(rest.ids[0]) > seq(first.ids[-1])
    assert all(seq(x) < seq(y) for x, y in zip(rest.ids, rest.ids[1:], strict=False))
    saved = turn(a, conversation_id, message_id)
    assert first.text + rest.text == saved["content"] and saved["status"] == "complete"
    assert len(a.get(f"/conversations/{conversation_id}").json()["messages"]) == 2


def test_a_reconnect_on_another_host_resumes_while_postgres_is_down(tmp_path, own_postgres, redis_server):
    """The live answer is found in Redis, not in the store: a reconnect burst does not queue on the
    store's pool, and an outage of the store does not cut a stream that Redis still carries."""
    env = {"DATABASE_URL": own_postgres.url(own_postgres.create_database()), "REDIS_URL": redis_server.url(),
           "RESUME_GRACE_S": "30", "DEMO_TOKENS_PER_S": "20", "DEMO_TOKENS": "60", "LEASE_S": "3"}
    a, b = (start_server(tmp_path, "gevent", env) for _ in range(2))
    try:
        first = read_sse(a.url + "/chat/sse", json_body={"prompt": "outage"}, until=lambda got: len(got.text) > 20)
        own_postgres.stop()
        rest = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]})
        assert rest.events[0]["type"] == "delta"
        assert seq(rest.ids[0]) > seq(first.ids[-1])
        assert rest.events[-1]["type"] == "error" and rest.events[-1]["error"]["code"] == "storage_error"
        own_postgres.start()
        wait_for(lambda: b.get("/healthz").status_code == 200, what="the service to recover")
        conversation_id, message_id = first.events[0]["conversation_id"], first.events[0]["message_id"]
        saved = wait_for(lambda: (t := turn(b, conversation_id, message_id))["status"] != "streaming" and t,
                         what="the answer that ended while the store was down to be saved")
        assert saved["content"] == first.text + rest.text
    finally:
        a.stop(quick=True)
        b.stop(quick=True)


def test_a_command_waits_for_a_connection_when_every_one_is_in_use(redis_server):
    """A burst puts more commands in flight at once than a worker's pool has connections: they
    wait their turn. (redis-py's default pool refused the 101st with MaxConnectionsError, and a
    resume that it refused fell back to the store, whose pool was as busy: 503.)"""
    from streaming.config import Settings
    from streaming.live.redis_streams import connect

    client = connect(Settings(redis_url=redis_server.url(), redis_pool_size=100))
    pool = client.connection_pool
    held = [pool.get_connection() for _ in range(100)]
    answered: list = []

    def ask() -> None:
        try:
            answered.append(client.ping())
        except Exception as exc:
            answered.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    # Refused at once, or waiting in the queue of the blocking pool's free connections.
    wait_for(lambda: answered or pool.pool.not_empty._waiters, what="the command to wait or fail")
    assert answered == []
    pool.release(held.pop())
    asking.join(timeout=10)
    assert answered == [True]
    for connection in held:
        pool.release(connection)
    client.close()


def test_a_reconnect_after_the_end_replays_from_the_other_host(hosts):
    a, b = hosts(2, DEMO_TOKENS=20)
    whole = read_sse(a.url + "/chat/sse", json_body={"prompt": "done already"})
    cut = len(whole.ids) // 2
    rest = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": whole.ids[cut]})
    assert "".join(e.get("text", "") for e in whole.events[: cut + 1]) + rest.text == whole.text


def test_stop_sent_to_one_host_ends_the_answer_on_the_other(hosts):
    a, b = hosts(2, DEMO_HANG_AFTER=3, IDLE_TIMEOUT_S=600)
    response = requests.get(a.url + "/chat/sse", params={"prompt": "stop me"}, stream=True, timeout=30)
    lines = response.iter_lines(chunk_size=None, decode_unicode=True)
    events = []
    for line in lines:
        events += data_lines([line])
        if "".join(e["text"] for e in events if e["type"] == "delta") == "This is turn":
            break
    stopped = b.post(f"/conversations/{events[0]['conversation_id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["error_code"] == "stopped"
    assert stopped.json()["content"] == "This is turn"
    assert data_lines(lines)[-1]["error"]["code"] == "stopped"


def test_the_rate_limit_counts_requests_on_every_host(hosts):
    a, b = hosts(2, API_KEYS="sk-rate-1,sk-rate-2", RATE_LIMIT_PER_MIN=3)
    key = {"Authorization": "Bearer sk-rate-1"}
    wait_for(lambda: time.time() % 60 < 45, timeout=20, what="a minute with room for the test")
    assert [s.get("/conversations", headers=key).status_code for s in (a, b, a)] == [200, 200, 200]
    for server in (a, b):
        refused = server.get("/conversations", headers=key)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert b.get("/conversations", headers={"Authorization": "Bearer sk-rate-2"}).status_code == 200
    assert a.get("/healthz").status_code == 200  # public: not counted


def test_without_redis_the_rate_limit_is_per_process(serve):
    server = serve(API_KEYS="sk-alone", RATE_LIMIT_PER_MIN=2)
    key = {"Authorization": "Bearer sk-alone"}
    wait_for(lambda: time.time() % 60 < 45, timeout=20, what="a minute with room for the test")
    assert [server.get("/conversations", headers=key).status_code for _ in range(3)] == [200, 200, 429]
    refused = server.post("/v1/chat/completions", headers=key, json={"model": "demo", "messages": []})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"


def test_a_killed_worker_keeps_every_event_another_host_was_sent(hosts):
    """The checkpoints come every LEASE_S / 3 = 10 s; the worker dies before its first one, and
    the saved turn still holds all that the reader on the other host got (from Redis)."""
    a, b = hosts(2, LEASE_S=30, RESUME_GRACE_S=60, DEMO_TOKENS_PER_S=20, DEMO_TOKENS=5000)
    started = read_sse(a.url + "/chat/sse", json_body={"prompt": "doomed"}, until=lambda got: got.of("delta"))
    remote = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": started.ids[-1]},
                      until=lambda got: len(got.of("delta")) >= 4)
    for pid in worker_pids(a):
        os.kill(pid, signal.SIGKILL)
    conversation_id, message_id = started.events[0]["conversation_id"], started.events[0]["message_id"]
    lost = wait_for(lambda: (t := turn(b, conversation_id, message_id))["status"] != "streaming" and t,
                    timeout=60, what="the lost turn to be saved")
    assert lost["error_code"] == "worker_lost"
    assert lost["content"].startswith(started.text + remote.text)


def test_rediss_with_a_self_signed_certificate(hosts):
    from bench.databases import RedisServer

    tls = RedisServer(tls=True)
    try:
        verified = hosts(1, redis_url=tls.url())[0]  # the certificate is nobody's: refused
        assert verified.get("/healthz").json()["redis"] == {"reachable": False}
        pace = {"RESUME_GRACE_S": 30, "DEMO_TOKENS_PER_S": 40, "DEMO_TOKENS": 40}
        a, = hosts(1, redis_url=tls.url() + "?ssl_cert_reqs=none", **pace)  # either way of saying so
        b, = hosts(1, redis_url=tls.url(), REDIS_VERIFY_TLS=0, **pace)
        assert a.get("/healthz").json()["redis"] == b.get("/healthz").json()["redis"] == {"reachable": True}
        first = read_sse(a.url + "/chat/sse", json_body={"prompt": "tls"}, until=lambda got: len(got.text) > 20)
        rest = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]})
        assert rest.events[-1]["type"] == "done" and rest.events[0]["type"] == "delta"
    finally:
        tls.remove()


def test_redis_killed_and_restarted_mid_stream(hosts):
    """Streams go on (the producer's readers read memory; a reader on the other host falls back
    to the store's checkpoints), nothing saved is lost, and once Redis is back, reconnects across
    hosts work again."""
    from bench.databases import RedisServer

    own = RedisServer()
    try:
        a, b = hosts(2, redis_url=own.url(), RESUME_GRACE_S=30, DEMO_TOKENS_PER_S=20, DEMO_TOKENS=60, LEASE_S=1.5)
        first = read_sse(a.url + "/chat/sse", json_body={"prompt": "through"}, until=lambda got: len(got.text) > 20)
        remote: list = []
        reader = threading.Thread(target=lambda: remote.append(
            read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": first.ids[-1]})))
        reader.start()
        wait_for(lambda: a.get("/healthz").json()["streams_in_flight"] == 1, what="the answer to run")
        own.kill()
        reader.join(timeout=60)
        (rest,) = remote
        assert rest.events[-1]["type"] == "done"
        saved = turn(a, first.events[0]["conversation_id"], first.events[0]["message_id"])
        assert saved["status"] == "complete" and saved["content"] == first.text + rest.text
        assert b.get("/healthz").json()["redis"] == {"reachable": False}
        assert read_sse(b.url + "/chat/sse", json_body={"prompt": "redis down"}).events[-1]["type"] == "done"
        own.start()
        wait_for(lambda: a.get("/healthz").json()["redis"]["reachable"], what="Redis to be back")
        again = read_sse(a.url + "/chat/sse", json_body={"prompt": "back"}, until=lambda got: len(got.text) > 20)
        after = read_sse(b.url + "/chat/sse", method="GET", headers={"Last-Event-ID": again.ids[-1]})
        assert after.events[-1]["type"] == "done"
        saved = turn(a, again.events[0]["conversation_id"], again.events[0]["message_id"])
        assert again.text + after.text == saved["content"]
    finally:
        own.remove()


def test_a_responses_stream_resumes_on_another_host_with_the_same_sequence_numbers(hosts):
    import openai

    pace = {"RESUME_GRACE_S": 30, "DEMO_TOKENS_PER_S": 40, "DEMO_TOKENS": 80, "LEASE_S": 600}  # no checkpoints
    a, b = hosts(2, **pace)
    sdk_a, sdk_b = (openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) for s in (a, b))
    with sdk_a.responses.with_streaming_response.create(model="demo", input="hop", stream=True) as raw:
        first = []
        for event in raw.parse():
            first.append(event)
            if len(first) == 10:
                break  # the client leaves; the router sends its reconnect to the other host
    response_id = first[0].response.id
    rest = list(sdk_b.responses.retrieve(response_id, stream=True, starting_after=9))
    assert rest[-1].type == "response.completed" and rest[0].sequence_number == 10
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text == sdk_a.responses.retrieve(response_id).output_text
