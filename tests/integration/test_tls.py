"""TLS to endpoints: certificates are verified, a CA bundle can be set per endpoint or globally,
and each kind of certificate failure is recorded in words that point at the fix.

Certificates come from ``trustme`` (a throw-away CA); the receivers are real aiohttp HTTPS
servers on 127.0.0.1, reached as ``https://localhost:PORT`` so that the host name is checked.
Loopback is blocked by SSRF protection by default: these tests allow it (daemon_settings does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from daemon_fixtures import (
    OutboxRow,
    daemon_settings,
    deliveries,
    eventually,
    execute,
    insert_outbox,
    query,
    running_daemon,
)

from webhookd import endpoints as endpoints_mod
from webhookd.errors import ConfigError
from webhookd.settings import Settings, load_settings

pytestmark = pytest.mark.timeout(120)

SECRET = "tls-test-secret"
Configure = Callable[[ssl.SSLContext], None]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our CA (its PEM file), a CA nobody trusts, and server certificates of every kind."""
    tmp = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    stranger.cert_pem.write_to_path(str(tmp / "stranger-ca.pem"))
    # A self-signed certificate: the stranger CA's own, served with its key.
    stranger.cert_pem.write_to_path(str(tmp / "self-signed.pem"))
    stranger.private_key_pem.write_to_path(str(tmp / "self-signed.key"))
    now = dt.datetime.now(dt.UTC)

    def self_signed(context: ssl.SSLContext) -> None:
        context.load_cert_chain(str(tmp / "self-signed.pem"), str(tmp / "self-signed.key"))

    return {
        "ca_pem": str(tmp / "ca.pem"),
        "stranger_pem": str(tmp / "stranger-ca.pem"),
        "valid": ca.issue_cert("localhost", "127.0.0.1").configure_cert,
        "unknown_ca": stranger.issue_cert("localhost").configure_cert,
        "self_signed": self_signed,
        "wrong_host": ca.issue_cert("wrong.example").configure_cert,
        "expired": ca.issue_cert(
            "localhost",
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ).configure_cert,
    }


