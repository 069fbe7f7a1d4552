"""Helpers for integration tests that watch a running daemon as its operator would: import with
``from operator_fixtures import``.

- :func:`write_config_file` and :func:`webhookd` / :func:`run_webhookd`: the config file and the
  installed ``webhookd`` command, run beside the daemon under test.
- :func:`endpoint_state_gauge` and :func:`samples_by_label`: what the daemon's metrics say.
- :class:`LogEvents` (the ``log_events`` fixture in conftest.py), :func:`json_log_lines` and
  :func:`logged`: what the daemon logs, as structured events or as the JSON lines it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from helpers import toml_text
from prometheus_client.parser import text_string_to_metric_families

from webhookd.daemon import Daemon
from webhookd.log import _Formatter

H = TypeVar("H", bound=logging.Handler)

CLI_TIMEOUT_SECONDS = 60.0


# -- the config file and the command line ----------------------------------------------------


def write_config_file(
    path: Path,
    sections: Mapping[str, Mapping[str, Any]],
    endpoints: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``sections`` (``[name]`` tables) and ``endpoints`` (``[[endpoints]]`` tables) to
    ``path``: the TOML file ``webhookd --config`` reads. Returns ``path``."""
    path.write_text(toml_text({**sections, "endpoints": endpoints}), encoding="utf-8")
    return path


def webhookd_command() -> str:
    path = Path(sys.executable).parent / "webhookd"
    assert path.exists(), f"the webhookd console script is not installed next to {sys.executable}"
    return str(path)


async def run_webhookd(*args: str) -> tuple[int, str, str]:
    """Run the installed ``webhookd`` command with ``args``, as an operator would beside the
    daemon (without the test's ``WEBHOOKD_*`` environment); its exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}
    process = await asyncio.create_subprocess_exec(
        webhookd_command(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def webhookd(config: Path, *args: str) -> tuple[int, str, str]:
    """``webhookd --config CONFIG ARGS...``: see :func:`run_webhookd`."""
    return await run_webhookd("--config", str(config), *args)


# -- metrics ---------------------------------------------------------------------------------


def endpoint_state_gauge(daemon: Daemon, endpoint_id: str, state: str) -> float | None:
    """``webhookd_endpoint_state{endpoint, state}`` as the daemon exports it now."""
    value: float | None = daemon.metrics.registry.get_sample_value(
        "webhookd_endpoint_state", {"endpoint": endpoint_id, "state": state}
    )
    return value


def samples_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples called ``name`` in a Prometheus exposition ``text``, by their ``label``."""
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


# -- logs ------------------------------------------------------------------------------------


@contextlib.contextmanager
def capturing_logs(handler: H, level: int) -> Iterator[H]:
    """Attach ``handler`` to the ``webhookd`` logger, set to ``level``, for the block."""
    logger = logging.getLogger("webhookd")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class LogEvents(logging.Handler):
    """The daemon's structured log events: (event name, fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.getMessage(), dict(getattr(record, "webhookd_fields", {}))))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]

    def endpoint_state_moves(self) -> list[tuple[str, str]]:
        """``(from, to)`` of each ``endpoint_state_changed`` event, in order."""
        return [(c["from"], c["to"]) for c in self.named("endpoint_state_changed")]


@contextlib.contextmanager
def json_log_lines(level: int) -> Iterator[io.StringIO]:
    """The daemon's log lines at ``level`` and above, formatted as it writes them (JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter("json"))
    with capturing_logs(handler, level):
        yield stream


def logged(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``stream`` (see :func:`json_log_lines`) for ``event``."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]
