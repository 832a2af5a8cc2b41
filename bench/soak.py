"""The soak: `python -m bench --soak [MINUTES]` (20 by default).

Two gevent workers under a steady mixed load: SSE, plain text, `/v1` streamed and whole, batches,
clients that leave mid-answer, reconnects with `Last-Event-ID`, and a few bad requests. Each of
`clients` clients starts its next request as soon as its last one ended; with 100-token answers
at 20 tokens/s, 500 clients keep about 500 streams open: half of P2's 1,000.

Every `SAMPLE_S` it reads each worker's RSS, open descriptors and threads (greenlets, under
gevent, are not threads: the streams in flight stand for them) from `/proc`; per minute, the
requests, 5xx, TTFB p99 and gap p99. At the end every conversation a client touched is read back
and compared with what the client read: a finished answer exactly, an abandoned one as its start,
and none may be left `streaming`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import server as srv
from .load import sse_events
from .measures import pct

SAMPLE_S = 5.0
KINDS = {  # kind -> its share of the requests
    "sse": 35, "text": 15, "v1 stream": 10, "v1 whole": 5, "batch": 5, "leave": 12, "reconnect": 12, "bad": 6,
}


@dataclass
class Record:
    """One request (a reconnect: both of its connections) as its client saw it."""

    kind: str
    started: float  # seconds from the start of the soak
    status: int = 0
    ttfb: float | None = None
    gaps: list[float] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # conversation id -> the answer text read
    whole: bool = True  # the client read the answers to their end
    error: str | None = None


class Reading:
    """Times the chunks of one response into `record`: its first byte (from `asked`, when the
    request was sent) and the gaps between them."""

    def __init__(self, record: Record, asked: float) -> None:
        self.record, self.start, self.last = record, asked, None

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.record.ttfb is None:
            self.record.ttfb = now - self.start
        elif self.last is not None:
            self.record.gaps.append(now - self.last)
        self.last = now


async def read_sse(response: aiohttp.ClientResponse, record: Record, asked: float, stop_after: int | None = None,
                   conversation_id: str = "") -> tuple[str, int]:
    """Read an SSE answer (of `conversation_id`, when it is a reconnect) into `record`: (its
    conversation id, the last seq read); stops after `stop_after` deltas."""
    reading, buffer, seq, deltas = Reading(record, asked), b"", -1, 0
    async for chunk in response.content.iter_any():
        reading.chunk()
        events, buffer = sse_events(buffer + chunk)
        seq = events[-1][0] if events else seq
        for _, event in events:
            if event["type"] == "start":
                conversation_id = event["conversation_id"]
                record.answers.setdefault(conversation_id, "")
            elif event["type"] == "delta":
                record.answers[conversation_id] += event["text"]
                deltas += 1
            elif event["type"] == "error":
                record.error = event["error"]["code"]
        if stop_after is not None and deltas >= stop_after:
            record.whole = False
            break
    return conversation_id, seq


async def one(session: aiohttp.ClientSession, url: str, kind: str, record: Record, n: int) -> None:
    prompt = f"soak {kind} {n}"
    messages = [{"role": "user", "content": prompt}]
    asked = time.perf_counter()
    if kind in ("sse", "leave", "reconnect"):
        async with session.get(url + "/chat/sse", params={"prompt": prompt}) as response:
            record.status = response.status
            conversation_id, seq = await read_sse(response, record, asked, None if kind == "sse" else 5)
            message_id = response.headers.get("X-Message-Id", "")
        if kind == "reconnect" and not record.whole:
            async with session.get(url + "/chat/sse", headers={"Last-Event-ID": f"{message_id}:{seq}"}) as response:
                record.status = response.status
                if response.status != 200:  # a 204: the rest of the answer was lost
                    record.error = f"reconnect HTTP {response.status}"
                    return
                record.whole = True  # with the rest of the same answer:
                await read_sse(response, record, time.perf_counter(), conversation_id=conversation_id)
    elif kind == "text":
        async with session.get(url + "/chat", params={"prompt": prompt}) as response:
            record.status, reading, body = response.status, Reading(record, asked), b""
            async for chunk in response.content.iter_any():
                reading.chunk()
                body += chunk
            text = body.decode()
            if "\n[error] " in text:
                text, _, failure = text.partition("\n[error] ")
                record.error = failure.split(":", 1)[0]
            record.answers[response.headers["X-Conversation-Id"]] = text
    elif kind in ("v1 stream", "v1 whole"):
        body = {"model": "demo", "messages": messages, "stream": kind == "v1 stream"}
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            record.status, reading, raw = response.status, Reading(record, asked), b""
            async for chunk in response.content.iter_any():
                reading.chunk()
                raw += chunk
            if response.status != 200:
                return
            if kind == "v1 whole":
                text = json.loads(raw)["choices"][0]["message"]["content"]
            else:
                chunks = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
                record.error = next((c["error"].get("code", "error") for c in chunks if "error" in c), None)
            record.answers[response.headers["X-Conversation-Id"]] = text
    elif kind == "batch":
        async with session.post(url + "/batch", json={"prompts": [f"{prompt} {i}" for i in range(3)]}) as response:
            record.status, reading, buffer, by_index = response.status, Reading(record, asked), b"", {}
            async for chunk in response.content.iter_any():
                reading.chunk()
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in filter(None, lines):
                    event = json.loads(line)
                    if event["type"] == "start":
                        by_index[event["index"]] = event["conversation_id"]
                        record.answers[event["conversation_id"]] = ""
                    elif event["type"] == "delta":
                        record.answers[by_index[event["index"]]] += event["text"]
                    elif event["type"] == "error":
                        record.error = event["error"]["code"]
    else:  # bad requests: a missing prompt, an unknown conversation; each must be a 4xx
        if n % 2:
            response = await session.get(url + "/chat/sse")
        else:
            response = await session.post(url + "/chat/sse", json={"prompt": "x", "conversation_id": "nope"})
        record.status = response.status
        response.release()


async def client(session: aiohttp.ClientSession, url: str, until: float, t0: float, records: list[Record],
                 rng: random.Random) -> None:
    kinds, weights = list(KINDS), list(KINDS.values())
    n = 0
    while time.perf_counter() < until:
        kind = rng.choices(kinds, weights)[0]
        record = Record(kind, time.perf_counter() - t0)
        records.append(record)
        n += 1
        try:
            await one(session, url, kind, record, n)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            record.error = type(exc).__name__


def worker_sample(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


async def sampler(server: srv.Server, t0: float, samples: list[dict]) -> None:
    """Every `SAMPLE_S`, each worker's figures; and the client's own objects, collected and then
    frozen (`gc.freeze()`). The client keeps every request's record for the final check. Without
    the freeze, each of its full collections walks them all and stalls its event loop while every
    stream waits: 72 ms in the first minute, 298 ms in the eighth, and the soak's TTFB and gaps
    rose with them. After a freeze, a collection walks only what is new since the last one."""
    try:
        while True:
            gc.collect()
            gc.freeze()
            at = time.perf_counter() - t0
            for pid in server.pids()[1:]:  # the workers, not the master
                try:
                    samples.append({"at": at, "pid": pid, **worker_sample(pid)})
                except OSError:  # a worker that just exited
                    pass
            await asyncio.sleep(SAMPLE_S)
    finally:  # (cancelled at the end) what the soak held can be collected again
        gc.unfreeze()


async def check_conversations(url: str, records: list[Record]) -> tuple[int, int, list[str]]:
    """(conversations checked, left streaming, inconsistent ones: why) once every answer ended."""
    wanted: dict[str, list[tuple[str, bool]]] = {}
    for record in records:
        for conversation_id, text in record.answers.items():
            wanted.setdefault(conversation_id, []).append((text, record.whole and record.error is None))
    streaming, bad, at_once = 0, [], asyncio.Semaphore(50)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def check(conversation_id: str) -> None:
            async with at_once:  # the timeout counts from the request, not from a wait for a connection
                await check_one(conversation_id)

        async def check_one(conversation_id: str) -> None:
            nonlocal streaming
            deadline = time.monotonic() + 60  # an abandoned answer runs on for RESUME_GRACE_S
            while True:
                async with session.get(f"{url}/conversations/{conversation_id}") as response:
                    turns = (await response.json()).get("messages", []) if response.status == 200 else []
                answers = [m for m in turns if m["role"] == "assistant"]
                if not any(m["status"] == "streaming" for m in answers) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if any(m["status"] == "streaming" for m in answers):
                streaming += 1
            saved = answers[-1] if answers else None
            for text, whole in wanted[conversation_id]:
                if saved is None:
                    bad.append(f"{conversation_id}: no answer saved")
                elif whole and (saved["status"], saved["content"]) != ("complete", text):
                    bad.append(f"{conversation_id}: saved {saved['status']} {saved['content'][:40]!r},"
                               f" read {text[:40]!r}")
                elif not saved["content"].startswith(text):
                    bad.append(f"{conversation_id}: saved {saved['content'][:40]!r}, read {text[:40]!r}")

        await asyncio.gather(*(check(c) for c in wanted))
    return len(wanted), streaming, bad


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 3600 * sum((x - mx) * (y - my) for x, y in points) / var if var else math.nan


def minute_rows(records: list[Record]) -> list[dict]:
    rows = []
    for minute in range(int(max((r.started for r in records), default=0) // 60) + 1):
        mine = [r for r in records if minute * 60 <= r.started < (minute + 1) * 60]
        streamed = [r for r in mine if r.kind not in ("bad", "v1 whole")]  # a whole answer's first byte is its end
        rows.append({
            "minute": minute + 1,
            "requests": len(mine),
            "5xx": sum(r.status >= 500 for r in mine),
            "errors": sum(r.error is not None for r in mine),
            "TTFB p99 ms": 1000 * pct([math.inf if r.ttfb is None else r.ttfb for r in streamed], 0.99),
            "gap p99 ms": 1000 * pct([g for r in streamed for g in r.gaps], 0.99),
        })
    return rows


def soak(minutes: float, clients: int = 500, chart: Path | None = None, seed: int = 1) -> dict:
    """Run the soak; returns its rows: per minute, per worker, and a summary."""
    env = {**srv.pace_env(100, 20), "MAX_STREAMS_PER_KEY": "0"}
    with srv.service("gevent", 2, env) as server:
        records: list[Record] = []
        samples: list[dict] = []

        async def run() -> tuple[int, int, list[str]]:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=120)
            t0 = time.perf_counter()
            watching = asyncio.create_task(sampler(server, t0, samples))
            rng = random.Random(seed)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                tasks = []
                for _ in range(clients):  # clients arrive over the first 5 s
                    tasks.append(asyncio.create_task(
                        client(session, server.url, t0 + minutes * 60, t0, records, random.Random(rng.random()))))
                    await asyncio.sleep(5 / clients)
                await asyncio.gather(*tasks)
            watching.cancel()
            return await check_conversations(server.url, records)

        checked, streaming, inconsistent = asyncio.run(run())
    workers = []
    settle_s = min(120.0, minutes * 60 / 4)  # the first minutes fill caches and pools
    for pid in dict.fromkeys(s["pid"] for s in samples):
        mine = [s for s in samples if s["pid"] == pid]
        late = [s for s in mine if s["at"] >= settle_s]
        workers.append({
            "worker": pid,
            "samples": len(mine),
            "RSS MB first": mine[0]["rss_mb"],
            "RSS MB last": mine[-1]["rss_mb"],
            "RSS MB / hour": slope_per_hour([(s["at"], s["rss_mb"]) for s in late]),
            "fds first": mine[0]["fds"],
            "fds last": mine[-1]["fds"],
            "fds / hour": slope_per_hour([(s["at"], s["fds"]) for s in late]),
            "threads max": max(s["threads"] for s in mine),
        })
    bad_kinds = [r for r in records if r.kind == "bad"]
    kinds = {k: sum(r.kind == k for r in records) for k in KINDS}
    summary = {
        "minutes": minutes,
        "clients": clients,
        "requests": len(records),
        "by kind": ", ".join(f"{k} {n}" for k, n in kinds.items()),
        "5xx": sum(r.status >= 500 for r in records),
        "bad requests not 4xx": sum(not 400 <= r.status < 500 for r in bad_kinds),
        "stream errors": ", ".join(sorted({r.error for r in records if r.error})) or "-",
        "conversations checked": checked,
        "left streaming": streaming,
        "inconsistent": len(inconsistent),
    }
    result = {"summary": [summary], "kinds": kinds, "workers": workers, "minutes": minute_rows(records),
              "inconsistent": inconsistent[:20], "samples": samples}
    if chart is not None:
        soak_chart(result, chart)
    return result


def soak_chart(result: dict, path: Path) -> None:
    """Four panels against time: RSS, descriptors and threads of each worker; TTFB and gap p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for key, label, ax in zip(("rss_mb", "fds", "threads"), ("RSS (MB)", "open descriptors", "threads"), axes,
                              strict=False):
        for pid in dict.fromkeys(s["pid"] for s in result["samples"]):
            mine = [s for s in result["samples"] if s["pid"] == pid]
            ax.plot([s["at"] / 60 for s in mine], [s[key] for s in mine], label=f"worker {pid}")
        ax.set_title(label)
        ax.set_xlabel("minutes")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    rows = result["minutes"]
    for key in ("TTFB p99 ms", "gap p99 ms"):
        axes[3].plot([r["minute"] for r in rows], [r[key] if math.isfinite(r[key]) else float("nan") for r in rows],
                     marker="o", label=key)
    axes[3].set_title("per minute (ms)")
    axes[3].set_xlabel("minute")
    axes[3].legend()
    axes[3].grid(True, alpha=0.3)
    summary = result["summary"][0]
    fig.suptitle(f"Soak: {summary['clients']} clients, two gevent workers, {summary['minutes']:g} min,"
                 f" {summary['requests']} requests")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
