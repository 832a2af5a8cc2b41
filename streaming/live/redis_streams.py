"""Live answers in Redis Streams (`REDIS_URL`), so that a reader on any worker of any host
follows an answer as it is written, and a stop reaches its producer at once.

- **Publishing.** One thread per process flushes every `FLUSH_S` (20 times a second): for each
  answer it produces that grew, one `XADD` of the new events to `streaming:answer:<message_id>`,
  all answers in one pipelined round trip. An entry holds `seq`, the sequence number of its first
  event (so that an SSE id means the same on every host), and `events`, a JSON list; the first
  one also the answer's `owner` and `conversation_id`, so that a reconnect to another host finds
  a live answer without reading the store (in a reconnect burst, thousands of reads at once of a
  pool of a few connections). An ended
  answer's stream expires `REDIS_STREAM_TTL_S` after its last event (and any stream
  `MAX_STREAM_S` later than that, should that last EXPIRE be lost). After a failed flush (Redis
  restarted: its streams are gone) every answer is published again from its first event.
- **Reading.** A reader replays the stream with `XRANGE`, then one thread per process tails every
  stream its readers follow with one `XREAD BLOCK` on one connection, and hands each reader its
  entries. A reader looks at the store once its stream has been quiet for `LEASE_S / 3`, for
  what Redis cannot tell: an answer saved without its stream (Redis lost it) or the turn of a
  worker that died. Readers
  drop what they have seen already by `seq`, so entries read twice do no harm.
- **Stopping.** `PUBLISH streaming:stops <message_id>`; each process subscribes and stops the
  answer if it produces it (the store's stop flag stays as a fallback).

A local reader (on the producing worker) reads memory and may be up to `FLUSH_S` ahead of Redis:
a turn whose worker dies keeps what reached Redis, which is everything any other host was sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import Settings
from ..lease import STOPPED
from ..store import FailureLog, Log, Store, StoreUnavailable
from ..store.sql import decode_events, encode_log, load_log
from ..threads import start_thread
from .checkpoints import checkpointed_events

log = logging.getLogger(__name__)

FLUSH_S = 0.05
POOL_WAIT_S = 5.0
BLOCK_MS = 200
STOPS = "streaming:stops"
FAILED = object()  # handed to readers when Redis cannot be read


def stream_key(message_id: str) -> str:
    return f"streaming:answer:{message_id}"


def connect(settings: Settings, socket_timeout: float = 5):
    """A client for REDIS_URL that fails within seconds rather than hangs. A `rediss://` server's
    certificate is verified unless `REDIS_VERIFY_TLS=0` (or `?ssl_cert_reqs=none` in the URL):
    Heroku Redis's is self-signed.

    Its pool holds up to `REDIS_POOL_SIZE` connections, and a command waits up to
    `POOL_WAIT_S` for a free one. (redis-py's default pool refuses the 101st command in flight at
    once, `MaxConnectionsError`: in a reconnect burst of 2,000 streams, some resumes failed so.)"""
    import redis

    tls = {"ssl_cert_reqs": "none"} if settings.redis_url.startswith("rediss:") and not settings.redis_verify_tls \
        else {}
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max(1, settings.redis_pool_size), timeout=POOL_WAIT_S,
        decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=3, health_check_interval=30,
        **tls)
    return redis.Redis(connection_pool=pool)


@dataclass
class Reader:
    """One remote reader: the next sequence number it needs, and the batches handed to it."""

    offset: int
    batches: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def new(self, seq: int, events: list[dict]) -> list[dict]:
        """The part of an entry (events from `seq` on) that this reader has not had yet."""
        fresh = events[self.offset - seq:] if seq <= self.offset else events  # a gap cannot happen: see tail()
        self.offset = max(self.offset, seq + len(events))
        return fresh


def entry(fields: dict) -> tuple[int, list[dict]]:
    return int(fields["seq"]), decode_events(fields["events"])


class RedisLog:
    name = "redis"

    def __init__(self, settings: Settings, store: Store) -> None:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise RuntimeError("REDIS_URL is set: install its driver with"
                               " `pip install -r requirements.txt -r requirements-redis.txt`") from None
        self.settings = settings
        self.ttl_s = int(settings.redis_stream_ttl_s)
        self.live_ttl_s = int(settings.max_stream_s + settings.redis_stream_ttl_s)
        self.store_every_s = settings.lease_s / 3
        self.store = store
        self.failures = FailureLog("Redis")
        self.client = None
        self.live: dict = {}
        self._following: dict[str, object] = {}  # message id -> Answer, until its last event is flushed
        self._sent: dict[str, int] = {}  # message id -> events flushed
        self._readers: dict[str, list[Reader]] = {}  # stream key -> its readers on this process
        self._positions: dict[str, str] = {}  # stream key -> the last entry id read
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # -- per process ----------------------------------------------------------------------

    def start(self, worker: str, live: dict) -> None:
        self.client = connect(self.settings)
        self.live = live
        start_thread(self._flush_forever, "redis-flush")
        start_thread(self._read_forever, "redis-read")
        start_thread(self._stops_forever, "redis-stops")

    def follow(self, answer) -> None:
        self._following[answer.message_id] = answer

    def request_stop(self, message_id: str) -> None:
        self.store.request_stop(message_id)  # seen within a second even if the message is lost
        try:
            self.client.publish(STOPS, message_id)
        except Exception as exc:
            self.failures.failed("PUBLISH", exc)

    def check(self) -> dict:
        try:
            self.client.ping()
            return {"redis": {"reachable": True}}
        except Exception as exc:
            self.failures.failed("PING", exc)
            return {"redis": {"reachable": False}}

    def events(self, message_id: str) -> Log | None:
        try:
            entries = self.client.xrange(stream_key(message_id))
        except Exception as exc:
            self.failures.failed("XRANGE", exc)
            return None
        events: Log = []
        for _, fields in entries:
            events[int(fields["seq"]):] = load_log(fields["events"])
        return events or None

    # -- publishing -----------------------------------------------------------------------

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            if self._following:
                self.flush()

    def flush(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        flushed, finished = {}, []
        for message_id, answer in list(self._following.items()):
            ended, sent, size = answer.ended, self._sent.get(message_id, 0), answer.size()
            key = stream_key(message_id)
            if sent < 0:  # after a failure: start the stream again, whole
                pipe.delete(key)
                sent = 0
            if size > sent:
                fields = {"seq": sent, "events": encode_log(answer.log(sent, size))}
                if sent == 0:
                    fields.update(owner=answer.context["key_id"], conversation_id=answer.conversation_id)
                pipe.xadd(key, fields)
                pipe.expire(key, self.live_ttl_s)  # a key that missed its last EXPIRE goes all the same
                flushed[message_id] = size
            elif ended:  # ended before the previous flush read its size: its last event is in Redis
                pipe.expire(key, self.ttl_s)
                finished.append(message_id)
        if not len(pipe):
            return
        try:
            pipe.execute()
        except Exception as exc:
            self.failures.failed("publishing the answers", exc)
            for message_id in finished:  # their turns are in the store, where readers find them
                self._following.pop(message_id, None)
                self._sent.pop(message_id, None)
            for message_id in self._following:
                self._sent[message_id] = -1
            return
        self._sent.update(flushed)
        for message_id in finished:
            self._following.pop(message_id, None)
            self._sent.pop(message_id, None)

    # -- reading --------------------------------------------------------------------------

    def streaming_conversation(self, message_id: str, owner: str) -> str | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xrange(stream_key(message_id), count=1)
        pipe.xrevrange(stream_key(message_id), count=1)
        try:
            first, last = pipe.execute()
        except Exception as exc:
            self.failures.failed("XRANGE", exc)
            return None
        if not first or first[0][1].get("owner") != owner:  # not here, or not the owner's: the store tells
            return None
        if entry(last[0][1])[1][-1]["type"] in ("done", "error"):  # ended: the store has the rest
            return None
        return first[0][1]["conversation_id"]

    def tail(self, message_id: str, owner: str, offset: int, heartbeat_s: float) -> Iterator[list[dict]]:
        key, reader = stream_key(message_id), Reader(offset)
        try:
            replay = self.client.xrange(key)
        except Exception as exc:
            self.failures.failed("XRANGE", exc)
            yield from checkpointed_events(self.store, message_id, owner, reader.offset, heartbeat_s)
            return
        # Tailed from the last entry replayed: nothing added since is missed.
        self._register(key, reader, replay[-1][0] if replay else "0-0")
        try:
            batches = [entry(fields) for _, fields in replay]
            last_write = looked = time.monotonic()
            while True:
                for seq, events in batches:
                    fresh = reader.new(seq, events)
                    if fresh:
                        yield fresh
                        last_write = time.monotonic()
                        if fresh[-1]["type"] in ("done", "error"):
                            return
                now = time.monotonic()
                if now - looked >= self.store_every_s:  # quiet: what only the store knows
                    looked = now
                    try:
                        row = self.store.message(message_id, owner)
                    except StoreUnavailable:  # Redis alone goes on
                        row = {"status": "streaming"}
                    if row is None or row["status"] != "streaming":
                        rest = (row["events"][reader.offset:] or row["events"][-1:]) if row else []
                        if rest:
                            yield rest
                        return
                if now - last_write >= heartbeat_s:
                    yield []
                    last_write = now
                wait_s = max(0.01, min(last_write + heartbeat_s, looked + self.store_every_s) - time.monotonic())
                try:
                    got = reader.batches.get(timeout=wait_s)
                except queue.Empty:
                    batches = []
                    continue
                if got is FAILED:  # Redis went away: go on from the store's checkpoints
                    yield from checkpointed_events(self.store, message_id, owner, reader.offset, heartbeat_s)
                    return
                batches, looked = [got], time.monotonic()
                while not reader.batches.empty():
                    more = reader.batches.get()
                    if more is FAILED:
                        reader.batches.put(FAILED)  # seen at the next wait
                        break
                    batches.append(more)
        finally:
            self._unregister(key, reader)

    def _register(self, key: str, reader: Reader, after: str) -> None:
        """Follow `key` for `reader`, from the entry after `after` on."""
        with self._lock:
            self._readers.setdefault(key, []).append(reader)
            position = self._positions.get(key)
            # From the earliest position any reader needs: the others drop what they had.
            if position is None or position_key(after) < position_key(position):
                self._positions[key] = after
        self._wake.set()

    def _unregister(self, key: str, reader: Reader) -> None:
        with self._lock:
            readers = self._readers.get(key, [])
            if reader in readers:
                readers.remove(reader)
            if not readers:
                self._readers.pop(key, None)
                self._positions.pop(key, None)

    def _read_forever(self) -> None:
        """One blocking connection for every remote reader of this process."""
        blocking = connect(self.settings, socket_timeout=BLOCK_MS / 1000 + 5)
        while True:
            with self._lock:
                streams = dict(self._positions)
            if not streams:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                got = blocking.xread(streams, block=BLOCK_MS, count=1000)
            except Exception as exc:
                self.failures.failed("XREAD", exc)
                with self._lock:
                    everyone = [r for readers in self._readers.values() for r in readers]
                for reader in everyone:
                    reader.batches.put(FAILED)
                time.sleep(1.0)
                continue
            with self._lock:
                for key, entries in got or []:
                    for _, fields in entries:
                        batch = entry(fields)
                        for reader in self._readers.get(key, []):
                            reader.batches.put(batch)
                    # Unless a reader registered meanwhile moved it back to what it still needs.
                    if entries and self._positions.get(key) == streams.get(key):
                        self._positions[key] = entries[-1][0]

    # -- stopping -------------------------------------------------------------------------

    def _stops_forever(self) -> None:
        while True:
            try:
                pubsub = connect(self.settings).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(STOPS)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    answer = message and self.live.get(message["data"])
                    if answer:
                        answer.stop(STOPPED, "the answer was stopped by request")
            except Exception as exc:
                self.failures.failed("SUBSCRIBE", exc)
                time.sleep(1.0)


def position_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id (`<ms>-<n>`) in its order."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)

