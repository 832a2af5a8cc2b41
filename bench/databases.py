"""Real database servers for the tests and the benchmarks: a PostgreSQL cluster made in a
temporary directory, on a loopback port, stopped by its PID.

PostgreSQL refuses to run as root: as root (as in CI) `initdb` and `postgres` run as the
`postgres` user that Debian's package creates. The cluster speaks TLS with a certificate made
here, so that `sslmode=require` URLs are tested for real, and it records when each transaction
committed (`pg_xact_commit_timestamp`), so that a test can count the commits of its rows.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .server import free_port


def postgres_bin(name: str) -> str | None:
    """Debian keeps the server's programs off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def wait_ready(ready, what: str, timeout: float = 30) -> None:
    """Poll `ready()` (which raises if the server exited) until it holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not accept connections within {timeout:g} s")
        time.sleep(0.05)


def self_signed(key: Path, cert: Path) -> None:
    """A key (mode 0600) and a self-signed certificate for localhost, as the servers' TLS needs."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    os.chmod(key, 0o600)


def as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(as_postgres([postgres_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                    "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        self_signed(self.data / "server.key", self.data / "server.crt")
        if os.geteuid() == 0:
            for name in ("server.key", "server.crt"):
                shutil.chown(self.data / name, "postgres", "postgres")
        self.start()

    def url(self, database: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    def start(self) -> None:
        log = (self.dir / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            as_postgres([postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "ssl=on",
                         "-c", "track_commit_timestamp=on"]),
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_ready(self.ready, "PostgreSQL")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("postgres exited:\n" + (self.dir / "postgres.log").read_text())
        ready = [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(ready).returncode == 0

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster): every connection is cut, as in an outage."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.pid(), signal.SIGINT)
        self.process.wait(timeout=30)

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def installed(driver: str, program: str | None) -> bool:
    """Whether the Python driver imports and the server's program is there."""
    try:
        __import__(driver)
    except ImportError:
        return False
    return program is not None and shutil.which(program) is not None


def available() -> bool:
    return installed("psycopg", postgres_bin("initdb")) and (os.geteuid() != 0 or shutil.which("runuser") is not None)



class RedisServer:
    """`redis-server --save ''` on a loopback port (and with `tls`, a TLS port whose certificate
    is made here and self-signed, as Heroku Redis's is), stopped by its PID."""

    def __init__(self, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen | None = None
        if tls:
            self_signed(self.dir / "redis.key", self.dir / "redis.crt")
        self.start()

    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0" if self.tls else f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.dir / "redis.crt"),
                 "--tls-key-file", str(self.dir / "redis.key"), "--tls-auth-clients", "no"] if self.tls else [
                 "--port", str(self.port)]
        self.process = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )
        wait_ready(self.ready, "redis-server")

    def ready(self) -> bool:
        import redis

        if self.process.poll() is not None:
            raise RuntimeError("redis-server exited:\n" + (self.dir / "redis.log").read_text())

        client = redis.Redis.from_url(self.url() + ("?ssl_cert_reqs=none" if self.tls else ""), socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or an outage: everything in it is gone (`--save ''`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_available() -> bool:
    return installed("redis", "redis-server")
