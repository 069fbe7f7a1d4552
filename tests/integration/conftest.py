"""Fixtures for the integration tier.

``js_json``: one long-lived ``node tests/node/roundtrip.js`` per session that answers what
JavaScript's ``JSON.parse``/``JSON.stringify`` make of a text, so property tests can check
thousands of documents against the real thing in a few seconds.

``log_events``: the daemon's structured log events during a test (see
:class:`operator_fixtures.LogEvents`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from operator_fixtures import LogEvents, capturing_logs

ROUNDTRIP_SCRIPT = Path(__file__).parent.parent / "node" / "roundtrip.js"
NODE_EXIT_TIMEOUT_SECONDS = 10.0


class JavaScriptJSON:
    """Ask a running Node.js what ``JSON.stringify(JSON.parse(text))`` gives.

    Each answer is a dict: ``ok`` (JSON.parse accepted it), ``out`` (the re-serialised text),
    ``unsafe`` (the value holds an integer beyond Number.isSafeInteger), ``decode_altered``
    (for bytes: decoding them as UTF-8 did not preserve them) and ``error`` when not ok.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        self._process = process
        self._stderr = stderr

    def texts(self, *texts: str) -> list[dict[str, Any]]:
        return self._ask([{"text": text} for text in texts])

    def bodies(self, *bodies: bytes) -> list[dict[str, Any]]:
        return self._ask([{"base64": base64.b64encode(body).decode()} for body in bodies])

    def _ask(self, requests: list[dict[str, str]]) -> list[dict[str, Any]]:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None
        assert stdout is not None
        # ensure_ascii: the pipe carries lone surrogates and U+2028 as escapes, unchanged.
        stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        stdin.flush()
        answers = []
        for _ in requests:
            line = stdout.readline()  # bytes split on b"\n" only, never on U+2028
            if not line:
                self._stderr.seek(0)
                errors = self._stderr.read().decode(errors="replace")
                raise RuntimeError(f"{ROUNDTRIP_SCRIPT.name} exited; its stderr:\n{errors}")
            answers.append(json.loads(line))
        return answers


@pytest.fixture(scope="session")
def js_json(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JavaScriptJSON]:
    """The session's Node.js JSON oracle. Skips without ``node``, unless CI is set: then fails."""
    node = shutil.which("node")
    if node is None:
        reason = "Node.js is not installed (no `node` on PATH); the JavaScript JSON checks need it"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(reason)
    stderr_path = tmp_path_factory.mktemp("node-roundtrip") / "stderr.log"
    with stderr_path.open("w+b") as stderr:
        process = subprocess.Popen(
            [node, str(ROUNDTRIP_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            yield JavaScriptJSON(process, stderr)
        finally:
            assert process.stdin is not None
            assert process.stdout is not None
            process.stdin.close()  # the script ends when stdin closes
            try:
                process.wait(timeout=NODE_EXIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


@pytest.fixture
def log_events() -> Iterator[LogEvents]:
    """Every event the daemon logs during the test, at every level."""
    with capturing_logs(LogEvents(), logging.DEBUG) as handler:
        yield handler
