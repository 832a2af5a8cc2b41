"""A storm of clients that leave at random moments, against one real gunicorn worker.

Two hundred clients (a seeded plan, so a failure replays) send a request to one of the streaming
endpoints over a raw socket, read a random number of bytes (none at all, part of the headers, a
few events, or everything) and close, some with a FIN, some with a RST. Afterwards:

- every answer stops (`/healthz` reports no stream in flight);
- the worker holds exactly the file descriptors and threads it held before the storm;
- every stored conversation is consistent: nothing left `streaming`, each user message answered,
  a complete answer equal to the demo's whole answer for that prompt and an interrupted one a
  prefix of it;
- the clients that read to the end got the whole answer, and nobody got an error status.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
import sseclient

from .conftest import wait_for

SEED = 20251124
CLIENTS = 200
POOL = 50  # clients at once
HOLD = 64  # streams held open at once during the warm-up (gthread: fills its thread pool)
DEMO_TOKENS = 200
ENV = {
    "DEMO_TOKENS_PER_S": 50,  # a whole answer takes about 4 s: most clients leave mid-answer
    "DEMO_TOKENS": DEMO_TOKENS,
    "DEMO_TTFT_MS": 300,  # some leave while the model is still "thinking"
    "HEARTBEAT_S": 0.2,
    # Every client here is the same (keyless) owner: the per-key limit (32) would turn most of the
    # storm into 429s, which is not what is tested here.
    "MAX_STREAMS_PER_KEY": 10_000,
}
PROMPTS = [
    "hello",
    "tell me about streams",
    'quotes " and \\ backslashes',
    "line one\nline two\r\n\r\nthree",
    "emoji 😀 🇫🇷 and a \u2028 separator",
    "用中文解释生成器",
    "nul \x00 and tab \t",
    "data: [DONE]\n\nid: 7\nevent: done",
]
ENDPOINTS = ["POST /chat", "GET /chat", "POST /chat/sse", "GET /chat/sse", "POST /v1/chat/completions", "POST /batch"]
JSON = "application/json"


# -- the worker's resources ---------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    connections: int  # TCP sockets of the worker that are not listening: clients still attached
    fd_targets: tuple[str, ...] = field(default=(), compare=False, repr=False)


def worker_pid(master: int) -> int:
    def children() -> list[int]:
        with open(f"/proc/{master}/task/{master}/children") as f:
            return [int(pid) for pid in f.read().split()]

    pids = wait_for(children, what="gunicorn's worker")
    assert len(pids) == 1, pids  # WEB_CONCURRENCY=1
    return pids[0]


def tcp_states(pid: int) -> dict[str, str]:
    """Socket inode -> TCP state (hex, as in /proc/net/tcp; 0A is LISTEN) in the worker's namespace."""
    states = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            states[cols[9]] = cols[3]
    return states


def usage(pid: int) -> Usage:
    fds = os.listdir(f"/proc/{pid}/fd")
    threads = len(os.listdir(f"/proc/{pid}/task"))
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed between the listing and the look
            targets.append("?")
    states = tcp_states(pid)
    connections = sum(
        1 for t in targets if t.startswith("socket:[") and states.get(t[8:-1], "0A") != "0A"
    )
    return Usage(len(fds), threads, connections, tuple(sorted(targets)))


def quiet_usage(pid: int) -> Usage:
    """The worker's usage once it is quiet: no client connection left and the same counts seen
    twice in a row (an answer's thread ends a moment after its turn is saved)."""
    seen: list[Usage] = []

    def quiet() -> Usage | None:
        now = usage(pid)
        previous = seen[-1] if seen else None
        seen.append(now)
        return now if now.connections == 0 and now == previous else None

    return wait_for(quiet, timeout=20, what="the worker to be quiet")


def in_flight(server) -> int:
    return server.get("/healthz").json()["streams_in_flight"]


# -- raw HTTP clients ---------------------------------------------------------------------------


@dataclass
class Plan:
    endpoint: str
    prompts: list[str]
    budget: int | None  # bytes to read before closing; None: read to the end
    keep_alive: bool
    reset: bool  # close with a RST (SO_LINGER 0) rather than a FIN

    def request(self) -> bytes:
        method, path = self.endpoint.split()
        body = b""
        if method == "GET":
            path += "?" + urllib.parse.urlencode({"prompt": self.prompts[0]})
        elif path == "/batch":
            body = json.dumps({"prompts": self.prompts}).encode()
        elif path == "/v1/chat/completions":
            messages = [{"role": "user", "content": self.prompts[0]}]
            body = json.dumps({"model": "demo", "messages": messages, "stream": True}).encode()
        else:
            body = json.dumps({"prompt": self.prompts[0]}).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
        if not self.keep_alive:
            head += "Connection: close\r\n"
        return head.encode() + b"\r\n" + body


