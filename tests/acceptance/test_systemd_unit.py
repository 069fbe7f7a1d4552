"""The shipped systemd files, checked with systemd's own tools, and the sandbox they describe.

- ``systemd-analyze verify`` finds nothing to say about the unit (warnings count: verify exits 0
  on an unknown key or a bad value, so its output must be empty);
- ``systemd-analyze security --offline=yes`` rates its exposure at 2.0 or below;
- the unit keeps the lifecycle contract (Type=notify, watchdog, reload, stop timeout above the
  drain grace period, ...);
- ``systemd-sysusers`` and ``systemd-tmpfiles`` create the user and a setgid 2770 directory;
- under that permission model (two users sharing a group, umask 0007) the application and the
  daemon both write the database;
- webhookd delivers under MemoryDenyWriteExecute (the kernel's equivalent, PR_SET_MDWE).

Skipped when systemd's tools are missing, unless CI is set: then that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import free_port

from webhookd.settings import DEFAULT_GRACE_SECONDS

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "webhookd.service"
SYSUSERS = SYSTEMD_DIR / "webhookd.sysusers"
TMPFILES = SYSTEMD_DIR / "webhookd.tmpfiles"
WEBHOOKD = Path(sys.executable).parent / "webhookd"
INSTALLED_WEBHOOKD = "/usr/local/bin/webhookd"
MAX_EXPOSURE = 2.0
TOOL_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_MARGIN_SECONDS = 10.0
DB_DIR_MODE = 0o2770
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Unused ids for the two users of the shared-database test (no passwd entries are needed).
DAEMON_UID = 64701
APP_UID = 64702
SHARED_GID = 64700


def _need(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not path:
        _need(f"{name} is not installed (Debian: apt-get install systemd)")
    return path


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False
    )


def _service_settings() -> list[tuple[str, str]]:
    """The [Service] section's assignments in order (systemd allows a key more than once)."""
    out = []
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", value)
    assert match, f"cannot read the time span {value!r}"
    return float(match.group(1)) * units[match.group(2) or "s"]


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this virtualenv's webhookd (verify checks that the
    binary exists); nothing else differs."""
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={INSTALLED_WEBHOOKD} ") == 1
    copy = tmp_path / "webhookd.service"
    copy.write_text(
        text.replace(f"ExecStart={INSTALLED_WEBHOOKD} ", f"ExecStart={WEBHOOKD} "),
        encoding="utf-8",
    )
    return copy


def test_systemd_analyze_verify_is_silent(testable_unit: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = _run(analyze, "verify", str(testable_unit))
    assert result.returncode == 0, result
    assert (result.stdout + result.stderr).strip() == "", result


def test_systemd_analyze_verify_would_notice_a_broken_unit(
    testable_unit: Path, tmp_path: Path
) -> None:
    """The check above can fail: verify reports what a mistyped key would look like."""
    analyze = _tool("systemd-analyze")
    broken = tmp_path / "broken.service"
    broken.write_text(
        testable_unit.read_text(encoding="utf-8").replace("UMask=0007", "UMask=0007\nUmask=7"),
        encoding="utf-8",
    )
    result = _run(analyze, "verify", str(broken))
    assert "Unknown key" in result.stdout + result.stderr, result


def test_security_exposure_is_at_most_2(testable_unit: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = _run(
        analyze,
        "security",
        "--offline=yes",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        "--no-pager",
        str(testable_unit),
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for webhookd\.service: (\d+\.\d+)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output
    assert result.returncode == 0, output


def test_unit_keeps_the_lifecycle_contract() -> None:
    settings = _service_settings()
    values = dict(settings)
    assert values["Type"] == "notify"
    assert values["NotifyAccess"] == "main"
    assert _seconds(values["WatchdogSec"]) > 0
    assert values["Restart"] == "on-failure"
    assert values["RestartPreventExitStatus"] == "2"  # a bad configuration: exit code 2
    assert values["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert values["ExecStart"].startswith(f"{INSTALLED_WEBHOOKD} run --config ")
    assert _seconds(values["TimeoutStopSec"]) >= DEFAULT_GRACE_SECONDS + STOP_TIMEOUT_MARGIN_SECONDS
    assert values["UMask"] == "0007"
    assert values["ReadWritePaths"] == "/var/lib/webhookd"
    assert values["ProtectSystem"] == "strict"
    assert values["CapabilityBoundingSet"] == ""
    assert values["AmbientCapabilities"] == ""
    assert values["MemoryDenyWriteExecute"] == "yes"
    assert values["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert ("SystemCallFilter", "@system-service") in settings
    assert "DynamicUser" not in values  # see the README: the database is shared by two users
    assert (values["User"], values["Group"]) == ("webhookd", "webhookd")


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        _need("creating users and chown-ing directories needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    return root


def test_sysusers_and_tmpfiles_create_the_user_and_a_setgid_group_directory(
    fake_root: Path,
) -> None:
    sysusers = _run(_tool("systemd-sysusers"), f"--root={fake_root}", str(SYSUSERS))
    assert sysusers.returncode == 0, sysusers
    passwd = (fake_root / "etc" / "passwd").read_text()
    group = (fake_root / "etc" / "group").read_text()
    [user] = [line.split(":") for line in passwd.splitlines() if line.startswith("webhookd:")]
    [grp] = [line.split(":") for line in group.splitlines() if line.startswith("webhookd:")]
    assert user[3] == grp[2], "the user's primary group is webhookd"
    assert user[5] == "/var/lib/webhookd"
    assert user[6].endswith("nologin")

    tmpfiles = _run(_tool("systemd-tmpfiles"), f"--root={fake_root}", "--create", str(TMPFILES))
    assert tmpfiles.returncode == 0, tmpfiles
    info = (fake_root / "var" / "lib" / "webhookd").stat()
    assert stat.S_IMODE(info.st_mode) == DB_DIR_MODE
    assert (info.st_uid, info.st_gid) == (int(user[2]), int(grp[2]))


# -- the permission model, for real: two users, one group, a setgid directory ------------------

# Runs webhookd's command line with a umask, as systemd's UMask= would set it.
WEBHOOKD_WITH_UMASK = (
    "import os, sys; os.umask(int(sys.argv.pop(1), 8)); "
    "from webhookd.cli import main; sys.exit(main(sys.argv[1:]))"
)
# The application: another user, with a careless umask, INSERTs into the outbox.
APP_INSERT = (
    "import os, sqlite3, sys; os.umask(0o022); c = sqlite3.connect(sys.argv[1], timeout=10); "
    "c.execute('INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)', "
    "('booking.created', '{\"id\": \"book_perm\"}')); c.commit()"
)


def _as(uid: int, *command: str) -> list[str]:
    """``command`` as ``uid``, with the shared group as a supplementary group."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={SHARED_GID}", *command]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 2770 directory owned by DAEMON_UID:SHARED_GID, reachable by other users (tmp_path's
    parents are private to root)."""
    if os.geteuid() != 0:
        _need("running processes as other users needs root")
    if shutil.which("setpriv") is None:
        _need("setpriv (util-linux) is not installed")
    probe = _run(*_as(APP_UID, sys.executable, "-c", "import sqlite3, aiohttp, webhookd.cli"))
    if probe.returncode != 0:
        # Not a missing tool: this interpreter lives where other users cannot read it (pyenv
        # under /root, say). CI's python3 from the distribution can.
        pytest.skip(f"{sys.executable} cannot be run by another user: {probe.stderr[-300:]}")
    base = Path(tempfile.mkdtemp(prefix="webhookd-perm-"))
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir()
        os.chown(data, DAEMON_UID, SHARED_GID)
        data.chmod(DB_DIR_MODE)
        yield data
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_database_shared_through_the_group_works_for_both_users(
    shared_dir: Path, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    db = shared_dir / "app.db"
    config = shared_dir.parent / "config.toml"
    config.write_text(
        f'[database]\npath = "{db}"\n[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        '[delivery]\nallow_http = true\nallowed_networks = ["127.0.0.0/8", "::1/128"]\n'
        '[log]\nformat = "json"\n'
        f'[[endpoints]]\nid = "crm"\nurl = "{receiver.url}"\nsecret = "perm-secret"\n',
        encoding="utf-8",
    )
    config.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}
    webhookd = [sys.executable, "-c", WEBHOOKD_WITH_UMASK, "0007"]

    migrate = _run(*_as(DAEMON_UID, *webhookd, "migrate", "--config", str(config)))
    assert migrate.returncode == 0, migrate
    app = _run(*_as(APP_UID, sys.executable, "-c", APP_INSERT, str(db)))
    assert app.returncode == 0, app

    out = shared_dir.parent / "daemon.out"
    with out.open("wb") as stdout:
        daemon = subprocess.Popen(
            _as(DAEMON_UID, *webhookd, "run", "--config", str(config)),
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:

        def delivered() -> bool:
            with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
                rows = conn.execute("SELECT state FROM webhookd_deliveries").fetchall()
            return [tuple(r) for r in rows] == [("succeeded",)]

        _wait(delivered, daemon, out)
        # The application writes again while the daemon holds the database open.
        again = _run(*_as(APP_UID, sys.executable, "-c", APP_INSERT, str(db)))
        assert again.returncode == 0, again
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(TOOL_TIMEOUT_SECONDS) == 0, out.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert len(receiver.finished()) >= 1
    for path in shared_dir.iterdir():
        info = path.stat()
        assert info.st_gid == SHARED_GID, f"{path.name} is not in the shared group"
        assert stat.S_IMODE(info.st_mode) & 0o007 == 0, f"{path.name} is open to others"
        assert stat.S_IMODE(info.st_mode) & 0o060 == 0o060, f"{path.name} is not group-writable"


def _wait(predicate: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TOOL_TIMEOUT_SECONDS
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no successful delivery; daemon output:\n{log.read_text()}")
        time.sleep(0.05)


# -- MemoryDenyWriteExecute ------------------------------------------------------------------


MDWE_WRAPPER = f"""\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""
# What a JIT does: map memory writable and executable at once. MDWE refuses it.
WX_PROBE = (
    "import mmap\n"
    "try:\n"
    "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "except PermissionError:\n"
    "    print('refused')\n"
    "else:\n"
    "    print('allowed')\n"
)


