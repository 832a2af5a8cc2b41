"""Reconnects with `Last-Event-ID`, and two hosts (one gevent worker each) sharing PostgreSQL and
Redis, as behind a router that sends each request anywhere.

- The reconnect storm: live SSE streams on host A whose clients all drop within a second and
  reconnect to host B with `Last-Event-ID`. A stream counts as resumed when the text it read on A,
  followed by the text it read on B, is exactly the answer as saved (no gap, no duplicate), and
  B's ids continue A's.
- The reconnect burst: the storm at P2's size and pace (2,000 streams on one gevent worker), on
  the embedded default (the clients come back to the same worker) and scaled out (to another
  host), beside P2's own first bytes on the same server in the same run.
- Stop across hosts: `POST /conversations/<id>/stop` sent to B for answers streaming on A; the time
  until A's client reads the `stopped` error event, and until B answers with the saved turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp

from . import server as srv
from .databases import PostgresCluster, RedisServer
from .load import run_load, sse_events


@dataclass
class Hop:
    conversation_id: str = ""
    message_id: str = ""
    text_a: str = ""
    text_b: str = ""
    last_seq: int = -1
    ended_on_a: bool = False  # the answer ended before the drop: its client had no reason to reconnect
    ids_continue: bool = True
    ttfb: float | None = None  # seconds from the reconnect to B's first byte
    resumed_after: float | None = None  # seconds from the reconnect to B's first event
    resumed_at: float | None = None  # perf_counter of B's first event
    ended_at: float | None = None  # perf_counter when B's stream ended
    error: str | None = None


async def hop(session: aiohttp.ClientSession, a: str, b: str, drop: asyncio.Event, spread_s: float,
              hop_: Hop) -> None:
    try:
        async with session.get(a + "/chat/sse?prompt=storm") as response:
            if response.status != 200:
                hop_.error = f"HTTP {response.status} on A"
                return
            buffer = b""
            async for chunk in response.content.iter_any():
                events, buffer = sse_events(buffer + chunk)
                for seq, event in events:
                    hop_.last_seq = seq
                    if event["type"] == "start":
                        hop_.conversation_id, hop_.message_id = event["conversation_id"], event["message_id"]
                    elif event["type"] == "delta":
                        hop_.text_a += event["text"]
                if drop.is_set():
                    break
            else:
                hop_.ended_on_a = True
                return
        await asyncio.sleep(random.uniform(0, spread_s))  # every client reconnects within the second
        asked = time.perf_counter()
        headers = {"Last-Event-ID": f"{hop_.message_id}:{hop_.last_seq}"}
        async with session.get(b + "/chat/sse", headers=headers) as response:
            if response.status != 200:
                hop_.error = f"HTTP {response.status} {await refusal(response)}".rstrip()
                return
            buffer, previous = b"", hop_.last_seq
            async for chunk in response.content.iter_any():
                if hop_.ttfb is None:
                    hop_.ttfb = time.perf_counter() - asked
                events, buffer = sse_events(buffer + chunk)
                for seq, event in events:
                    if hop_.resumed_after is None:
                        hop_.resumed_at = time.perf_counter()
                        hop_.resumed_after = hop_.resumed_at - asked
                    hop_.ids_continue &= seq > previous
                    previous = seq
                    if event["type"] == "delta":
                        hop_.text_b += event["text"]
                    elif event["type"] == "error":
                        hop_.error = event["error"]["code"]
        hop_.ended_at = time.perf_counter()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        hop_.error = type(exc).__name__


async def refusal(response: aiohttp.ClientResponse) -> str:
    """The error code of a refusal's JSON body (`store_unavailable`, ...), or "" when it has none."""
    try:
        return (await response.json())["error"]["code"]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return ""


async def _storm(a: srv.Server, b: srv.Server, streams: int, read_s: float) -> tuple[list[Hop], float, float, float]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=120)
    hops, drop = [Hop() for _ in range(streams)], asyncio.Event()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks, start = [], time.perf_counter()
        for i, one in enumerate(hops):  # clients arrive over a second, on a schedule that a busy loop does not stretch
            tasks.append(asyncio.create_task(hop(session, a.url, b.url, drop, 1.0, one)))
            await asyncio.sleep(max(0.0, start + (i + 1) / streams - time.perf_counter()))
        await asyncio.sleep(max(0.0, start + 1.0 + read_s - time.perf_counter()))
        cpu_before, dropped = b.cpu(), time.perf_counter()
        drop.set()
        await asyncio.gather(*tasks)
        cpu_b = b.cpu() - cpu_before
        saved = {}
        for one in hops:
            if one.conversation_id:
                async with session.get(f"{b.url}/conversations/{one.conversation_id}") as response:
                    saved[one.message_id] = (await response.json())["messages"][-1]["content"]
    for one in hops:
        whole = saved.get(one.message_id, "")
        read = len(one.text_a) + len(one.text_b)
        if one.error is None and one.text_a + one.text_b != whole:
            one.error = "duplicate" if read > len(whole) else "gap" if read < len(whole) else "other text"
    last = max((one.resumed_at - dropped for one in hops if one.resumed_at is not None), default=math.nan)
    return hops, dropped, cpu_b, last


