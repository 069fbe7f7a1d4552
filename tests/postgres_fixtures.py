"""PostgreSQL for tests: a pytest plugin (registered in tests/conftest.py).

- ``postgres_server`` (session): the server the tests use. With ``WEBHOOKD_TEST_POSTGRES_ADMIN_URL``
  set (a superuser URL, e.g. ``postgresql://webhookd:webhookd@127.0.0.1:5432/postgres``) that
  server; otherwise a throw-away cluster made with ``initdb`` in a temporary directory (as root,
  initdb and pg_ctl run as the ``postgres`` user), listening on 127.0.0.1 and a free port with
  trust authentication, tuned for speed over durability, stopped and deleted at session end.
  Without PostgreSQL binaries the tests that need it are skipped, unless ``CI`` is set: then
  they fail, because CI must run them.
- ``postgres_url`` (function): a fresh empty database for one test,
  ``postgresql://user@127.0.0.1:PORT/t_<random>``, dropped (``WITH (FORCE)``) afterwards.
- ``postgres_password_user`` (function): a login role that must authenticate with a password
  (scram-sha-256), for tests of what a wrong password does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from pgcluster import PASSWORD_GROUP, SUPERUSER, ClusterError, ThrowAwayCluster, find_server_bindir

ADMIN_URL_ENV = "WEBHOOKD_TEST_POSTGRES_ADMIN_URL"
ADMIN_CONNECT_TIMEOUT_SECONDS = 10


def _missing(reason: str) -> NoReturn:
    """Skip on a developer's machine, fail on CI (CI set): CI must run the PostgreSQL tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server the tests may create databases on (as a superuser)."""

    host: str
    port: int
    user: str
    password: str | None
    admin_dbname: str
    description: str  # "throw-away cluster in /tmp/..." or the admin URL without its password

    def url(self, dbname: str, *, user: str | None = None, password: str | None = None) -> str:
        """``postgresql://user[:password]@host:port/dbname`` (the superuser by default)."""
        if user is None:
            user, password = self.user, self.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{quote(dbname, safe='')}"

    @contextlib.contextmanager
    def admin(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        """An autocommit superuser connection to the admin database."""
        conn = psycopg.connect(
            self.url(self.admin_dbname),
            autocommit=True,
            connect_timeout=ADMIN_CONNECT_TIMEOUT_SECONDS,
        )
        try:
            yield conn
        finally:
            conn.close()

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _server_from_url(url: str) -> PostgresServer:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        pytest.fail(f"{ADMIN_URL_ENV} must be a postgresql://user:password@host:port/db URL")
    safe_netloc = f"{parts.username or ''}@{parts.hostname}:{parts.port or 5432}"
    return PostgresServer(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username or pwd.getpwuid(os.getuid()).pw_name,
        password=parts.password,
        admin_dbname=parts.path.lstrip("/") or "postgres",
        description=urlunsplit((parts.scheme, safe_netloc, parts.path, "", "")),
    )


def _ensure_password_group(server: PostgresServer) -> None:
    with server.admin() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_GROUP,))
        if exists.fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateObject):  # a concurrent session
                conn.execute(f"CREATE ROLE {PASSWORD_GROUP} NOLOGIN")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module docstring)."""
    admin_url = os.environ.get(ADMIN_URL_ENV)
    if admin_url:
        server = _server_from_url(admin_url)
        try:
            _ensure_password_group(server)
        except psycopg.Error as exc:
            pytest.fail(f"cannot use {server.description} ({ADMIN_URL_ENV}): {exc}", pytrace=False)
        yield server
        return
    bindir = find_server_bindir()
    if bindir is None:
        _missing(
            "PostgreSQL's server is not installed (no initdb/pg_ctl/postgres under "
            f"/usr/lib/postgresql/*/bin, pg_config --bindir or PATH), and {ADMIN_URL_ENV} is "
            "not set"
        )
    try:
        cluster = ThrowAwayCluster(bindir)
        cluster.init()
        cluster.start()
    except ClusterError as exc:
        pytest.fail(f"{exc}; or set {ADMIN_URL_ENV}", pytrace=False)
    try:
        server = PostgresServer(
            host="127.0.0.1",
            port=cluster.port,
            user=SUPERUSER,
            password=None,
            admin_dbname="postgres",
            description=f"throw-away cluster in {cluster.base} ({bindir})",
        )
        _ensure_password_group(server)
        yield server
    finally:
        cluster.stop()
        cluster.remove()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a fresh empty database, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield name
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_database: str) -> str:
    """``postgresql://user@127.0.0.1:PORT/t_<random>``: a fresh empty database for this test."""
    return postgres_server.url(postgres_database)


@dataclass(frozen=True)
class PasswordUser:
    """A role that must log in with ``password``, owner of the empty database ``dbname``."""

    server: PostgresServer
    name: str
    password: str
    dbname: str

    def url(self, password: str | None = None) -> str:
        """The URL of its database with ``password`` (its own when None)."""
        given = self.password if password is None else password
        return self.server.url(self.dbname, user=self.name, password=given)


@pytest.fixture
def postgres_password_user(postgres_server: PostgresServer) -> Iterator[PasswordUser]:
    """A login role that must give its password, with a fresh database it owns. Skips when the
    server accepts a wrong password (an external server configured with trust)."""
    suffix = secrets.token_hex(6)
    user = PasswordUser(postgres_server, f"pw_{suffix}", secrets.token_urlsafe(18), f"t_{suffix}")
    with postgres_server.admin() as conn:
        conn.execute(
            f"CREATE ROLE {user.name} LOGIN PASSWORD '{user.password}' IN ROLE {PASSWORD_GROUP}"
        )
        conn.execute(f'CREATE DATABASE "{user.dbname}" OWNER {user.name}')
    try:
        with contextlib.suppress(psycopg.OperationalError):
            psycopg.connect(
                user.url("wrong-password"), connect_timeout=ADMIN_CONNECT_TIMEOUT_SECONDS
            ).close()
            pytest.skip(f"{postgres_server.description} accepts a wrong password (trust auth)")
        yield user
    finally:
        postgres_server.drop_database(user.dbname)
        with postgres_server.admin() as conn:
            conn.execute(f"DROP ROLE IF EXISTS {user.name}")
