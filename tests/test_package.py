"""The distribution as a user gets it: the wheel built from this tree, installed into a fresh venv
(one per test session), and the examples run from it under real gunicorn."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


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