def make_plans(rng: random.Random, count: int) -> list[Plan]:
    plans = []
    for _ in range(count):
        endpoint = rng.choice(ENDPOINTS)
        prompts = rng.sample(PROMPTS, 2) if endpoint.endswith("/batch") else [rng.choice(PROMPTS)]
        budget = rng.choices(
            [0, rng.randint(1, 400), rng.randint(400, 4000), rng.randint(4000, 40_000), None],
            weights=[15, 25, 30, 20, 10],
        )[0]
        plans.append(Plan(endpoint, prompts, budget, keep_alive=rng.random() < 0.5, reset=rng.random() < 0.3))
    return plans


@dataclass
class Outcome:
    plan: Plan
    raw: bytes
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False  # the whole response arrived


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The body so far from a chunked transfer encoding, and whether its last chunk arrived."""
    body, pos = bytearray(), 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return bytes(body), False
        size = int(raw[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            return bytes(body), raw[start:start + 2] == b"\r\n"
        body += raw[start:start + size]
        if len(raw) < start + size + 2:
            return bytes(body), False
        pos = start + size + 2


def parse(plan: Plan, raw: bytes, eof: bool) -> Outcome:
    outcome = Outcome(plan, raw)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return outcome
    lines = head.decode("latin-1").split("\r\n")
    outcome.status = int(lines[0].split()[1])
    outcome.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if outcome.headers.get("transfer-encoding", "").lower() == "chunked":
        outcome.body, outcome.ended = dechunk(rest)
    elif "content-length" in outcome.headers:
        outcome.body = rest
        outcome.ended = len(rest) == int(outcome.headers["content-length"])
    else:
        outcome.body, outcome.ended = rest, eof
    return outcome


def run_client(port: int, plan: Plan) -> Outcome:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)  # a safety net, not a wait
    raw, eof = bytearray(), False
    try:
        sock.sendall(plan.request())
        while plan.budget is None or len(raw) < plan.budget:
            chunk = sock.recv(65536 if plan.budget is None else min(65536, plan.budget - len(raw)))
            if not chunk:
                eof = True
                break
            raw += chunk
            if raw.endswith(b"0\r\n\r\n") and parse(plan, bytes(raw), eof).ended:
                break  # the whole response is in (a kept-alive connection would wait for more)
    finally:
        if plan.reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return parse(plan, bytes(raw), eof)


def hold_streams(port: int, count: int) -> None:
    """Open `count` streams at once, wait until each one is answering, then drop them all.

    Under gthread each stream holds a thread of the pool, which never shrinks: holding as many
    streams as it has threads makes the pool as big as the storm can make it, before the baseline
    is counted."""
    body = json.dumps({"prompt": PROMPTS[0]}).encode()
    request = (
        f"POST /chat/sse HTTP/1.1\r\nHost: x\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(request)
        for sock in socks:
            received = b""
            while b"event: start" not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 200"), received[:200]
    finally:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


# -- what a whole answer looks like -------------------------------------------------------------


def sse_events(body: bytes) -> list[sseclient.Event]:
    return list(sseclient.SSEClient(iter([body])).events())


def check_whole(outcome: Outcome, full: dict[str, str]) -> None:
    """A client that read to the end got the whole answer, as every framing tells it."""
    path = outcome.plan.endpoint.split()[1]
    prompt = outcome.plan.prompts[0]
    assert outcome.ended, (outcome.plan, outcome.raw[-300:])
    if path == "/chat":
        assert outcome.body.decode("utf-8") == full[prompt]
    elif path == "/chat/sse":
        events = [json.loads(e.data) for e in sse_events(outcome.body)]
        assert events[0]["type"] == "start" and events[-1]["type"] == "done", events[-1]
        assert "".join(e["text"] for e in events if e["type"] == "delta") == full[prompt]
    elif path == "/v1/chat/completions":
        data = [e.data for e in sse_events(outcome.body)]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == full[prompt]
    else:
        lines = [json.loads(line) for line in outcome.body.decode("utf-8").split("\n") if line]
        assert lines[-1] == {"type": "batch_done", "ok": 2, "failed": 0}
        for index, item_prompt in enumerate(outcome.plan.prompts):
            text = "".join(e["text"] for e in lines if e.get("index") == index and e["type"] == "delta")
            assert text == full[item_prompt]


def seen_conversations(outcome: Outcome) -> set[str]:
    """The conversation ids that the client learnt before it left."""
    ids = set()
    if "x-conversation-id" in outcome.headers:
        ids.add(outcome.headers["x-conversation-id"])
    if outcome.plan.endpoint.endswith("/batch"):
        for line in outcome.body.split(b"\n")[:-1]:  # whole lines only
            event = json.loads(line)
            if event["type"] == "start":
                ids.add(event["conversation_id"])
    return ids


def all_conversations(server) -> list[str]:
    ids: list[str] = []
    params: dict = {"limit": 200}
    while True:
        page = server.get("/conversations", params=params).json()
        ids += [c["id"] for c in page["conversations"]]
        if page["next_before"] is None:
            return ids
        params["before"] = page["next_before"]


def check_conversations(server, full: dict[str, str]) -> tuple[Counter, set[str]]:
    """Every stored conversation is consistent; the count of answers by status."""
    ids = all_conversations(server)
    assert len(set(ids)) == len(ids)
    with requests.Session() as session:
        conversations = [session.get(f"{server.url}/conversations/{i}", timeout=30).json() for i in ids]
    statuses: Counter = Counter()
    for conversation in conversations:
        messages = conversation["messages"]
        # Every conversation here is one turn: the prompt and its answer.
        assert [m["role"] for m in messages] == ["user", "assistant"], conversation
        prompt, answer = messages
        assert answer["status"] in {"complete", "interrupted", "error"}, answer
        statuses[answer["status"]] += 1
        whole = full[prompt["content"]]
        assert whole.startswith(answer["content"]), (prompt["content"], answer)
        if answer["status"] == "complete":
            assert answer["content"] == whole and answer["finish_reason"] == "stop", answer
        elif answer["status"] == "interrupted":
            assert answer["error_code"] == "interrupted", answer
    return statuses, set(ids)


# -- the storm ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "worker_class, env",
    [("gevent", {}), ("gthread", {"THREADS": HOLD})],
    ids=["gevent", "gthread"],
)
def test_storm_of_disconnects(serve, worker_class, env):
    server = serve(worker_class, WEB_CONCURRENCY=1, **ENV, **env)
    port = int(server.url.rsplit(":", 1)[1])
    pid = worker_pid(server.process.pid)

    # Warm-up: streams dropped at once, then a whole answer of every kind, so that whatever is
    # made lazily (thread pool, metric files, ...) exists before the baseline is counted. The
    # whole answers to every prompt, from the blocking endpoint, are what the storm is held to.
    hold_streams(port, HOLD)
    whole_plans = [Plan(endpoint, PROMPTS[:2] if endpoint.endswith("/batch") else [PROMPTS[i % len(PROMPTS)]],
                        None, keep_alive=i % 2 == 0, reset=False) for i, endpoint in enumerate(ENDPOINTS)]
    with ThreadPoolExecutor(len(PROMPTS) + len(whole_plans)) as pool:
        blocking = [pool.submit(server.post, "/chat/blocking", json={"prompt": p}, headers={"Connection": "close"})
                    for p in PROMPTS]
        wholes = [pool.submit(run_client, port, plan) for plan in whole_plans]
        full = {}
        for prompt, future in zip(PROMPTS, blocking, strict=True):
            response = future.result()
            assert response.status_code == 200, response.text
            full[prompt] = response.json()["text"]
        for future in wholes:
            check_whole(future.result(), full)
    for prompt, text in full.items():  # what the demo says, for a first turn (in Chinese to Chinese)
        assert text.startswith((f'This is turn 1. You said: "{prompt}".', f"这是第 1 轮对话。你说：「{prompt}」。"))
    wait_for(lambda: in_flight(server) == 0, what="the warm-up's answers to end")
    baseline = quiet_usage(pid)

    # The storm.
    plans = make_plans(random.Random(SEED), CLIENTS)
    with ThreadPoolExecutor(POOL) as pool:
        outcomes = list(pool.map(lambda plan: run_client(port, plan), plans))

    wait_for(lambda: in_flight(server) == 0, timeout=30, what="every answer to stop")
    last: list[Usage] = []

    def back_to_baseline() -> bool:
        last[:] = [usage(pid)]
        return last[0] == Usage(baseline.fds, baseline.threads, 0)

    try:
        wait_for(back_to_baseline, timeout=20, what="the worker's fds and threads to return to the baseline")
    except AssertionError:
        extra = Counter(last[0].fd_targets) - Counter(baseline.fd_targets)
        gone = Counter(baseline.fd_targets) - Counter(last[0].fd_targets)
        message = f"baseline {baseline}, now {last[0]}; new fds {dict(extra)}, closed {dict(gone)}"
        raise AssertionError(message) from None

    # What the clients saw: no error status, and a whole answer for those that read to the end.
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {None, 200}, statuses
    for outcome in outcomes:
        if outcome.plan.budget is None or outcome.ended:
            check_whole(outcome, full)

    # What the store kept.
    stored, ids = check_conversations(server, full)
    seen = set().union(*(seen_conversations(o) for o in outcomes))
    assert seen <= ids
    assert stored["interrupted"] >= HOLD and stored["complete"] >= len(PROMPTS) + len(whole_plans), stored
    assert in_flight(server) == 0
    assert "Traceback" not in server.log.read_text()
