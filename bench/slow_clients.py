"""Slow clients (`--only slow`): connections that send their request a header line every 2 s,
and how long a normal request waits meanwhile, per worker class (two workers, the default).

A dripping client never finishes its request. A gthread worker reads a request in one of its
`THREADS` threads (gunicorn waits up to 5 s for its first bytes, then reads it blocking, with no
deadline), and a sync worker reads it in its only thread: such clients hold them for as long as
they drip. gevent reads each one in a greenlet of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from . import server as srv

DRIP_S = 2.0
PROBE = b"GET /chat?prompt=probe HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


async def drip(port: int, stop: asyncio.Event) -> None:
    """A request that never ends: its request line, then one header line every DRIP_S."""
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /chat HTTP/1.1\r\nHost: bench\r\n")
            line = 0
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), DRIP_S)
                line += 1
                writer.write(f"X-Drip-{line}: still sending\r\n".encode())
                await writer.drain()
        finally:
            writer.close()


async def probe(port: int, timeout_s: float) -> float | None:
    """Seconds until a whole answer to a short GET /chat, or None past `timeout_s`."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PROBE)
            body = await reader.read()  # to the end: the server closes
            writer.close()
    except (TimeoutError, OSError):
        return None
    return time.monotonic() - start if body.startswith(b"HTTP/1.1 200") else None


async def _measure(port: int, drippers: int, settle_s: float, probe_s: float, timeout_s: float) -> list[float | None]:
    stop = asyncio.Event()
    dripping = [asyncio.create_task(drip(port, stop)) for _ in range(drippers)]
    await asyncio.sleep(settle_s)  # every dripper connected and taken by a worker, as far as it goes
    probes = []
    deadline = time.monotonic() + probe_s
    while time.monotonic() < deadline:  # one probe every half second, each on its own
        probes.append(asyncio.create_task(probe(port, timeout_s)))
        await asyncio.sleep(0.5)
    results = await asyncio.gather(*probes)
    stop.set()
    await asyncio.gather(*dripping)
    return results


def slow_clients(quick: bool, before: srv.Checkout | None = None) -> list[dict]:
    """Normal requests while N connections drip their headers, for sync, gthread and gevent."""
    from .measures import pct  # measures imports this module for its table of measures
    # Two gthread workers hold THREADS + 8 connections each (WORKER_CONNECTIONS), taken unevenly:
    # 64 drippers leave one of them threads to spare, 80 (both workers full) do not.
    levels = {"sync": [0, 2, 64], "gthread": [0, 64, 80], "gevent": [0, 80] if quick else [0, 80, 1000]}
    probe_s, timeout_s = (6.0, 5.0) if quick else (20.0, 10.0)
    rows = []
    for worker_class, counts in levels.items():
        for drippers in counts:
            with srv.service(worker_class, 2, srv.pace_env(5, 0)) as server:
                port = int(server.url.rsplit(":", 1)[1])
                results = asyncio.run(_measure(port, drippers, 3.0, probe_s, timeout_s))
            answered = [r for r in results if r is not None]
            rows.append({
                "worker class": f"{worker_class} x2",
                "dripping connections": drippers,
                "requests": len(results),
                "answered": len(answered),
                f"timed out ({timeout_s:.0f} s)": len(results) - len(answered),
                "p50 ms": 1000 * pct(answered, 0.5),
                "max ms": 1000 * max(answered, default=float("nan")),
            })
    return rows
