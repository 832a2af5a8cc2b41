"""The distribution as a user gets it: the wheel built from this tree, installed into a fresh venv
(one per test session), and the examples run from it under real gunicorn."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from .conftest import ROOT, Server, free_port, start_gunicorn, wait_for
from .streams import read_sse


def quietly(command: list) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree (a build writes `build/` beside its sources)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "streaming", tree / "streaming", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    quietly([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, tree])
    return next(dist.glob("flask_llm_streaming-*.whl"))


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies, and nothing of this tree on its path."""
    home = tmp_path_factory.mktemp("venv")
    quietly([sys.executable, "-m", "venv", home])
    quietly([home / "bin" / "pip", "install", "-q", f"{wheel}[openai]"])
    return home


def run(venv: Path, code: str) -> str:
    """`code` run by the venv's Python outside this tree; its stdout."""
    done = subprocess.run([venv / "bin" / "python", "-c", code], cwd=venv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_holds_the_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"streaming/static/app.js", "streaming/static/style.css"} <= names
    assert any(name.startswith("streaming/templates/") and name.endswith("index.html") for name in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "Name: flask-llm-streaming" in metadata
    for extra in ("openai", "anthropic", "postgres", "redis"):
        assert f"Provides-Extra: {extra}" in metadata


def test_importing_the_package_configures_nothing(venv):
    out = run(venv, """
import logging, sys
import streaming
print(streaming.__file__)
assert not logging.getLogger().handlers, logging.getLogger().handlers
assert not logging.getLogger("streaming.streams").handlers
assert logging.logThreads
assert "gevent.monkey" not in sys.modules and "openai" not in sys.modules
app = streaming.create_app()  # the service's own app sets up its logging, and only then
assert logging.getLogger("streaming.streams").handlers
""")
    assert str(venv) in out  # the installed copy, not this tree's


@pytest.fixture
def example(venv, tmp_path):
    """`example(module, **env)`: examples/<module>.py under the venv's gunicorn (gevent), run from
    a folder holding only the examples, so that `streaming` can come from the wheel alone."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    servers: list[Server] = []

    def start(module: str, ready: str, **env: str) -> Server:
        port = free_port()
        full_env = {**os.environ, "DEMO_TTFT_MS": "0", "DEMO_TOKENS_PER_S": "0", **env}
        full_env.pop("PYTHONPATH", None)
        args = ["-k", "gevent", "--no-control-socket", "-b", f"127.0.0.1:{port}", f"{module}:app"]
        server = start_gunicorn(tmp_path, args, port,
                                full_env, cwd=tmp_path / "examples", python=str(venv / "bin" / "python"),
                                ready=ready)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(quick=True)


def test_the_login_example_keeps_each_users_conversations_apart(example):
    server = example("login_app", "/")
    alice, bob = requests.Session(), requests.Session()
    assert alice.post(server.url + "/ai/chat/blocking", json={"prompt": "hi"}, timeout=30).status_code == 401
    alice.get(server.url + "/login?user=alice", timeout=30)
    bob.get(server.url + "/login?user=bob", timeout=30)
    got = read_sse(server.url + "/ai/chat/sse", json_body={"prompt": "alice asks"}, headers=cookies(alice))
    conversation_id = got.events[0]["conversation_id"]
    assert got.events[-1]["type"] == "done"
    listed = alice.get(server.url + "/ai/conversations", timeout=30).json()["conversations"]
    assert [c["id"] for c in listed] == [conversation_id]
    assert bob.get(server.url + "/ai/conversations", timeout=30).json()["conversations"] == []
    assert bob.get(server.url + f"/ai/conversations/{conversation_id}", timeout=30).status_code == 404
    page = alice.get(server.url + "/ai/", timeout=30)
    assert 'data-base="/ai"' in page.text
    assert alice.get(server.url + "/ai/static/app.js", timeout=30).status_code == 200  # from the wheel


def cookies(session: requests.Session) -> dict:
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in session.cookies.items())}


def test_the_stream_example_heartbeats_and_closes_its_generator(example):
    server = example("stream_app", "/story")
    wait_for(lambda: "the generator was closed" in server.log.read_text(), what="the readiness probe's generator")
    probes = server.log.read_text().count("the generator was closed")
    response = requests.get(server.url + "/story", stream=True, timeout=30)
    seen = b""
    for chunk in response.raw.stream(65536, decode_content=False):
        seen += chunk
        if b"event: delta" in seen:
            break
    assert b": ping\n\n" in seen.split(b"event: delta")[0]  # heartbeats while the generator slept
    response.close()  # the client leaves mid-story
    wait_for(lambda: server.log.read_text().count("the generator was closed") > probes,
             what="the generator's finally")