def _mdwe_wrapper(directory: Path) -> Path:
    """A launcher that turns MDWE on, then execs its arguments (the setting survives exec),
    or None when the kernel cannot (before Linux 6.3)."""
    wrapper = directory / "mdwe-wrapper.py"
    wrapper.write_text(MDWE_WRAPPER, encoding="utf-8")
    probe = _run(sys.executable, str(wrapper), sys.executable, "-c", WX_PROBE)
    if "PR_SET_MDWE failed" in probe.stderr:
        _need(f"this kernel cannot enforce MDWE (PR_SET_MDWE needs Linux 6.3): {probe.stderr}")
    assert probe.stdout.strip() == "refused", probe  # the probe shows the rule is in force
    return wrapper


def test_webhookd_delivers_under_memory_deny_write_execute(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    """MemoryDenyWriteExecute=yes kills a process that maps memory writable and executable (a
    JIT, libffi closures...). The kernel's PR_SET_MDWE applies the same rule to webhookd and
    everything it loads (uvloop, aiohttp's C parser, SQLite), from before its first line."""
    wrapper = _mdwe_wrapper(workspace.dir)
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "crm", "url": receiver.url, "secret": "mdwe"}])
    out = workspace.dir / "mdwe.out"
    command = [sys.executable, str(wrapper), str(WEBHOOKD), "run", "--config"]
    with out.open("wb") as stdout:
        daemon = subprocess.Popen(
            [*command, str(workspace.config_path)],
            env={k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")},
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        workspace.wait_until(
            lambda: workspace.db.exists() and _events(out, "started"),
            what="webhookd to start under MDWE",
            details=out.read_text,
        )
        workspace.cli_ok("enqueue", "booking.created", json.dumps({"id": "book_mdwe"}))
        workspace.wait_until(
            lambda: workspace.delivery_states() == {"succeeded": 1},
            what="a delivery under MDWE",
            details=out.read_text,
        )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(TOOL_TIMEOUT_SECONDS) == 0, out.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert len(receiver.finished()) == 1


def _events(out: Path, name: str) -> bool:
    for line in out.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("event") == name:
                return True
    return False