def in_burst(hops: list[Hop]) -> list[Hop]:
    """The hops whose answer started on A and was still streaming when their client dropped."""
    return [one for one in hops if one.message_id and not one.ended_on_a]


def errors(hops: list[Hop]) -> dict[str, int]:
    """How many hops failed, by why: `gap`, `duplicate`, `ids out of order`, an HTTP status, ..."""
    counts: dict[str, int] = {}
    for one in hops:
        if one.error or not one.ids_continue:
            why = one.error or "ids out of order"
            counts[why] = counts.get(why, 0) + 1
    return counts


@contextlib.contextmanager
def two_hosts(env: dict, checkout: srv.Checkout | None = None) -> Iterator[tuple[srv.Server, srv.Server]]:
    """Hosts A and B, one gevent worker each (of `checkout`, this one unless given), on a PostgreSQL
    cluster and a redis-server of their own."""
    checkout = checkout or srv.Checkout()
    cluster, redis = PostgresCluster(), RedisServer()
    try:
        env = {**env, "DATABASE_URL": cluster.url(cluster.create_database()), "REDIS_URL": redis.url(),
               "MAX_STREAMS_PER_KEY": "0", **checkout.env}
        with srv.service("gevent", 1, env, checkout.root) as a, srv.service("gevent", 1, env, checkout.root) as b:
            yield a, b
    finally:
        cluster.remove()
        redis.remove()


