"""The four measures (P1-P4), each a function that starts its servers, runs its load and returns rows.

A row is a dict of column -> value; `bench.report` prints them. Percentiles are of all streams:
a stream that never got its first byte counts as infinitely late.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import floor
from . import server as srv
from .load import Stream, run_load, running_at_once

SSE = "/chat/sse?prompt=bench"
# One token: the demo's answer quotes the prompt (seven tokens for "bench"); the baselines answer one token.
ONE_TOKEN = SSE + "&max_tokens=1"
V1 = "/v1/chat/completions"
# What an SDK sends for a streamed answer with a few of its knobs.
V1_BODY = {"model": "demo", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 100,
           "temperature": 0.5, "user": "bench", "messages": [{"role": "user", "content": "bench"}]}


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Run:
    streams: list[Stream]
    cpu_s: float
    wall_s: float
    rss_before: int
    rss_peak: int

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def completed(self) -> int:
        return sum(s.complete and s.error is None for s in self.streams)

    def errors(self) -> str:
        counts = Counter(s.error for s in self.streams if s.error)
        return ", ".join(f"{n} {e}" for e, n in counts.most_common(3)) or "-"

    def ms(self, attr: str, q: float) -> float:
        return 1000 * pct([math.inf if getattr(s, attr) is None else getattr(s, attr) for s in self.streams], q)

    def gap_ms(self, q: float) -> float:
        return 1000 * pct([g for s in self.streams for g in s.gaps], q)


async def _load(server: srv.Server, path: str, requests: int, concurrency: int, **kwargs) -> Run:
    pids = server.pids()
    rss_before, cpu_before = srv.rss_bytes(pids), srv.cpu_seconds(pids)
    peak = rss_before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, srv.rss_bytes(pids))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    start = time.perf_counter()
    streams = await run_load(server.url + path, requests, concurrency, **kwargs)
    wall = time.perf_counter() - start
    sampler.cancel()
    await asyncio.sleep(0.3)  # the server finishes its bookkeeping (turns saved, logs written)
    return Run(streams, srv.cpu_seconds(pids) - cpu_before, wall, rss_before, peak)


def load(server: srv.Server, path: str, requests: int, concurrency: int, **kwargs) -> Run:
    return asyncio.run(_load(server, path, requests, concurrency, **kwargs))


# More configurations of the service for P1 and P2, by name: `python -m bench --postgres` adds
# "service, PostgreSQL" (its DATABASE_URL) here.
VARIANTS: dict[str, srv.Checkout] = {}
# More baselines, by name: `python -m bench --floor` adds the design's floor (bench/baselines/flask_floor_app.py).
MORE_BASELINES: dict[str, Callable[[dict[str, str]], srv.Server]] = {}


def _contenders(env: dict[str, str], before: srv.Checkout | None,
                baselines: bool = True) -> dict[str, Callable[[], srv.Server]]:
    """Name -> how to start it: the service on one gevent worker (and the `before` checkout, and
    the VARIANTS), then the two baselines (unless not `baselines`), all with the demo's `env`."""
    checkouts = {"service": srv.Checkout(), **({"service (before)": before} if before else {}), **VARIANTS}
    starters = {
        name: (lambda co=co: srv.service("gevent", 1, {**env, **co.env}, co.root)) for name, co in checkouts.items()
    }
    if baselines:
        starters["fastapi baseline"] = lambda: srv.fastapi_baseline(env)
        starters["naive flask (gevent)"] = lambda: srv.flask_baseline(env)
        starters.update({name: (lambda start=start: start(env)) for name, start in MORE_BASELINES.items()})
    return starters


# -- P1 -----------------------------------------------------------------------------------------


