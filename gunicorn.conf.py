"""gunicorn settings from the environment (12-factor): `gunicorn -c gunicorn.conf.py app:app`.

Imports here reach the master process, before gevent patches a worker, so nothing that gevent
must patch first (the OpenAI SDK, httpx2) is imported: `streaming.config` uses only `os`.
Never `--preload` with gevent.
"""

import os

from streaming.config import Settings

settings = Settings.from_env()

bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"]
worker_class = settings.worker_class
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn turns `sync` into gthread when threads > 1, so only gthread gets more than one.
threads = int(os.environ.get("THREADS", "32")) if worker_class == "gthread" else 1
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))  # gevent: streams per worker
# The sync worker heartbeats only between requests: a stream longer than `timeout` would get it
# killed, so there it must outlast the longest stream. gthread and gevent heartbeat on their own.
timeout = int(settings.max_stream_s + 30) if worker_class == "sync" else 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT_S", "30"))
keepalive = 5
accesslog = "-"
