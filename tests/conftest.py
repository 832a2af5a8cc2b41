"""Real gunicorn servers on loopback ports, started per test with the environment it needs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
WORKER_CLASSES = ["sync", "gthread", "gevent"]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    env: dict

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def stop(self, quick: bool = False) -> None:
        """SIGTERM, a dyno's restart: gunicorn lets requests finish for GRACEFUL_TIMEOUT_S, and an
        idle keep-alive connection that a client left open holds a worker that long. A `quick`
        stop (SIGQUIT: the workers exit at once) is for the end of a test that is done with it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if quick else signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(tmp_path: Path, worker_class: str, env: dict | None = None, db: Path | None = None,
                 database_url: str | None = None) -> Server:
    port = free_port()
    full_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKER_CLASS": worker_class,
        "WEB_CONCURRENCY": "1",
        "THREADS": "8",
        "DATABASE_URL": f"sqlite:///{db}" if db else database_url or f"sqlite:///{tmp_path / 'test.db'}",
        "DEMO_TTFT_MS": "0",
        "DEMO_TOKENS_PER_S": "0",
        "GRACEFUL_TIMEOUT_S": "3",
        # An SSE answer whose client left stops at once, as it did before the grace had a default;
        # the tests of that default set it to "" (unset).
        "RESUME_GRACE_S": "0",
        **(env or {}),
    }
    return start_gunicorn(tmp_path, ["-c", "gunicorn.conf.py", "app:app"], port, full_env)


def start_gunicorn(tmp_path: Path, args: list[str], port: int, env: dict, cwd: Path = ROOT,
                   python: str = sys.executable, ready: str = "/healthz") -> Server:
    """gunicorn with `args`, listening on `port` (which `args` or `env` must name), once it answers
    `ready` with a 2xx (its headers: the body may be a stream)."""
    log = tmp_path / f"gunicorn-{env.get('WORKER_CLASS', '')}-{port}.log"
    process = subprocess.Popen(
        [python, "-m", "gunicorn", *args],
        cwd=cwd,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log, env)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{log.read_text()}")
        try:
            with requests.get(server.url + ready, timeout=5, stream=True) as response:
                return response.ok
        except requests.RequestException:  # not listening yet, or slow to boot on a busy machine
            return False

    wait_for(healthy, timeout=30, what=f"gunicorn to answer {ready}")
    return server


def needs(available: bool, message: str) -> None:
    """Skip a test whose server is not installed; fail it in CI, which installs every one."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def json_schema_validator() -> Callable[[object, dict], None]:
    """`validate(value, schema)` from jsonschema (formats checked too), which openai-agents
    brings (requirements-dev.txt): the test is skipped without it, failed in CI."""
    try:
        import jsonschema
    except ImportError:
        needs(False, "jsonschema is not installed (openai-agents brings it: pip install -r requirements-dev.txt)")
    return lambda value, schema: jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster for the whole session (bench/databases.py); each test that uses it
    makes its own database."""
    from bench.databases import PostgresCluster, available

    needs(available(), "PostgreSQL is not installed (apt-get install postgresql;"
                       " pip install -r requirements-postgres.txt)")
    cluster = PostgresCluster()
    yield cluster
    cluster.remove()


@pytest.fixture
def own_postgres():
    """A cluster of its own, for a test that stops it."""
    from bench.databases import PostgresCluster, available

    needs(available(), "PostgreSQL is not installed")
    cluster = PostgresCluster()
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server for the whole session (bench/databases.py); its keys are per answer, so
    tests do not see each other's."""
    from bench.databases import RedisServer, redis_available

    needs(redis_available(), "Redis is not installed (apt-get install redis-server;"
                             " pip install -r requirements-redis.txt)")
    server = RedisServer()
    yield server
    server.remove()


def store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of `kind` ("sqlite" or "postgres") for one test."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    cluster = request.getfixturevalue("postgres")
    return cluster.url(cluster.create_database())


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The store of the servers a test starts: SQLite, unless a module overrides this fixture
    (with `params=STORES`, to run its tests against each store)."""
    return f"sqlite:///{tmp_path / 'test.db'}"


STORES = ["sqlite", "postgres"]


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Server]]:
    """`serve(worker_class, **env)` starts a server that is stopped after the test."""
    servers: list[Server] = []

    def start(worker_class: str = "gevent", db: Path | None = None, **env: str) -> Server:
        server = start_server(tmp_path, worker_class, {k: str(v) for k, v in env.items()}, db, database_url)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(quick=True)
