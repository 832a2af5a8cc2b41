"""Real database servers for the tests: a PostgreSQL cluster each test session makes in a
temporary directory, on a loopback port, stopped by its PID.

PostgreSQL refuses to run as root: as root (as in CI) `initdb` and `postgres` run as the
`postgres` user that Debian's package creates. The cluster speaks TLS with a certificate made
here, so that `sslmode=require` URLs are tested for real.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

from .conftest import free_port, wait_for


def postgres_bin(name: str) -> str | None:
    """Debian keeps the server's programs off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


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
        subprocess.run(as_postgres(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                                    "-subj", "/CN=localhost", "-keyout", str(self.data / "server.key"),
                                    "-out", str(self.data / "server.crt")]), check=True, capture_output=True)
        os.chmod(self.data / "server.key", 0o600)
        self.start()

    def url(self, database: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    def start(self) -> None:
        log = (self.dir / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            as_postgres([postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "ssl=on"]),
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for(self.ready, timeout=30, what="PostgreSQL to accept connections")

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


def available() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return postgres_bin("initdb") is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until the process `pid` has exited (a SIGKILLed worker, say)."""
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=timeout, what=f"process {pid} to exit")