def p_storm(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """1,000 live SSE streams on A (20 tokens/s, 200 tokens), dropped after 2 s and resumed on B."""
    streams = 200 if quick else 1000
    with two_hosts({**srv.pace_env(200, 20), "RESUME_GRACE_S": "30"}) as (a, b):
        hops, _, cpu_b, last = asyncio.run(_storm(a, b, streams, read_s=2.0))
    waits = sorted(one.resumed_after for one in hops if one.resumed_after is not None)
    return [{
        "streams": streams,
        "resumed, no gap or duplicate": len(in_burst(hops)) - sum(errors(in_burst(hops)).values()),
        "ended before the drop, or refused on A": streams - len(in_burst(hops)),
        "first event on B p50 ms": _ms(waits, 0.5),
        "first event on B p99 ms": _ms(waits, 0.99),
        "last resumed, s after the drop": last,
        "B's CPU s": cpu_b,
        "errors": _listed(errors(hops)),
    }]


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {e}" for e, n in counts.items()) or "-"


def _ms(seconds: list[float], q: float) -> float | None:
    return 1000 * seconds[min(len(seconds) - 1, int(len(seconds) * q))] if seconds else None


BURST_STREAMS = 2000


@dataclass
class Burst:
    """One round of the burst on one configuration: P2's streams, then the burst's hops."""

    p2_ttfb: list[float]  # seconds; a stream with no first byte is infinitely late
    p2_complete: int
    hops: list[Hop]
    last: float  # seconds from the drop until the last resumed stream had its next event
    cpu_s: float  # the resuming server's CPU during the burst

    def row(self) -> dict:
        dropped = in_burst(self.hops)
        counts = errors(dropped)
        ttfb = sorted(math.inf if one.ttfb is None else one.ttfb for one in dropped)
        p99, p2_p99 = _ms(ttfb, 0.99), _ms(sorted(self.p2_ttfb), 0.99)
        return {
            "streams": len(self.hops),
            "refused on A": sum(not one.message_id for one in self.hops),
            "dropped live": len(dropped),
            "resumed, no gap or duplicate": len(dropped) - sum(counts.values()),
            "gaps": counts.get("gap", 0),
            "duplicates": counts.get("duplicate", 0),
            "reconnect TTFB p50 ms": _ms(ttfb, 0.5),
            "reconnect TTFB p99 ms": p99,
            "P2 TTFB p99 ms": p2_p99,
            "reconnect / P2 TTFB p99": p99 / p2_p99 if math.isfinite(p2_p99) else math.nan,
            "last has its next event, s after the drop": self.last,
            "CPU s of the burst": self.cpu_s,
            "P2 complete": self.p2_complete,
            "errors": _listed(counts),
        }


def burst(a: srv.Server, b: srv.Server, streams: int, read_s: float) -> Burst:
    """P2's load on A (`streams` at once, connecting over streams / 2000 s, read to the end), then
    the burst: as many live streams on A, dropped after `read_s` and resumed on B within a second."""
    p2 = asyncio.run(run_load(a.url + "/chat/sse?prompt=bench", streams, streams, ramp_s=streams / 2000))
    hops, _, cpu_s, last = asyncio.run(_storm(a, b, streams, read_s))
    ttfb = [math.inf if s.ttfb is None else s.ttfb for s in p2]
    return Burst(ttfb, sum(s.complete and s.error is None for s in p2), hops, last, cpu_s)


def burst_rows(name: str, rounds: list[Burst]) -> list[dict]:
    """Each round's row, and the median of the rounds' moving figures when there are several."""
    rows = [{"server": f"{name}, round {i + 1}", **one.row()} for i, one in enumerate(rounds)]
    if len(rows) > 1:
        median = {"server": f"{name}, median"}
        for key in ("reconnect TTFB p99 ms", "P2 TTFB p99 ms", "reconnect / P2 TTFB p99",
                    "last has its next event, s after the drop"):
            median[key] = sorted(row[key] for row in rows)[len(rows) // 2]
        rows.append(median)
    return rows


def p_burst(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """2,000 live SSE streams on one gevent worker (P2's: 20 tokens/s, 100 tokens, the guard
    lifted) dropped after 2 s and resumed with `Last-Event-ID` within a second: on the embedded
    default by the same worker, and on PostgreSQL + Redis by another host (also at half the size:
    at 2,000 starting within a second, A's store pool refused some with a 503 until issue 18); three
    rounds each. With `before`, that checkout's scaled-out rows follow, on servers of their own."""
    streams, rounds = (200, 1) if quick else (BURST_STREAMS, 3)
    env = {**srv.pace_env(100, 20), "RESUME_GRACE_S": "30"}
    with srv.service("gevent", 1, env) as one:
        rows = burst_rows("embedded, same worker", [burst(one, one, streams, 2.0) for _ in range(rounds)])
    for name, checkout in {"": srv.Checkout(), **({" (before)": before} if before else {})}.items():
        with two_hosts(env, checkout) as (a, b):
            for size in dict.fromkeys([streams // 2, streams]):
                rows += burst_rows(f"PostgreSQL + Redis{name}, host A to B, {size}",
                                   [burst(a, b, size, 2.0) for _ in range(rounds)])
    return rows


async def _stop_one(session: aiohttp.ClientSession, a: str, b: str, spread_s: float) -> tuple[float, float, str]:
    """Start an answer on A, stop it through B: (s until A's stream ended, s until B answered, outcome)."""
    async with session.get(a + "/chat/sse?prompt=stop") as response:
        buffer, conversation_id, stop, asked = b"", None, None, 0.0
        ended, outcome = time.perf_counter(), "no end event"
        async for chunk in response.content.iter_any():
            events, buffer = sse_events(buffer + chunk)
            for _, event in events:
                if event["type"] == "start":
                    conversation_id = event["conversation_id"]
                elif event["type"] == "delta" and stop is None:
                    await asyncio.sleep(random.uniform(0, spread_s))
                    asked = time.perf_counter()
                    stop = asyncio.create_task(session.post(f"{b}/conversations/{conversation_id}/stop"))
                elif event["type"] in ("done", "error"):
                    ended = time.perf_counter()
                    outcome = event["type"] if event["type"] == "done" else event["error"]["code"]
    answer = await stop
    answered = time.perf_counter()
    outcome += "" if answer.status == 200 else f", B answered HTTP {answer.status}"
    answer.release()
    return ended - asked, answered - asked, outcome


async def _stops(a: srv.Server, b: srv.Server, streams: int) -> list[tuple[float, float, str]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(_stop_one(session, a.url, b.url, 1.0) for _ in range(streams)))


def p_stop(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """100 answers streaming on A (20 tokens/s, 200 tokens), each stopped through B within a second
    of its first token."""
    streams = 20 if quick else 100
    with two_hosts(srv.pace_env(200, 20)) as (a, b):
        results = asyncio.run(_stops(a, b, streams))
    ended = sorted(r[0] for r in results)
    answered = sorted(r[1] for r in results)
    outcomes: dict[str, int] = {}
    for *_, outcome in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return [{
        "streams": streams,
        "ended `stopped` on A": outcomes.get("stopped", 0),
        "A's stream ended p50 ms": _ms(ended, 0.5),
        "p99 ms": _ms(ended, 0.99),
        "max ms": _ms(ended, 1.0),
        "B answered p50 ms": _ms(answered, 0.5),
        "B answered p99 ms": _ms(answered, 0.99),
        "outcomes": ", ".join(f"{n} {o}" for o, n in outcomes.items()),
    }]
