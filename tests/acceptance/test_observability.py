"""The observability kit: contrib/prometheus/alerts.yml, contrib/grafana/webhookd.json and the
live /metrics page, checked with promtool and a real Prometheus scraping a real daemon.

promtool and prometheus come from Debian's ``prometheus`` package (.ci/run installs it). Without
them these tests skip on a developer's machine and fail when CI is set.

The live part (module-scoped, one daemon and one Prometheus for all its tests): ``webhookd run``
with five endpoints (one answering 200, one 500, one too slow, one refusing connections, one
disabled), a Prometheus scraping it every second and evaluating alerts.yml every second, and two
rounds of events (good, schema-mismatched and malformed rows) so that every labelled series
exists and every counter has grown while Prometheus watched.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import free_port

from webhookd.catalogue import SEED_EVENTS
from webhookd.cli import build_parser

if TYPE_CHECKING:
    from conftest import AioReceiver, WebhookdProcess, Workspace

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "contrib" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "webhookd.json"

PROMTOOL_TIMEOUT_SECONDS = 60.0
PROMETHEUS_READY_TIMEOUT_SECONDS = 30.0
PROMETHEUS_STOP_TIMEOUT_SECONDS = 10.0
PROMETHEUS_WAIT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 5.0
POLL_SECONDS = 0.2

# Metric names the rules may use that come from Prometheus itself or the blackbox exporter.
EXTERNAL_ALERT_METRICS = {"up", "probe_success"}
# What the dashboard's Grafana variables stand for when its queries run outside Grafana.
GRAFANA_SUBSTITUTES = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$endpoint": ".*",
}
# Panels that may show nothing while all is well.
PANELS_EMPTY_WHEN_HEALTHY = {"Store errors by operation"}

# The live set-up.
SECRET = "observability-test-secret"
GOOD_EVENTS_PER_ROUND = 3
BAD_ROWS_PER_ROUND = 1
# booking.created with totalAmount as text: delivered with events.schema_mismatch = "warn".
MISMATCHED_EVENTS_PER_ROUND = 1
FAILING_ENDPOINTS = ("broken", "slow", "refused")
ACTIVE_ENDPOINTS = ("ok", *FAILING_ENDPOINTS)
DISABLED_ENDPOINT = "off"
DELIVERY_TIMEOUT_SECONDS = 2.0
SLOW_RECEIVER_DELAY_SECONDS = 6.0
MAX_ATTEMPTS = 2


# -- tools -----------------------------------------------------------------------------------


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is not None:
        return path
    reason = f"{tool} is not installed (Debian package prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def promtool() -> str:
    return _require("promtool")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return _require("prometheus")


def _run(command: list[str], *, stdin: str | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(
        command,
        input=stdin,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        check=False,
    )


# -- PromQL names ----------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels, keywords or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, strings
    text = re.sub(r"\{[^{}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$:])[A-Za-z_:][\w:]*", text):
        name = match.group(0)
        if re.match(r"\s*\(", text[match.end() :]) or name.lower() in _PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(name)
    return names


def exported_names(page: str) -> set[str]:
    """Every series name a /metrics page exposes or declares (a counter or histogram with labels
    declares its name before its first sample exists)."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_name_extraction_sees_selectors_and_ignores_the_rest() -> None:
    expr = (
        'sum by (job, le) (rate(webhookd_a_bucket{x="y", z=~"by|on"}[$__rate_interval])) > 0 '
        "and on (job) group by (job) (webhookd_b offset 30m) unless absent(up) or vector(1) "
        "* 1e3 + webhookd_c"
    )
    assert metric_names(expr) == {"webhookd_a_bucket", "webhookd_b", "up", "webhookd_c"}


# -- the files alone -------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_alerts(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    result = _run([promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows hold their panels
    return panels


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]


def _variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL selectors inside the query variables' label_values(...)."""
    selectors = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
        assert match, f"variable {variable['name']}: unexpected query {text!r}"
        selectors.append(match.group(1))
    return selectors


def _substitute(expr: str) -> str:
    for variable in sorted(GRAFANA_SUBSTITUTES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_SUBSTITUTES[variable])
    assert "$" not in expr, f"a Grafana variable the tests do not know: {expr}"
    return expr


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] == "webhookd"
    assert dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["endpoint"]["type"] == "query"
    assert variables["endpoint"]["includeAll"] is True

    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for wanted in (
        "Throughput: attempts/s by result",
        "Outcomes per endpoint",
        "Attempt latency",
        "Event to delivery",
        "Outbox lag",
        "Backlog per endpoint",
        "In flight per endpoint",
        "Endpoint states",
        "Quarantined rows by reason",
        "Rows pruned by kind",
    ):
        assert wanted in titles


