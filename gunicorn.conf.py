"""gunicorn settings from the environment (12-factor): `gunicorn -c gunicorn.conf.py app:app`.

Imports here reach the master process, before gevent patches a worker. Importing `streaming`
brings in Flask and prometheus_client (gunicorn has imported `ssl` and `socket` there itself);
the OpenAI SDK and httpx2, which gevent must patch first, are imported only in the workers, by
`create_app()`. Never `--preload` with gevent.
"""

import os
import shutil
import sys
import tempfile

# Prometheus multiprocess mode: every worker writes its samples to one fresh directory, which
# must be named before anything imports prometheus_client (importing `streaming` does). One made
# here is removed when the master exits (see `on_exit`).
made_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if made_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="streaming-metrics-")

from streaming.config import Settings  # noqa: E402

settings = Settings.from_env()

bind = [settings.bind]
worker_class = settings.worker_class
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn turns `sync` into gthread when threads > 1, so only gthread gets more than one.
threads = int(os.environ.get("THREADS", "32")) if worker_class == "gthread" else 1
# The connections a worker holds at once: gevent's streams. A gthread worker accepts while it
# holds fewer than this, and past its threads it only queues them, each behind a whole stream,
# while another worker may have threads free: it takes its threads' worth and 8 idle keep-alive
# connections (a browser's), and leaves the rest in the listen backlog, to any worker.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", threads + 8 if worker_class == "gthread" else 1000))
# The sync worker heartbeats only between requests: a stream longer than `timeout` would get it
# killed, so there it must outlast the longest stream. gthread and gevent heartbeat on their own.
timeout = int(settings.max_stream_s + 30) if worker_class == "sync" else 30
graceful_timeout = int(settings.graceful_timeout_s)
keepalive = 5
# A GET carries its prompt in the request line: gunicorn's most (its default is 4094 bytes, a
# prompt of ~450 CJK characters). Its only larger setting, 0, has no limit at all; longer
# prompts go in a POST body, up to MAX_BODY_BYTES.
limit_request_line = 8190
# Off unless ACCESS_LOG names a file ("-" for stdout): each stream's JSON line says more, the
# host's router logs every request anyway, and the access line cost a tenth of a request's CPU.
accesslog = os.environ.get("ACCESS_LOG") or None
# gunicorn's control socket defaults to one path per user ($XDG_RUNTIME_DIR/gunicorn.ctl), which
# every instance on the machine would share: off unless CONTROL_SOCKET names one.
control_socket_disable = not settings.control_socket
if settings.control_socket:
    control_socket = settings.control_socket


def on_starting(server):
    """Refuse to start open to the network with a real model (see `Settings.refusal`), on the
    addresses gunicorn will really bind (`--bind` may have replaced `bind`). Then empty the
    metrics directory: samples left by an earlier run would be counted again."""
    refusal = settings.refusal(network_hosts(server))
    if refusal:
        server.log.error(refusal)
        on_exit(server)
        sys.exit(1)
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))


def network_hosts(server) -> list[str]:
    """The hosts of the TCP addresses gunicorn binds (a unix socket is reachable only here)."""
    return [address[0] for address in server.cfg.address if isinstance(address, tuple)]


def when_ready(server):
    where = ", ".join(str(listener) for listener in server.LISTENERS)
    access = settings.access(network_hosts(server))
    server.log.info("streaming: listening on %s, %s; LLM_PROVIDER=%s", where, access, settings.llm_provider)


def on_exit(server):
    """Remove the metrics directory made at start, unless a new master (`kill -USR2`) took it over:
    gunicorn keeps its listening sockets on the same condition."""
    if made_metrics_dir and server.reexec_pid == server.master_pid == 0:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Streams that a restart just ended may still be saving their turns (the timer below is a
    daemon, so that an idle worker exits at once): the worker waits for them before it ends."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["streaming"].shut_down(wait_s=1)


def post_worker_init(worker):
    """On SIGTERM (a dyno restart) gunicorn stops accepting and lets requests finish for
    `graceful_timeout` seconds before it kills the worker. Streams still running a moment before
    that are ended with an `error` event (code `shutdown`) and saved as interrupted, so that
    nothing is lost and no worker is killed mid-write.

    Then what the worker has loaded (Flask, the app, the SDK: tens of thousands of objects that
    live as long as it does) is frozen out of the garbage collector's reach: every full
    collection walked all of it, 25 ms about once a thousand requests, during which no stream
    of the worker moved. And the youngest generation is collected after 7,000 allocations
    instead of 700: each collection walks what the requests in flight hold, the same whether it
    comes after 700 or 7,000, so a tenth as many cost a third as much (see docs/performance.md)."""
    import gc
    import signal
    import threading

    service = worker.wsgi.extensions["streaming"]
    gunicorn_handler = signal.getsignal(signal.SIGTERM)
    deadline = max(graceful_timeout - 2, graceful_timeout / 2)

    def end_streams():
        service.shut_down(wait_s=1)

    def on_sigterm(signum, frame):
        # A response that ends from now on closes its connection: kept alive, it would hold the
        # worker for `keepalive` more seconds, past the graceful timeout when a stream ends late.
        worker.cfg.set("keepalive", 0)
        if worker_class == "gevent":  # the handler runs in the event loop: it must not block
            import gevent

            gevent.spawn_later(deadline, end_streams)
        else:  # a daemon: an idle worker must not wait for it before it exits
            timer = threading.Timer(deadline, end_streams)
            timer.daemon = True
            timer.start()
        gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
