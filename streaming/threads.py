"""Threads under every worker class: under gevent (which patches `threading`) they are greenlets,
and a call that blocks in C without yielding to the hub needs a real thread instead."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


def under_gevent() -> bool:
    """Whether gevent has patched `threading` (the gevent worker), so threads are greenlets."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def start_thread(target: Callable[[], None], name: str) -> None:
    """Run `target` in a daemon thread. Under gevent it is a raw greenlet: `Thread.start()` waits
    for the new thread to say it runs, which switches to the hub and lets every other request run
    first (no response's first byte went out before all the requests that arrived with it had
    been set up), and a raw greenlet skips the bookkeeping of a `Greenlet` nobody joins."""
    if under_gevent():
        from gevent import spawn_raw

        spawn_raw(target)
    else:
        threading.Thread(target=target, name=name, daemon=True).start()


def in_real_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a real thread under gevent (from the hub's thread pool), so that a long call
    that blocks in C (a checkpoint of SQLite's log) does not stall every stream of the worker; a
    plain call otherwise. Handing a call over costs far more than a short query: keep it for
    long, rare ones."""
    if not under_gevent():
        return fn(*args)
    from gevent import get_hub

    return get_hub().threadpool.apply(fn, args)
