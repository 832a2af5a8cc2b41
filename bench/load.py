"""The load generator: thousands of concurrent SSE streams from one process (asyncio + aiohttp).

Each stream records its time to first byte, time to first `delta`, every gap between chunks that
carried a `delta`, its tokens and its error. It understands the service's typed SSE events
(`event: delta`, a `done` with usage), the OpenAI format (`data: {chunk}`, `data: [DONE]`) and the
baselines' one `data:` frame per token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Stream:
    """What one client saw. Times are seconds from the moment it started to connect."""

    started: float = 0.0  # perf_counter at the start, to line streams up against each other
    status: int = 0
    ttfb: float | None = None
    ttfd: float | None = None
    ended: float | None = None  # seconds after the start, when the body ended or was cut
    gaps: list[float] = field(default_factory=list)
    deltas: int = 0  # delta frames (each one or more tokens)
    tokens: int = 0  # from the `done` event's usage where there is one, else the delta frames
    complete: bool = False
    error: str | None = None


def _frame_kind(frame: bytes) -> str:
    """`delta`, `done`, `error`, `ping` or another event type, from one SSE frame's bytes."""
    if frame.startswith(b":"):
        return "ping"
    at = frame.find(b"event: ")
    if at >= 0:
        return frame[at + 7 : frame.index(b"\n", at)].decode()
    data = frame[frame.find(b"data: ") + 6 :]
    if data.startswith(b"[DONE]"):
        return "done"
    if data.startswith(b'{"error"'):
        return "error"
    has_text = b'"content":"' in data and b'"content":""' not in data  # not the role chunk
    return "delta" if has_text or b'"content": "' in data else "other"


def sse_events(buffer: bytes) -> tuple[list[tuple[int, dict]], bytes]:
    """(seq, event) of the service's whole SSE frames in `buffer`, and what is left of it."""
    *frames, rest = buffer.split(b"\n\n")
    events = []
    for frame in frames:
        fields = dict(line.split(": ", 1) for line in frame.decode().split("\n") if ": " in line)
        if "data" in fields:
            events.append((int(fields["id"].rsplit(":", 1)[1]), json.loads(fields["data"])))
    return events, rest


def _data(frame: bytes) -> dict:
    return json.loads(frame[frame.index(b"data: ") + 6 :].split(b"\n", 1)[0])


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    result: Stream,
    disconnect_after: int | None = None,
    body: dict | None = None,
) -> Stream:
    """Read one stream (GET `url`, or POST `body` as JSON) to its end, or for `disconnect_after` frames."""
    start = result.started = time.perf_counter()
    frames = 0
    last_delta = None
    try:
        request = session.get(url) if body is None else session.post(url, json=body)
        async with request as response:
            result.status = response.status
            if response.status != 200:
                result.error = f"HTTP {response.status}"
                return result
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter() - start
                if result.ttfb is None:
                    result.ttfb = now
                buffer += chunk
                *whole, buffer = buffer.split(b"\n\n")
                got_delta = False
                for frame in whole:
                    kind = _frame_kind(frame)
                    frames += kind != "ping"
                    if kind == "delta":
                        got_delta = True
                        result.deltas += 1
                    elif kind == "done":
                        result.complete = True
                        if frame.find(b"event: done") >= 0:
                            result.tokens = _data(frame)["usage"]["completion_tokens"]
                    elif kind == "error":
                        result.error = str(_data(frame).get("error", {}).get("code", "error"))
                if got_delta:
                    if last_delta is None:
                        result.ttfd = now
                    else:
                        result.gaps.append(now - last_delta)
                    last_delta = now
                if disconnect_after is not None and frames >= disconnect_after:
                    break
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.error = type(exc).__name__
    finally:
        result.ended = time.perf_counter() - start
        result.tokens = result.tokens or result.deltas
    return result


async def run_load(
    url: str,
    requests: int,
    concurrency: int,
    *,
    ramp_s: float = 0.0,
    window_s: float | None = None,
    disconnect_after: int | None = None,
    body: dict | None = None,
) -> list[Stream]:
    """`requests` streams of `url`, `concurrency` at a time, the first wave spread over `ramp_s`.

    With `window_s`, streams still open (or waiting) after that many seconds are cut off; they
    count as incomplete. Every stream is a new connection, like a new client."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=120)
    results = [Stream() for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        if ramp_s and i < concurrency:
            await asyncio.sleep(ramp_s * i / concurrency)
        async with gate:
            await one_stream(session, url, results[i], disconnect_after, body)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(i, session)) for i in range(requests)]
        done, pending = await asyncio.wait(tasks, timeout=window_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for stream in results:
        if not stream.complete and stream.error is None:
            stream.error = "cut off" if window_s else "incomplete"
    return results


def running_at_once(streams: list[Stream]) -> int:
    """The most streams that were between their first byte and their end at one moment."""
    edges = []
    for s in streams:
        if s.ttfb is not None and s.ended is not None:
            edges += [(s.started + s.ttfb, 1), (s.started + s.ended, -1)]
    peak = current = 0
    for _, step in sorted(edges):
        current += step
        peak = max(peak, current)
    return peak
