"""`run_soon`'s reused threads, in-process (real threads; the gevent worker is covered end to end)."""

from __future__ import annotations

import os
import queue
import select
import threading

from streaming import threads

from .conftest import wait_for


def ran_in(q: queue.Queue):
    return lambda: q.put(threading.get_ident())


def test_a_thread_whose_target_returned_runs_the_next_one():
    q: queue.Queue = queue.Queue()
    threads.run_soon(ran_in(q))
    first = q.get(timeout=10)
    wait_for(lambda: threads._IDLE, what="the thread to wait among the idle")
    threads.run_soon(ran_in(q))
    assert q.get(timeout=10) == first


def test_a_target_that_raises_ends_its_thread_and_the_next_target_still_runs(monkeypatch):
    raised: queue.Queue = queue.Queue()
    monkeypatch.setattr(threading, "excepthook", raised.put)  # (instead of printing the traceback)
    threads._IDLE.clear()

    def fails():
        raise RuntimeError("boom")

    threads.run_soon(fails)
    assert raised.get(timeout=10).exc_type is RuntimeError  # it reached the thread's top, as before
    assert not threads._IDLE  # that thread did not wait for another target
    q: queue.Queue = queue.Queue()
    threads.run_soon(ran_in(q))
    assert q.get(timeout=10)


def test_no_more_than_max_idle_threads_wait():
    threads._IDLE.clear()
    release, ended = threading.Event(), queue.Queue()
    many = threads._Reused.MAX_IDLE + 5
    for _ in range(many):
        threads.run_soon(lambda: (release.wait(10), ended.put(1)))
    release.set()
    for _ in range(many):
        ended.get(timeout=10)
    # The extra ones end instead of waiting.
    wait_for(lambda: len(threads._IDLE) == threads._Reused.MAX_IDLE, what="the idle threads to settle")
    alive = threading.active_count()
    threads.run_soon(lambda: None)  # (one of the idle runs it: no new thread)
    wait_for(lambda: len(threads._IDLE) == threads._Reused.MAX_IDLE, what="the thread to be idle again")
    assert threading.active_count() == alive


def test_a_forked_child_runs_targets_though_its_parents_idle_threads_did_not_come_with_it():
    q: queue.Queue = queue.Queue()
    threads.run_soon(ran_in(q))
    q.get(timeout=10)
    wait_for(lambda: threads._IDLE, what="a thread waiting among the idle")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a target handed to a thread that does not exist here would never run
        try:
            threads.run_soon(lambda: os.write(write, b"ran"))
            threading.Event().wait(10)
        finally:
            os._exit(0)
    try:
        assert select.select([read], [], [], 10)[0], "the child's target never ran"
        assert os.read(read, 3) == b"ran"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
