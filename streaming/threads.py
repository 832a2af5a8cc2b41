"""Threads under every worker class: under gevent (which patches `threading`) they are greenlets,
and a call that blocks in C without yielding to the hub needs a real thread instead."""

from __future__ import annotations

import os
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


class _Reused:
    """A thread that runs one target after another: it waits among the idle (`_IDLE`) between
    them, and ends once `MAX_IDLE` others wait already. (Not `concurrent.futures`' pool: its
    threads are bounded in number and joined at exit, and a producer may run for a whole stream.)"""

    MAX_IDLE = 64

    def __init__(self, target: Callable[[], None]) -> None:
        self.target: Callable[[], None] | None = target
        self.ready = threading.Lock()  # released when the next target is set
        self.ready.acquire()

    def run(self) -> None:
        while True:
            self.target()
            self.target = None
            with _IDLE_LOCK:  # (real threads: two that end together must not both take the last place)
                if len(_IDLE) >= self.MAX_IDLE:
                    return
                _IDLE.append(self)
            self.ready.acquire()


_IDLE: list[_Reused] = []
_IDLE_LOCK = threading.Lock()


def _forget_parents_threads() -> None:
    """In a forked child: none of the parent's threads came along, nor whoever held the lock."""
    global _IDLE_LOCK
    _IDLE.clear()
    _IDLE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_parents_threads)


def run_soon(target: Callable[[], None]) -> None:
    """Run `target` in a daemon thread (a greenlet under gevent), reusing one whose last target
    has returned: for the many short threads of requests (an answer's producer), each of which
    cost a new thread (about 12 us under gevent, 90 us of a real one) and its first stack.
    A target that raises ends its thread, as `start_thread`'s does."""
    try:
        thread = _IDLE.pop()
    except IndexError:
        start_thread(_Reused(target).run, "reused")
    else:
        thread.target = target
        thread.ready.release()


def in_real_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a real thread under gevent (from the hub's thread pool), so that a long call
    that blocks in C (a checkpoint of SQLite's log) does not stall every stream of the worker; a
    plain call otherwise. Handing a call over costs far more than a short query: keep it for
    long, rare ones."""
    if not under_gevent():
        return fn(*args)
    from gevent import get_hub

    return get_hub().threadpool.apply(fn, args)
