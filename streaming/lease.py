"""Leases: how a process vouches for the answers it produces, so that a killed one is noticed.

One thread (a greenlet under gevent) per process, started with its first request
(`Service.ensure_running`):
- every second, asks the store whether a stop was requested for one of its answers (by
  `POST /conversations/<id>/stop` on another worker or host) and stops those, and tries again
  to save the turns whose save failed (the store was down or full);
- every `LEASE_S / 3`, in one batched write, renews the lease of every answer it produces and
  checkpoints the event log of those that grew, then saves the turns of dead workers (`reap`)
  as interrupted, `worker_lost`.

So a turn whose worker was SIGKILLed is saved within `LEASE_S` plus a third of it, with at least
what the answer had `LEASE_S` before the kill, and its conversation then takes new turns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .store import Store, StoreUnavailable
from .threads import start_thread

log = logging.getLogger(__name__)

STOPPED = "stopped"
STOP_POLL_S = 1.0


class Leaser:
    def __init__(self, store: Store, live: dict, lease_s: float) -> None:
        self.store = store
        self.live = live  # message id -> Answer, the process's answers in flight
        self.every_s = lease_s / 3
        self.unsaved: dict[str, Callable[[], None]] = {}  # message id -> the save to try again
        self.worker = ""
        self._sizes: dict[str, int] = {}  # the size of each answer's log at its last checkpoint

    def start(self, worker: str) -> None:
        """Start the thread of the process named `worker` (once per process)."""
        self.worker = worker
        start_thread(self._run, "leases")

    def _run(self) -> None:
        due = time.monotonic() + self.every_s  # the leases taken at the start of a turn last LEASE_S
        while True:
            time.sleep(min(STOP_POLL_S, self.every_s))
            try:
                self.stop_requested()
                self.save_again()
                if time.monotonic() >= due:
                    due = time.monotonic() + self.every_s
                    self.renew()
            except StoreUnavailable:
                pass  # logged by the store, once a minute
            except Exception:
                log.exception("renewing the leases failed")

    def stop_requested(self) -> None:
        if not self.live:
            return
        for message_id in self.store.stop_requests(self.worker):
            answer = self.live.get(message_id)
            if answer is not None:
                answer.stop(STOPPED, "the answer was stopped by request")

    def save_again(self) -> None:
        for message_id, save in list(self.unsaved.items()):
            save()
            del self.unsaved[message_id]

    def renew(self) -> None:
        live = list(self.live.items())
        sizes = {message_id: answer.size() for message_id, answer in live}
        answers = {m: answer.log() if self._sizes.get(m) != sizes[m] else None for m, answer in live}
        if answers:
            self.store.checkpoint(self.worker, answers)
        self._sizes = sizes
        self.store.reap()