def test_dashboard_queries_with_an_endpoint_label_follow_the_endpoint_variable() -> None:
    for title, expr in _queries(_dashboard()):
        for selector in re.findall(r"(webhookd_\w+)(\{[^}]*\})?", expr):
            name, matchers = selector
            if name.startswith(
                (
                    "webhookd_delivery_",
                    "webhookd_deliveries_",
                    "webhookd_inflight_",
                    "webhookd_endpoint_",
                )
            ):
                assert 'endpoint=~"$endpoint"' in matchers, f"{title}: {expr}"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses every expression of a rules file: one recording rule per query.
    queries = _queries(_dashboard())
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _substitute(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    rules += [
        {"record": f"dashboard:variable_{i}", "expr": _substitute(selector)}
        for i, selector in enumerate(_variable_queries(_dashboard()))
    ]
    rules_file = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


@pytest.mark.slow
def test_runbook_commands_exist(live: Live) -> None:
    """Every `webhookd ...` command an alert's runbook names is one the CLI accepts."""
    commands = set()
    for rule in live.prometheus.alert_rules():
        runbook = rule["annotations"].get("runbook", "")
        plain = re.sub(r"\{\{[^}]*\}\}", "ARG", runbook)
        for part in plain.split(";"):
            words = shlex.split(part.split("|")[0])
            if words and words[0] == "webhookd":
                commands.add(tuple(words[1:]))
    assert commands, "no runbook names a webhookd command"
    for args in sorted(commands):
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                parsed = build_parser().parse_args(list(args))
            except SystemExit:
                raise AssertionError(f"webhookd {' '.join(args)}: {errors.getvalue()}") from None
        assert callable(getattr(parsed, "func", None)), f"webhookd {' '.join(args)}: no command"


# -- the live daemon and Prometheus ----------------------------------------------------------


class PrometheusServer:
    """A real ``prometheus`` on a loopback port, scraping one webhookd every second and
    evaluating alerts.yml every second. Its storage lives in ``directory``."""

    def __init__(self, binary: str, directory: Path, target_port: int) -> None:
        self.port = free_port()
        self.log_path = directory / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "webhookd",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        status, body = self._get(f"/api/v1/{path}", params)
        assert status == 200, f"prometheus /api/v1/{path} {params}: {status} {body}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", {"query": expr})
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a single-series expression, None when it has no result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_ready(self) -> None:
        self.wait_until(
            lambda: self._get("/-/ready")[0] == 200,
            "prometheus to be ready",
            timeout=PROMETHEUS_READY_TIMEOUT_SECONDS,
        )

    def wait_until(
        self, predicate: Callable[[], Any], what: str, timeout: float = PROMETHEUS_WAIT_SECONDS
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.popen.returncode}:\n{self.log()}"
                )
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log()}")
            time.sleep(POLL_SECONDS)

    def alert_rules(self) -> list[dict[str, Any]]:
        groups = self.api("rules", {"type": "alert"})["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(PROMETHEUS_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(PROMETHEUS_STOP_TIMEOUT_SECONDS)


@dataclass
class Live:
    workspace: Workspace
    daemon: WebhookdProcess
    prometheus: PrometheusServer

    def metrics_page(self) -> str:
        answer = self.daemon.get("/metrics")
        assert answer is not None, "webhookd's /metrics did not answer"
        assert answer.status == 200
        return answer.body


def _insert_round(workspace: Workspace, round_no: int) -> None:
    good = next(data for kind, _, _, data in SEED_EVENTS if kind == "booking.created")
    rows: list[dict[str, Any]] = [
        {
            "event_type": "booking.created",
            "payload": json.dumps({**good, "id": f"book_{round_no}_{i}"}),
        }
        for i in range(GOOD_EVENTS_PER_ROUND)
    ]
    rows += [
        {
            "event_type": "booking.created",
            "payload": json.dumps({**good, "id": f"book_{round_no}_m{i}", "totalAmount": "9000"}),
        }
        for i in range(MISMATCHED_EVENTS_PER_ROUND)
    ]
    rows += [
        {"event_type": "booking.created", "payload": "{not json"} for _ in range(BAD_ROWS_PER_ROUND)
    ]
    workspace.insert_outbox(rows)


def _deliver_round(live: Live, round_no: int) -> None:
    """One round of rows; returns once every delivery is final and Prometheus has seen it."""
    ws, prom = live.workspace, live.prometheus
    _insert_round(ws, round_no)
    events = (GOOD_EVENTS_PER_ROUND + MISMATCHED_EVENTS_PER_ROUND) * round_no
    deliveries = events * len(ACTIVE_ENDPOINTS)
    failed = events * len(FAILING_ENDPOINTS)

    def all_final() -> bool:
        states = ws.delivery_states()
        return sum(states.values()) == deliveries and not states.get("pending")

    ws.wait_until(
        all_final,
        timeout=60,
        what=f"round {round_no}: {deliveries} final deliveries",
        details=lambda: f"{ws.delivery_states()}\n{live.daemon.output()}",
    )
    assert ws.delivery_states() == {"succeeded": deliveries - failed, "failed": failed}
    prom.wait_until(
        lambda: (
            prom.value('sum(webhookd_deliveries_total{outcome="failed"})') == failed
            and prom.value("sum(webhookd_events_rejected_total)") == BAD_ROWS_PER_ROUND * round_no
        ),
        f"prometheus to scrape round {round_no}",
    )


@pytest.fixture(scope="module")
def live(
    promtool: str,
    prometheus_bin: str,
    new_workspace: Callable[[str], Workspace],
    new_aio_receiver: Callable[..., AioReceiver],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    ws = new_workspace("observability")
    ok = new_aio_receiver()
    broken = new_aio_receiver(status=500)
    slow = new_aio_receiver(delay=SLOW_RECEIVER_DELAY_SECONDS)
    urls = {
        "ok": ok.url,
        "broken": broken.url,
        "slow": slow.url,
        "refused": f"http://127.0.0.1:{free_port()}/hook",
        DISABLED_ENDPOINT: ok.url,
    }
    endpoints = [
        {"id": name, "url": url, "secret": SECRET, "enabled": name != DISABLED_ENDPOINT}
        for name, url in urls.items()
    ]
    ws.write_config(
        endpoints=endpoints,
        delivery={
            "allow_http": True,
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "connect_timeout_seconds": DELIVERY_TIMEOUT_SECONDS / 2,
            "timeout_seconds": DELIVERY_TIMEOUT_SECONDS,
        },
        retry={"max_attempts": MAX_ATTEMPTS},
        events={"schema_mismatch": "warn"},
        # Every round's deliveries must become final (dead letters) in time: the circuit
        # breaker (test_breaker.py) would hold back those of the failing endpoints.
        breaker={"failure_threshold": 10_000},
    )
    daemon = ws.start()
    prometheus = PrometheusServer(prometheus_bin, tmp_path_factory.mktemp("prometheus"), ws.port)
    try:
        prometheus.wait_ready()
        prometheus.wait_until(
            lambda: prometheus.value('up{job="webhookd"}') == 1, "the first scrape of webhookd"
        )
        setup = Live(ws, daemon, prometheus)
        # Two rounds: counters created in the first grow in the second while Prometheus
        # watches, as in production (increase() cannot see a series' first value).
        _deliver_round(setup, 1)
        _deliver_round(setup, 2)
        yield setup
    finally:
        prometheus.stop()
        daemon.kill()


# -- tests on the live set-up ----------------------------------------------------------------


@pytest.mark.slow
def test_promtool_check_metrics_finds_no_problem_on_the_live_page(
    live: Live, promtool: str
) -> None:
    page = live.metrics_page()
    # Every labelled series exists, so promtool lints all of them.
    for series in (
        *(f'result="{r}"' for r in ("success", "http_error", "timeout", "network_error")),
        'outcome="succeeded"',
        'outcome="failed"',
        f'webhookd_endpoint_state{{endpoint="{DISABLED_ENDPOINT}",state="disabled"}} 1.0',
        'webhookd_delivery_duration_seconds_bucket{endpoint="ok"',
        'webhookd_inflight_requests{endpoint="slow"}',
        "webhookd_events_rejected_total{reason=",
        'webhookd_events_schema_mismatch_total{event_type="booking.created"} 2.0',
    ):
        assert series in page, f"{series!r} missing from /metrics:\n{page}"

    result = _run([promtool, "check", "metrics"], stdin=page)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr


@pytest.mark.slow
def test_every_dashboard_and_alert_metric_is_exported_by_webhookd(live: Live) -> None:
    exported = exported_names(live.metrics_page())
    dashboard = _dashboard()
    used = {f"dashboard {title}": metric_names(expr) for title, expr in _queries(dashboard)} | {
        f"variable {s}": metric_names(s) for s in _variable_queries(dashboard)
    }
    rules = live.prometheus.alert_rules()
    assert len(rules) >= 10, rules
    used |= {f"alert {r['name']}": metric_names(r["query"]) for r in rules}
    for where, names in used.items():
        assert names, f"{where}: no metric name found"
        allowed = exported | (EXTERNAL_ALERT_METRICS if where.startswith("alert") else set())
        assert names <= allowed, f"{where} uses {sorted(names - allowed)}, not in /metrics"


@pytest.mark.slow
def test_every_dashboard_panel_shows_data_from_a_real_prometheus(live: Live) -> None:
    prom = live.prometheus
    finite: dict[str, bool] = {}
    for title, expr in _queries(_dashboard()):
        result = prom.query(_substitute(expr))
        values = [float(series["value"][1]) for series in result]
        finite[title] = finite.get(title, False) or any(math.isfinite(v) for v in values)
    empty = {t for t, ok in finite.items() if not ok} - PANELS_EMPTY_WHEN_HEALTHY
    assert not empty, f"panels without data: {sorted(empty)}"

    # What a user reads off the panels matches what happened.
    by = {
        title: {
            tuple(sorted(s["metric"].items())): float(s["value"][1])
            for s in prom.query(_substitute(expr))
        }
        for title, expr in _queries(_dashboard())
    }
    results = {dict(k).get("result") for k in by["Throughput: attempts/s by result"]}
    assert results == {"success", "http_error", "timeout", "network_error"}
    outcomes = {(dict(k)["endpoint"], dict(k)["outcome"]) for k in by["Outcomes per endpoint"]}
    assert ("ok", "succeeded") in outcomes
    assert {(e, "failed") for e in FAILING_ENDPOINTS} <= outcomes
    states = {dict(k)["endpoint"]: v for k, v in by["Endpoint states"].items()}
    assert states == {**{e: 0.0 for e in ACTIVE_ENDPOINTS}, DISABLED_ENDPOINT: 2.0}
    (dead_letters,) = by["Dead letters in range"].values()
    assert dead_letters > 0
    (lag,) = by["Outbox lag"].values()
    assert lag == 0.0


@pytest.mark.slow
def test_alert_rules_evaluate_cleanly_and_fire_on_the_live_daemon(live: Live) -> None:
    prom = live.prometheus

    def active() -> dict[tuple[str, str], str]:
        alerts = prom.api("alerts")["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("endpoint", "")): a["state"] for a in alerts
        }

    expected = {
        **{("WebhookdDeadLetters", e): "firing" for e in FAILING_ENDPOINTS},
        **{("WebhookdEndpointFailing", e): "pending" for e in FAILING_ENDPOINTS},
        ("WebhookdEndpointDisabled", DISABLED_ENDPOINT): "pending",
        ("WebhookdRowsQuarantined", ""): "firing",
        ("WebhookdSchemaMismatch", ""): "firing",
    }
    prom.wait_until(
        lambda: all(active().get(key) == state for key, state in expected.items()),
        f"alerts {expected}; active: {active()}",
    )
    now = active()
    assert not [key for key in now if key[1] == "ok"], f"an alert about the healthy endpoint: {now}"
    for name in ("WebhookdDown", "WebhookdTargetMissing", "WebhookdOutboxLagHigh"):
        assert not [key for key in now if key[0] == name], now

    for rule in prom.alert_rules():
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule["labels"].get("severity") in {"critical", "warning", "info"}, rule["name"]
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), f"{rule['name']}: no {annotation}"


def test_a_removed_endpoint_leaves_no_state_behind(workspace: Workspace, dead_url: str) -> None:
    """WebhookdEndpointDisabled must stop firing once a disabled endpoint is removed: its
    webhookd_endpoint_state series must go away with it, not stay at disabled=1."""
    workspace.write_config()
    daemon = workspace.start()
    workspace.cli_ok(
        "endpoints", "add", "gone", "--url", dead_url, "--generate-secret", "--disabled"
    )
    disabled = 'webhookd_endpoint_state{endpoint="gone",state="disabled"} 1.0'

    def page() -> str:
        answer = daemon.get("/metrics")
        return answer.body if answer is not None and answer.status == 200 else ""

    workspace.wait_until(
        lambda: disabled in page(), what="the disabled endpoint's state", details=page
    )
    workspace.cli_ok("endpoints", "remove", "gone")
    workspace.wait_until(
        lambda: "endpoint_removed" in daemon.log_events(),
        what="the daemon to drop the endpoint",
        details=daemon.output,
    )
    stale = [
        line
        for line in page().splitlines()
        if line.startswith("webhookd_endpoint_state{") and 'endpoint="gone"' in line
    ]
    assert stale == [], f"series of a removed endpoint are still exported: {stale}"
