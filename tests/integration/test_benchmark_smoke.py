"""The benchmark harness cannot rot: ``benchmarks/bench.py --smoke`` runs every scenario.

The harness runs the real ``webhookd run`` against its own receiver process, a few hundred events
per scenario. Its timing verdicts are printed, never asserted here (the machine is shared); what
must hold is that every delivery was received and recorded as succeeded in the store, and that
the report says so with figures that add up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from postgres_fixtures import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
HARNESS_TIMEOUT_SECONDS = 180.0
KILL_WAIT_SECONDS = 10.0
SCENARIOS = {"burst", "steady", "backlog", "hanging", "many"}


def run_script(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run a benchmark script in its own process group (on a timeout the daemons and the
    receiver it started go too); its exit status and output."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBHOOKD_")}
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=HARNESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=KILL_WAIT_SECONDS)
        pytest.fail(f"{args[0]} did not finish within {HARNESS_TIMEOUT_SECONDS} s:\n{stdout}")
    return proc.returncode, stdout


def test_smoke_run_delivers_and_records_every_delivery(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    returncode, output = run_script(
        [str(BENCH), "--smoke", "--json", str(report_path), "--keep", str(tmp_path / "work")],
        tmp_path,
    )
    assert returncode == 0, output
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["smoke"] is True
    assert report["all_recorded"] is True, output
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        assert scenario["all_recorded"] is True, (name, output)
        assert scenario["targets"], f"{name} printed no target"
        for run in scenario["runs"]:
            label = f"{name}/{run['label']}"
            assert run["error"] is None, (label, run["error"])
            assert run["expected"] > 0, label
            # The figures behind the verdict: the store recorded every delivery as succeeded
            # and the receiver got each of them, once.
            assert run["recorded"] == run["expected"], (label, run["states"])
            assert run["states"].get("succeeded") == run["expected"], (label, run["states"])
            assert run["received"] == run["expected"], label
            assert run["not_received"] == 0, label
            assert run["duplicates"] == 0, label
            assert run["deliveries_per_second"] > 0, label
            assert run["cpu_seconds"] > 0, label
            assert run["peak_rss_mb"] > 0, label
            assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"], label
            assert run["exit_codes"] == [0], (label, run["exit_codes"])
    # The hanging endpoint really hung: nothing of it succeeded, and the healthy one got all.
    beside = report["scenarios"]["hanging"]["runs"][1]
    assert beside["states"].get("succeeded (hanging)") is None, beside["states"]
    assert sum(n for s, n in beside["states"].items() if s.endswith("(hanging)")) > 0
    # The ceiling ran in the same run and posted every body.
    burst = report["scenarios"]["burst"]["runs"][0]
    assert burst["ceiling_rate"] > 0
    assert burst["ceiling_errors"] == 0
    assert burst["ratio_to_ceiling"] > 0
    assert "PASS" in output or "MISS" in output


def test_postgres_smoke_compares_one_and_two_replicas(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """``--store postgres --replicas 1 --replicas 2`` (issue 7's benchmark) on the test server:
    both runs record and receive every delivery, and the replica comparison is printed."""
    report_path = tmp_path / "report.json"
    returncode, stdout = run_script(
        [
            str(BENCH), "--smoke", "--scenario", "burst",
            "--store", "postgres", "--postgres-url", postgres_server.url("postgres"),
            "--replicas", "1", "--replicas", "2", "--json", str(report_path),
        ],
        tmp_path,
    )  # fmt: skip
    assert returncode == 0, stdout
    report = json.loads(report_path.read_text(encoding="utf-8"))
    runs = report["scenarios"]["burst"]["runs"]
    assert [run["replicas"] for run in runs] == [1, 2], runs
    for run in runs:
        assert run["recorded"] == run["expected"] > 0, run
        assert run["received"] == run["expected"], run
        assert run["exit_codes"] == [0] * run["replicas"], run
    assert "2 replicas vs 1" in stdout
    with postgres_server.admin() as conn:  # the harness dropped the databases it made
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%'")
        assert left.fetchall() == []


def test_smoke_burst_with_sender_processes(tmp_path: Path) -> None:
    """``--sender-processes 2``: the daemon's requests made by its child processes; every
    delivery received and recorded, their CPU counted with the daemon's."""
    report_path = tmp_path / "report.json"
    returncode, stdout = run_script(
        [
            str(BENCH), "--smoke", "--scenario", "burst", "--sender-processes", "2",
            "--json", str(report_path),
        ],
        tmp_path,
    )  # fmt: skip
    assert returncode == 0, stdout
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["sender_processes"] == 2
    [run] = report["scenarios"]["burst"]["runs"]
    assert run["recorded"] == run["received"] == run["expected"] > 0, run
    assert "sender processes 2" in stdout


def test_budget_prints_every_part(tmp_path: Path) -> None:
    """``benchmarks/budget.py`` (the CPU of a delivery's parts) runs to the end, small."""
    returncode, stdout = run_script(
        [str(BENCH.parent / "budget.py"), "--requests", "300", "--deliveries", "400"], tmp_path
    )
    assert returncode == 0, stdout
    for part in (
        "plain aiohttp client",
        "webhookd Sender, in this process",
        "webhookd SenderPool(2)",
        "SQLite record statements",
        "webhookd without HTTP",
        "At 0.80 of the ceiling",
    ):
        assert part in stdout, stdout
