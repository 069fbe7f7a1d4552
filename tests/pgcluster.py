"""A throw-away PostgreSQL cluster: initdb and pg_ctl in a temporary directory, listening on
127.0.0.1 and a free port with trust authentication, tuned for speed over durability.

Used by the tests (tests/postgres_fixtures.py) and the benchmark harness (benchmarks/), so
both need nothing but PostgreSQL's server binaries. As root, initdb and pg_ctl run as the
``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

SUPERUSER = "postgres"
# Roles in this group must log in with a password (pg_hba.conf of the throw-away cluster).
PASSWORD_GROUP = "webhookd_password_users"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
START_ATTEMPTS = 3
COMMAND_TIMEOUT_SECONDS = 120.0
PG_CTL_WAIT_SECONDS = 60
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


class ClusterError(RuntimeError):
    """The cluster could not be made or started; the message says why (with the server log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
                raise ClusterError(
                    "running as root, but there is no `postgres` user to run initdb as "
                    "(PostgreSQL refuses to run as root)"
                ) from None
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
        raise ClusterError(
            f"{what} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\nserver log:\n{self._server_log()}"
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

    def url(self, dbname: str = "postgres") -> str:
        """The superuser's URL of ``dbname`` (trust authentication: no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"
