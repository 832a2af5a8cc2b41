"""Where gunicorn listens, who may use it, and what it refuses: real gunicorn, its log and exit code."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT, free_port, wait_for

REAL_MODEL = {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}


def gunicorn(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """gunicorn run to its end (a refusal, or `--print-config`), in an environment with none of
    the service's variables but `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in {"HOST", "PORT", "LLM_PROVIDER", "API_KEYS"}}
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "app:app"],
        cwd=ROOT, env={**clean, "DATABASE_URL": f"sqlite:///{tmp_path / 'test.db'}", **env},
        capture_output=True, text=True, timeout=60,
    )


def setting(tmp_path, name: str, **env: str) -> str:
    """A setting as gunicorn reads it from gunicorn.conf.py in `env` (`--print-config`)."""
    printed = gunicorn(tmp_path, "--print-config", **env).stdout
    return next(line.split("=", 1)[1].strip() for line in printed.splitlines() if line.split()[:1] == [name])


def bind_of(tmp_path, **env: str) -> str:
    return setting(tmp_path, "bind", **env)


def test_a_local_run_listens_on_loopback_and_a_platform_run_on_every_interface(tmp_path):
    assert bind_of(tmp_path) == "['127.0.0.1:8000']"
    assert bind_of(tmp_path, PORT="5123") == "['0.0.0.0:5123']"  # Heroku sets PORT and routes to the dyno
    assert bind_of(tmp_path, HOST="0.0.0.0") == "['0.0.0.0:8000']"
    assert bind_of(tmp_path, HOST="::1", PORT="5123") == "['[::1]:5123']"


def test_a_real_model_with_no_keys_beyond_loopback_refuses_to_start(tmp_path):
    port = str(free_port())
    for env in ({"PORT": port}, {"HOST": "0.0.0.0", "PORT": port}):
        run = gunicorn(tmp_path, **REAL_MODEL, **env)
        assert run.returncode == 1, run.stderr
        errors = [line for line in run.stderr.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1 and "refusing to start: LLM_PROVIDER=openai with no API_KEYS" in errors[0], run.stderr
        assert "ALLOW_OPEN=1" in errors[0] and "Traceback" not in run.stderr and "Booting worker" not in run.stderr
    run = gunicorn(tmp_path, "--bind", f"0.0.0.0:{port}", **REAL_MODEL)  # the check reads what gunicorn binds
    assert run.returncode == 1 and "refusing to start" in run.stderr, run.stderr


def listening_line(server) -> str:
    return next(line for line in server.log.read_text().splitlines() if "streaming: listening on" in line)


def test_the_start_up_log_says_where_it_listens_and_whether_it_is_open(serve):
    line = listening_line(serve())  # the tests' servers listen on 127.0.0.1
    assert "http://127.0.0.1:" in line and "open to this machine only (no API_KEYS)" in line
    line = listening_line(serve(HOST="", **REAL_MODEL, ALLOW_OPEN=1))  # HOST="" is unset: every interface
    assert "http://0.0.0.0:" in line and "open to anyone who reaches it (no API_KEYS)" in line
    line = listening_line(serve(HOST="0.0.0.0", **REAL_MODEL, API_KEYS="sk-a"))
    assert "API keys required" in line and "LLM_PROVIDER=openai" in line and "sk-a" not in line


def test_the_control_socket_is_off_unless_asked_for(serve, tmp_path):
    """gunicorn's default path is one per user, shared by every instance on the machine."""
    assert setting(tmp_path, "control_socket_disable") == "True"
    assert setting(tmp_path, "control_socket_disable", CONTROL_SOCKET="x.ctl") == "False"
    serve(CONTROL_SOCKET=tmp_path / "mine.ctl")  # the master makes it once its workers are up
    wait_for(lambda: (tmp_path / "mine.ctl").is_socket(), what="the control socket")
