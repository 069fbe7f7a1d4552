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
import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from helpers import free_port

ADMIN_URL_ENV = "WEBHOOKD_TEST_POSTGRES_ADMIN_URL"
SUPERUSER = "postgres"
# Roles in this group must log in with a password (pg_hba.conf of the throw-away cluster).
PASSWORD_GROUP = "webhookd_password_users"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
START_ATTEMPTS = 3
COMMAND_TIMEOUT_SECONDS = 120.0
PG_CTL_WAIT_SECONDS = 60
ADMIN_CONNECT_TIMEOUT_SECONDS = 10
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'32MB'",
    # A throw-away cluster: speed over durability.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "checkpoint_timeout": "'30min'",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "timezone": "'UTC'",
}


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


# -- finding the binaries --------------------------------------------------------------------


def _version_key(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([0-9.]+)/bin", bindir)
    return tuple(int(p) for p in match.group(1).split(".") if p) if match else (0,)


def _has_server_binaries(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in SERVER_BINARIES)


def find_server_bindir() -> str | None:
    """The directory with initdb, pg_ctl and postgres: the newest of /usr/lib/postgresql/*/bin,
    ``pg_config --bindir`` and the PATH; None when PostgreSQL's server is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(out)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    return None


# -- a throw-away cluster --------------------------------------------------------------------


class ThrowAwayCluster:
    """initdb + pg_ctl in a temporary directory; as root, both run as the ``postgres`` user."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="webhookd-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        if self.as_root:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                pytest.fail(
                    "running as root, but there is no `postgres` user to run initdb as "
                    f"(PostgreSQL refuses to run as root); or set {ADMIN_URL_ENV}",
                    pytrace=False,
                )
            os.chown(self.base, account.pw_uid, account.pw_gid)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [os.path.join(self.bindir, program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )

    def _server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def _fail(self, what: str, result: subprocess.CompletedProcess[str]) -> NoReturn:
        self.remove()
        pytest.fail(
            f"{what} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\nserver log:\n{self._server_log()}",
            pytrace=False,
        )

    def init(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            str(self.data),
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        if result.returncode != 0:
            self._fail("initdb", result)
        # Trust on loopback, except for the password group; no other address is listened on.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all +{PASSWORD_GROUP} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        settings = dict(SERVER_SETTINGS, unix_socket_directories=f"'{self.base}'")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# webhookd test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            result = self._run(
                "pg_ctl",
                "start",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(PG_CTL_WAIT_SECONDS),
                "-o",
                f"-p {self.port}",
            )
            if result.returncode == 0:
                return
            # The free port may have been taken in the meantime: try another one.
            if attempt == START_ATTEMPTS - 1 or "Address already in use" not in self._server_log():
                self._fail("pg_ctl start", result)

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


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
    cluster = ThrowAwayCluster(bindir)
    try:
        cluster.init()
        cluster.start()
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