def _cpu_rounds(env: dict[str, str], before: srv.Checkout | None, warm_up: int, requests: int, concurrency: int,
                rounds: int, cost: Callable[[Run], float], path: str = SSE,
                body: dict | None = None) -> tuple[dict[str, Run], dict[str, list[float]]]:
    """Every contender's last run of `path` and its `cost` in each round, after `warm_up` streams;
    rounds interleave the servers, so that noise hits them alike. The baselines serve SSE only."""
    starters = _contenders(env, before, baselines=path in (SSE, ONE_TOKEN))
    costs: dict[str, list[float]] = {name: [] for name in starters}
    runs: dict[str, Run] = {}
    for _ in range(rounds):
        for name, start in starters.items():
            with start() as server:
                load(server, path, warm_up, concurrency, body=body)
                run = runs[name] = load(server, path, requests, concurrency, body=body)
                costs[name].append(cost(run))
    return runs, costs


def p1_cost(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """Server CPU seconds per million tokens: 2,000-token answers at full speed, 8 at a time."""
    requests, rounds = (16, 1) if quick else (40, 3)
    runs, costs = _cpu_rounds(srv.pace_env(2000, 0), before, 8, requests, 8, rounds,
                              lambda run: run.cpu_s / max(run.tokens, 1) * 1e6)
    base = pct(costs["fastapi baseline"], 0.5)
    return [
        {
            "server": name,
            "streams": len(run.streams),
            "complete": run.completed,
            "tokens": run.tokens,
            "CPU s / M tokens": pct(costs[name], 0.5),
            "all rounds": " ".join(f"{c:.1f}" for c in costs[name]),
            "x baseline": pct(costs[name], 0.5) / base,
            "errors": run.errors(),
        }
        for name, run in runs.items()
    ]


def request_cost(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """Server CPU milliseconds per request: 2,000 one-token answers, 50 at a time (a burst of
    reconnecting browsers pays this for every one of them)."""
    requests, rounds = (400, 1) if quick else (2000, 3)
    runs, costs = _cpu_rounds(srv.pace_env(1, 0), before, 100, requests, 50, rounds,
                              lambda run: run.cpu_s / max(run.completed, 1) * 1000, ONE_TOKEN)
    return _cost_rows(runs, costs, pct(costs["naive flask (gevent)"], 0.5))


def request_cost_v1(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """`request` on /v1/chat/completions with an SDK's body (`V1_BODY`): what the OpenAI-compatible
    API adds (the check against the SDK's types, the messages, the chunks), the service against
    its `before` checkout only."""
    requests, rounds = (400, 1) if quick else (2000, 3)
    runs, costs = _cpu_rounds(srv.pace_env(1, 0), before, 100, requests, 50, rounds,
                              lambda run: run.cpu_s / max(run.completed, 1) * 1000, V1, V1_BODY)
    return _cost_rows(runs, costs)


def _cost_rows(runs: dict[str, Run], costs: dict[str, list[float]], naive: float | None = None) -> list[dict]:
    """A row a server: its median CPU ms per request, every round's, and (given naive Flask's
    median) the ratio to it."""
    rows = []
    for name, run in runs.items():
        row = {"server": name, "requests": len(run.streams), "complete": run.completed,
               "CPU ms / request": pct(costs[name], 0.5), "all rounds": " ".join(f"{c:.2f}" for c in costs[name])}
        if naive is not None:
            row["x naive flask"] = pct(costs[name], 0.5) / naive
        rows.append({**row, "errors": run.errors()})
    return rows


# -- P2 -----------------------------------------------------------------------------------------


def _concurrency_row(name: str, level: int, run: Run) -> dict:
    return {
        "server": name,
        "streams": level,
        "complete": run.completed,
        "TTFB p50 ms": run.ms("ttfb", 0.5),
        "TTFB p99 ms": run.ms("ttfb", 0.99),
        "gap p99 ms": run.gap_ms(0.99),
        "gap max ms": run.gap_ms(1.0),
        "KB RSS / stream": (run.rss_peak - run.rss_before) / level / 1024,
        "errors": run.errors(),
    }


def p2_concurrency(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """Paced streams (20 tokens/s, 100 tokens) on one gevent worker, up to 2,000 at once."""
    levels = [100, 500] if quick else [100, 500, 1000, 2000]
    env = srv.pace_env(60 if quick else 100, 20)
    starters = _contenders(env, before)
    rows = []
    for level in levels:
        for name, start in starters.items():
            with start() as server:
                load(server, SSE, 20, 20)  # warm up
                rows.append(_concurrency_row(name, level, load(server, SSE, level, level, ramp_s=level / 2000)))
    return rows


def p2_ten_thousand(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """10,000 concurrent streams on two gevent workers (2 tokens/s, 30 tokens: 15 s each)."""
    level = 10_000
    with srv.service("gevent", 2, srv.pace_env(30, 2)) as server:
        load(server, SSE, 20, 20)
        return [_concurrency_row("service, 2 gevent workers", level, load(server, SSE, level, level, ramp_s=5))]


# -- P3 -----------------------------------------------------------------------------------------


# LiteLLM's proxy (the `litellm` executable of a venv of its own, `--litellm PATH`), relayed in P3
# beside the service when set.
LITELLM: Path | None = None


def _relay_row(name: str, level: int, start: str, direct: Run, relayed: Run) -> dict:
    return {
        "server": name,
        "streams": level,
        "start": start,
        "complete": f"{relayed.completed}/{len(relayed.streams)}",
        "TTFT p50 ms direct": direct.ms("ttfd", 0.5),
        "TTFT p50 ms relayed": relayed.ms("ttfd", 0.5),
        "added p50 ms": relayed.ms("ttfd", 0.5) - direct.ms("ttfd", 0.5),
        "TTFT p99 ms direct": direct.ms("ttfd", 0.99),
        "TTFT p99 ms relayed": relayed.ms("ttfd", 0.99),
        "added p99 ms": relayed.ms("ttfd", 0.99) - direct.ms("ttfd", 0.99),
        "CPU s / M tokens relayed": relayed.cpu_s / max(relayed.tokens, 1) * 1e6,
        "errors": relayed.errors(),
    }


def _floor(upstream: srv.Server, streams: int, client: str) -> Run:
    """`streams` answers read at once by one gevent process with `client` and no server (bench/floor.py)."""
    out = subprocess.run([sys.executable, "-m", "bench.floor", upstream.url, str(streams), client], cwd=srv.ROOT,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    result = json.loads(out)
    streams_seen = [Stream(ttfb=s["ttft"], ttfd=s["ttft"], ended=s["end"], tokens=s["tokens"], error=s["error"],
                           complete=s["error"] is None and s["tokens"] > 0) for s in result["streams"]]
    return Run(streams_seen, result["cpu_s"], max(s["end"] for s in result["streams"]), 0, 0)


def p3_relay(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """The OpenAI provider relaying a local upstream at 50 tokens/s, against going straight to it
    (measured again next to each relay, so that both see the same machine): the clients of each
    level connecting over level / 200 s, then the top level's clients all at once, three times
    (and their median); LiteLLM's proxy beside it with `--litellm`. Then the floor of the top
    level started at once: the same answers read by one gevent process with no server in front
    (bench/floor.py), through the SDK as documented, this service's provider alone, and httpx."""
    levels = [1, 50] if quick else [1, 50, 200]
    tokens, runs = (50, 1) if quick else (100, 3)
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "bench"}]}
    checkouts = {"service": srv.Checkout(), **({"service (before)": before} if before else {})}
    rows = []
    with srv.upstream(50, tokens) as upstream:
        env = {"LLM_PROVIDER": "openai", "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "bench"}
        relays = {name: (lambda co=co: srv.service("gevent", 1, {**env, **co.env}, co.root), SSE, None)
                  for name, co in checkouts.items()}
        if LITELLM:
            relays["LiteLLM proxy"] = (lambda: srv.litellm(LITELLM, upstream.url), "/v1/chat/completions", body)

        def side_by_side(relay: srv.Server, path: str, relay_body: dict | None, level: int, ramp: float):
            requests = 20 if level == 1 else level
            direct = load(upstream, "/v1/chat/completions", requests, level, ramp_s=ramp, body=body)
            return direct, load(relay, path, requests, level, ramp_s=ramp, body=relay_body)

        for name, (start, path, relay_body) in relays.items():
            with start() as relay:
                load(relay, path, 5, 5, body=relay_body)
                for level in levels:
                    rows.append(_relay_row(name, level, f"over {level / 200:g} s",
                                           *side_by_side(relay, path, relay_body, level, level / 200)))
                rows += _together(name, levels[-1], runs,
                                  lambda r=relay, p=path, b=relay_body: side_by_side(r, p, b, levels[-1], 0))
        for client in floor.CLIENTS:
            def floor_run(client: str = client) -> tuple[Run, Run]:
                direct = load(upstream, "/v1/chat/completions", levels[-1], levels[-1], body=body)
                return direct, _floor(upstream, levels[-1], client)
            rows += _together(f"floor: {client}, no server", levels[-1], runs, floor_run)
    return rows


def _together(name: str, level: int, runs: int, side_by_side: Callable[[], tuple[Run, Run]]) -> list[dict]:
    """`runs` rows of `level` streams started at once (direct, then relayed), and their median."""
    rows = [_relay_row(name, level, f"together, run {i + 1}", *side_by_side()) for i in range(runs)]
    if runs > 1:
        median = {"server": name, "streams": level, "start": f"together, median of {runs}"}
        for key in ("added p50 ms", "added p99 ms", "CPU s / M tokens relayed"):
            median[key] = pct([row[key] for row in rows], 0.5)
        rows.append(median)
    return rows


# -- P4 -----------------------------------------------------------------------------------------

P4_CONFIGS = [("sync", 2), ("gthread", 2), ("gevent", 1), ("gevent", 2)]


def p4_contrast(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """Worker classes side by side: 2-second streams (20 tokens/s, 40 tokens), cut off after a window."""
    levels = [10, 100] if quick else [10, 100, 1000]
    window = 5.0 if quick else 10.0
    rows = []
    for worker_class, workers in P4_CONFIGS:
        for level in levels:
            with srv.service(worker_class, workers, srv.pace_env(40, 20)) as server:
                run = load(server, SSE, level, level, ramp_s=level / 2000, window_s=window)
                name = f"{worker_class} x{workers}" + (" x32 threads" if worker_class == "gthread" else "")
                rows.append(
                    {
                        "workers": name,
                        "streams": level,
                        "running at once": running_at_once(run.streams),
                        f"complete in {window:g} s": run.completed,
                        "TTFB p50 ms": run.ms("ttfb", 0.5),
                        "TTFB p99 ms": run.ms("ttfb", 0.99),
                        "gap p99 ms": run.gap_ms(0.99),
                    }
                )
    return rows


from .slow_clients import slow_clients  # noqa: E402
from .storm import p_burst, p_stop, p_storm  # noqa: E402

MEASURES = {
    "p1": ("P1 cost per token", p1_cost),
    "request": ("Cost per request: one-token answers, 50 at a time", request_cost),
    "request-v1": ("Cost per /v1 request: an SDK's streamed body, one-token answers, 50 at a time", request_cost_v1),
    "p2": ("P2 concurrency, one gevent worker", p2_concurrency),
    "p4": ("P4 worker classes", p4_contrast),
    "p3": ("P3 relay overhead", p3_relay),
    "p2-10k": ("P2 10,000 streams", p2_ten_thousand),
    "storm": ("Reconnect storm, host A to host B (PostgreSQL + Redis)", p_storm),
    "burst": ("Reconnect burst: 2,000 streams resumed on the same worker (embedded) and on another host "
              "(PostgreSQL + Redis), against P2", p_burst),
    "stop": ("Stop across hosts, sent to B for answers on A (PostgreSQL + Redis)", p_stop),
    "slow": ("Slow clients: normal requests while connections drip their headers", slow_clients),
}
