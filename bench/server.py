"""Servers under test: the service under gunicorn, the baselines, and an upstream; their CPU and RSS.

CPU time and RSS are read from `/proc` for the whole process tree (master and workers).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile() -> int:
    """Lift the open-files limit to its hard limit (inherited by the servers we start)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (and their reaped children)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except OSError:
            pass
    return total / TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


class Server:
    """A server process started with `argv` and `env`; `url`, `pids()`, `cpu()`, `rss()`, `stop()`.

    `scratch`, a directory of its files, is removed when it stops."""

    def __init__(
        self, argv: list[str], env: dict[str, str], port: int, name: str, cwd: Path = ROOT, scratch: Path | None = None,
        health: str = "/healthz", start_s: float = 30,
    ) -> None:
        self.name = name
        self.scratch = scratch
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.process = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **env}, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        self._wait_healthy(health, start_s)

    def _wait_healthy(self, health: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + health, timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy")

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def pids(self) -> list[int]:
        return tree(self.process.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for pid in self.pids()[::-1]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.process.wait()
        self.log.unlink(missing_ok=True)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Checkout:
    """A checkout of the service, and variables it needs on top of the measure's (an older one may
    read a variable differently)."""

    root: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)


def pace_env(tokens: int, tokens_per_s: float, ttft_ms: float = 0) -> dict[str, str]:
    return {"DEMO_TOKENS": str(tokens), "DEMO_TOKENS_PER_S": str(tokens_per_s), "DEMO_TTFT_MS": str(ttft_ms)}


def service(worker_class: str, workers: int = 1, env: dict[str, str] | None = None, root: Path = ROOT) -> Server:
    """The service (the checkout at `root`) under gunicorn with `worker_class`, on a fresh SQLite file."""
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="bench-db-"))
    full = {
        "WORKER_CLASS": worker_class,
        "WEB_CONCURRENCY": str(workers),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATABASE_URL": f"sqlite:///{scratch / 'bench.db'}",
        **({"WORKER_CONNECTIONS": "12000"} if worker_class == "gevent" else {}),
        "THREADS": "32",
        "GRACEFUL_TIMEOUT_S": "3",
        "MAX_STREAMS_PER_WORKER": "100000",
        "MAX_STREAMS_PER_KEY": "0",  # no per-key limit (the baselines have none): no count of streaming rows
        **(env or {}),
    }
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--no-control-socket", "--backlog", "4096"]
    return Server([*argv, "app:app"], full, port, f"{worker_class}x{workers}", cwd=root, scratch=scratch)


def fastapi_baseline(env: dict[str, str]) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.baselines.fastapi_app:app", "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--log-level", "warning", "--backlog", "4096"]
    return Server(argv, env, port, "fastapi")


def flask_baseline(env: dict[str, str], app: str = "flask_app", scratch: Path | None = None) -> Server:
    """A Flask app of `bench/baselines` under gunicorn with one gevent worker and its defaults."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", "/dev/null", "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}"]
    argv += ["--no-control-socket", "--worker-connections", "12000", "--backlog", "4096"]
    return Server([*argv, f"bench.baselines.{app}:app"], env, port, app, scratch=scratch)


def flask_floor_baseline(env: dict[str, str]) -> Server:
    """`bench.baselines.flask_floor_app` (the design's floor) as the naive baseline runs, on a fresh SQLite file."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    return flask_baseline({**env, "FLOOR_DB": str(scratch / "floor.db")}, "flask_floor_app", scratch)


def upstream(tokens_per_s: float, tokens: int) -> Server:
    """The aiohttp OpenAI-format upstream of `bench.upstream`."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port)]
    env = {"UPSTREAM_TOKENS_PER_S": str(tokens_per_s), "UPSTREAM_TOKENS": str(tokens)}
    return Server(argv, env, port, "upstream")


def litellm(executable: Path, upstream_url: str) -> Server:
    """LiteLLM's proxy (`executable`, from a venv of its own: `pip install 'litellm[proxy]'`), one
    uvicorn worker, relaying the OpenAI-format upstream at `upstream_url` as model `bench`."""
    port = free_port()
    argv = [str(executable), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
            "--model", "openai/bench", "--alias", "bench", "--api_base", upstream_url + "/v1"]
    env = {"OPENAI_API_KEY": "bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}  # loopback, the bench only
    return Server(argv, env, port, "litellm", health="/health/liveliness", start_s=120)
