"""Fixtures shared by every test tier.

Node.js receivers: ``tests/node`` holds a small npm project whose ``seed_receiver.js`` runs the
webhook documentation's own Express handler and ``verifySignature`` code, because that is the
code our users' receivers run. ``node_modules`` installs it once per session; ``seed_receiver``
starts one receiver per call and stops them all at teardown.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from helpers import SeedReceiver, StartSeedReceiver

NODE_PROJECT_DIR = Path(__file__).parent / "node"
SEED_RECEIVER_SCRIPT = NODE_PROJECT_DIR / "seed_receiver.js"

NPM_INSTALL_TIMEOUT_SECONDS = 600.0
RECEIVER_START_TIMEOUT_SECONDS = 15.0

# tests/postgres_fixtures.py: postgres_server (a throw-away cluster per session), postgres_url.
pytest_plugins = ["postgres_fixtures"]

# Written inside node_modules after a successful install; its mtime says when that was.
_INSTALL_STAMP = ".webhookd-installed"


def _missing_tool(reason: str) -> NoReturn:
    """Skip on a developer's machine, fail on CI (CI set): CI must run the Node.js tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class NodeToolchain:
    """Where ``node`` is, and the npm project in tests/node with its packages installed."""

    node: str
    project_dir: Path

    @property
    def node_modules(self) -> Path:
        return self.project_dir / "node_modules"


def _install_is_current(project_dir: Path) -> bool:
    stamp = project_dir / "node_modules" / _INSTALL_STAMP
    if not stamp.exists():
        return False
    manifests = [project_dir / "package.json", project_dir / "package-lock.json"]
    newest = max(m.stat().st_mtime for m in manifests if m.exists())
    return stamp.stat().st_mtime >= newest


def _npm_install(npm: str, project_dir: Path) -> None:
    has_lock = (project_dir / "package-lock.json").exists()
    command = [npm, "ci" if has_lock else "install", "--no-audit", "--no-fund"]
    try:
        result = subprocess.run(
            command,
            cwd=project_dir,
            capture_output=True,
            text=True,
            timeout=NPM_INSTALL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"`{' '.join(command)}` in {project_dir} took over {NPM_INSTALL_TIMEOUT_SECONDS:.0f}s;"
            " check that the npm registry is reachable",
            pytrace=False,
        )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        pytest.fail(
            f"`{' '.join(command)}` in {project_dir} exited {result.returncode}; run it there to"
            f" see why. Output tail:\n{output}",
            pytrace=False,
        )
    (project_dir / "node_modules" / _INSTALL_STAMP).touch()


@pytest.fixture(scope="session")
def node_modules() -> NodeToolchain:
    """Find node and npm; install tests/node's packages if missing or older than the lock file.

    Skips when node is absent, unless CI is set, then fails. A file lock keeps concurrent
    pytest processes from running npm in the same directory at once.
    """
    node = shutil.which("node")
    if node is None:
        _missing_tool("Node.js is not installed (no `node` on PATH); the Node.js receivers need it")
    project_dir = NODE_PROJECT_DIR
    if _install_is_current(project_dir):
        return NodeToolchain(node=node, project_dir=project_dir)
    key = hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"webhookd-npm-install-{key}.lock"
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not _install_is_current(project_dir):  # another process may have just done it
                npm = shutil.which("npm")
                if npm is None:
                    _missing_tool(f"npm is not installed; it is needed to install {project_dir}")
                _npm_install(npm, project_dir)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return NodeToolchain(node=node, project_dir=project_dir)


@pytest.fixture
def seed_receiver(
    node_modules: NodeToolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartSeedReceiver]:
    """A factory: ``seed_receiver(secret, *, response_plan=None, port=0) -> SeedReceiver``.

    Starts ``node tests/node/seed_receiver.js`` on 127.0.0.1 (``port=0``: a free port) with
    WEBHOOK_SIGNING_SECRET=secret and waits for it to listen. ``response_plan`` becomes its
    RESPONSE_PLAN, e.g. ``{"fail_first": 2, "status": 500}``. Every receiver is stopped at
    teardown.
    """
    started: list[SeedReceiver] = []

    def start(
        secret: str, *, response_plan: Mapping[str, Any] | None = None, port: int = 0
    ) -> SeedReceiver:
        record_dir = tmp_path_factory.mktemp("seed-receiver")
        record_file = record_dir / "records.jsonl"
        env = {
            **os.environ,
            "WEBHOOK_SIGNING_SECRET": secret,
            "PORT": str(port),
            "RECORD_FILE": str(record_file),
        }
        env.pop("RESPONSE_PLAN", None)
        if response_plan is not None:
            env["RESPONSE_PLAN"] = json.dumps(response_plan)
        process = subprocess.Popen(
            [node_modules.node, str(SEED_RECEIVER_SCRIPT)],
            cwd=node_modules.project_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        receiver = SeedReceiver(process, record_file, secret)
        started.append(receiver)
        if not receiver.wait_until_listening(RECEIVER_START_TIMEOUT_SECONDS):
            exit_code = process.poll()
            receiver.stop()
            why = (
                f"did not print LISTENING within {RECEIVER_START_TIMEOUT_SECONDS:.0f}s"
                if exit_code is None
                else f"exited with code {exit_code} before listening"
            )
            pytest.fail(f"the seed receiver {why}. Its output:\n{receiver.output()}", pytrace=False)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()