class HttpsReceivers:
    """HTTPS receivers on 127.0.0.1, one per certificate; records the paths each one got."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.seen: dict[str, list[str]] = {}

    async def start(self, name: str, configure: Configure) -> str:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        configure(context)
        seen = self.seen.setdefault(name, [])

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            seen.append(request.path)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        return f"https://localhost:{runner.addresses[0][1]}/{name}"


@contextlib.asynccontextmanager
async def https_receivers() -> AsyncIterator[HttpsReceivers]:
    receivers = HttpsReceivers()
    try:
        yield receivers
    finally:
        for runner in receivers.runners:
            await runner.cleanup()


async def run_and_collect(
    settings: Settings, table: Sequence[tuple[str, str, str | None]] = ()
) -> dict[str, Any]:
    """Run a daemon, add the ``table`` endpoints (id, url, ca_bundle) to webhook_endpoints as
    an application would, send one event to every endpoint, and return each endpoint's single
    attempt (with its delivery's state) by endpoint id."""
    db = settings.database.path
    expected = len(settings.endpoints) + len(table)
    async with running_daemon(settings):
        for ep_id, url, ca_bundle in table:
            await execute(
                db,
                "INSERT INTO webhook_endpoints (id, url, secret, ca_bundle) VALUES (?, ?, ?, ?)",
                (ep_id, url, SECRET, ca_bundle),
            )
        await insert_outbox(db, [OutboxRow("booking.created", {"id": "bk_tls"})])
        await eventually(
            lambda: len([d for d in deliveries(db) if d["state"] != "pending"]) == expected,
            what="every delivery to finish",
        )
    rows = query(
        db,
        "SELECT d.endpoint_id, d.state, a.result, a.error, a.error_kind FROM webhookd_deliveries d"
        " JOIN webhookd_attempts a ON a.delivery_pk = d.id",
    )
    return {r["endpoint_id"]: r for r in rows}


def endpoint(name: str, url: str, ca_bundle: str | None = None) -> dict[str, Any]:
    ep = {"id": name, "url": url, "secret": SECRET}
    if ca_bundle is not None:
        ep["ca_bundle"] = ca_bundle
    return ep


async def test_each_certificate_problem_is_recorded_in_its_own_words(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    async with https_receivers() as receivers:
        ca = pki["ca_pem"]
        eps = [
            endpoint(name, await receivers.start(name, pki[name]), ca)
            for name in ("valid", "unknown_ca", "self_signed", "wrong_host", "expired")
        ]
        # Verification is on by default: the system's CAs do not know ours.
        eps.append(endpoint("no_bundle", await receivers.start("no_bundle", pki["valid"])))
        settings = daemon_settings(tmp_path, endpoints=eps, retry={"max_attempts": 1})
        got = await run_and_collect(settings)

    assert got["valid"]["state"] == "succeeded"
    assert receivers.seen["valid"] == ["/valid"]
    expected = {
        "unknown_ca": "TLS certificate not trusted: unable to get local issuer certificate",
        "no_bundle": "TLS certificate not trusted: unable to get local issuer certificate",
        "self_signed": "TLS certificate not trusted: self-signed certificate",
        "wrong_host": "TLS certificate hostname mismatch: Hostname mismatch, certificate is "
        "not valid for 'localhost'",
        "expired": "TLS certificate expired: certificate has expired",
    }
    for name, start in expected.items():
        row = got[name]
        assert (row["state"], row["result"], row["error_kind"]) == (
            "failed",
            "network_error",
            "tls",
        ), name
        assert str(row["error"]).startswith(start), (name, row["error"])
        assert receivers.seen[name] == [], f"{name}: a request went through an untrusted TLS"
    assert "set the endpoint's ca_bundle" in got["unknown_ca"]["error"]
    assert "renew" in got["expired"]["error"]
    assert "must name the URL's host" in got["wrong_host"]["error"]


async def test_a_global_ca_bundle_serves_every_endpoint_and_an_endpoints_own_wins(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    async with https_receivers() as receivers:
        url = await receivers.start("valid", pki["valid"])
        eps = [endpoint("global", url), endpoint("own_wrong_ca", url, pki["stranger_pem"])]
        settings = daemon_settings(
            tmp_path,
            endpoints=eps,
            delivery={"ca_bundle": pki["ca_pem"]},
            retry={"max_attempts": 1},
        )
        got = await run_and_collect(settings)
    assert got["global"]["state"] == "succeeded"
    assert got["own_wrong_ca"]["state"] == "failed"
    assert got["own_wrong_ca"]["error"].startswith("TLS certificate not trusted")
    assert receivers.seen["valid"] == ["/valid"]


async def test_a_table_endpoint_names_its_ca_bundle_in_its_column(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    async with https_receivers() as receivers:
        url = await receivers.start("valid", pki["valid"])
        settings = daemon_settings(tmp_path, retry={"max_attempts": 1})
        got = await run_and_collect(
            settings, table=[("with_bundle", url, pki["ca_pem"]), ("without", url, None)]
        )
    assert got["with_bundle"]["state"] == "succeeded"
    assert got["without"]["error"].startswith("TLS certificate not trusted")
    assert receivers.seen["valid"] == ["/valid"]


# -- configuration -----------------------------------------------------------------------------


def test_a_missing_or_broken_ca_bundle_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "not-pem.txt").write_text("hello\n")
    config = tmp_path / "webhookd.toml"
    config.write_text(
        '[delivery]\nca_bundle = "missing.pem"\n'
        '[[endpoints]]\nid = "a"\nurl = "https://a.example/h"\nsecret = "s"\n'
        'ca_bundle = "not-pem.txt"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    problems = "\n".join(info.value.problems)
    assert "delivery.ca_bundle: cannot load CA bundle" in problems
    assert "No such file or directory" in problems
    assert "endpoints[0].ca_bundle: cannot load CA bundle" in problems
    assert "no PEM certificate" in problems


def test_a_relative_ca_bundle_is_found_next_to_the_config_file(
    tmp_path: Path, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "ca.pem").write_bytes(Path(pki["ca_pem"]).read_bytes())
    config = conf_dir / "webhookd.toml"
    config.write_text(
        '[delivery]\nca_bundle = "ca.pem"\n'
        '[[endpoints]]\nid = "a"\nurl = "https://a.example/h"\nsecret = "s"\nca_bundle = "ca.pem"\n'
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config)
    assert settings.delivery.ca_bundle == conf_dir / "ca.pem"
    [ep] = endpoints_mod.from_settings(settings)
    assert ep.ca_bundle == str(conf_dir / "ca.pem")


def test_a_table_endpoint_with_an_unusable_ca_bundle_is_not_used(tmp_path: Path) -> None:
    settings = Settings.model_validate({})
    row = {"id": "t", "url": "https://a.example/h", "secret": "s", "events": "*"}
    relative = endpoints_mod.from_table_row({**row, "ca_bundle": "ca.pem"}, settings)
    assert relative.problem is not None
    assert "must be an absolute path" in relative.problem
    missing = endpoints_mod.from_table_row({**row, "ca_bundle": str(tmp_path / "no.pem")}, settings)
    assert missing.problem is not None
    assert "cannot load CA bundle" in missing.problem
    for hostile in ("/dev/zero", str(tmp_path), "/etc/a\x00b"):  # a device, a directory, a NUL
        problem = endpoints_mod.from_table_row({**row, "ca_bundle": hostile}, settings).problem
        assert problem is not None
        assert "cannot load CA bundle" in problem
    assert endpoints_mod.from_table_row({**row, "ca_bundle": None}, settings).problem is None
