"""Configuration: TOML file, WEBHOOKD_* environment, paths, and error reports with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from webhookd.errors import ConfigError
from webhookd.settings import (
    DEFAULT_HEADER_PREFIX,
    DEFAULT_MAX_ATTEMPTS,
    Settings,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

ENDPOINT = """
[[endpoints]]
id = "crm"
url = "https://crm.example.com/webhooks"
secret = "s3cr3t-value"
"""


def write(tmp_path: Path, text: str, name: str = "webhookd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def test_a_full_file_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[database]
path = "/var/lib/webhookd/app.db"
busy_timeout_seconds = 2.5

[http]
listen = "127.0.0.1:9999"

[delivery]
connect_timeout_seconds = 3
timeout_seconds = 20
max_inflight = 64
max_concurrency_per_endpoint = 4
allow_http = true
header_prefix = "X-Acme"

[retry]
initial_delay_seconds = 1
multiplier = 2
max_delay_seconds = 60
jitter = 0.1
max_attempts = 5
max_age_seconds = 3600

[[endpoints]]
id = "crm"
url = "http://crm.internal/hook"
secret = "abc"
events = ["booking.*", "payment.succeeded"]
tenant = "org_42"
max_concurrency = 2
enabled = false
""",
    )
    s = load_settings(path)
    assert s.database.path == Path("/var/lib/webhookd/app.db")
    assert s.database.busy_timeout_seconds == 2.5
    assert s.http.host_port == ("127.0.0.1", 9999)
    d = s.delivery
    assert (d.connect_timeout_seconds, d.timeout_seconds, d.max_inflight) == (3, 20, 64)
    assert (d.max_concurrency_per_endpoint, d.allow_http, d.header_prefix) == (4, True, "X-Acme")
    r = s.retry
    assert (r.initial_delay_seconds, r.multiplier, r.max_delay_seconds, r.jitter) == (1, 2, 60, 0.1)
    assert (r.max_attempts, r.max_age_seconds) == (5, 3600)
    [ep] = s.endpoints
    assert (ep.id, ep.url, ep.secret_value()) == ("crm", "http://crm.internal/hook", "abc")
    assert (ep.events, ep.tenant, ep.max_concurrency, ep.enabled) == (
        ("booking.*", "payment.succeeded"),
        "org_42",
        2,
        False,
    )


def test_an_empty_file_gives_safe_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert s.delivery.allow_http is False
    assert s.delivery.header_prefix == DEFAULT_HEADER_PREFIX == "X-BookingScheduler"
    assert s.retry.max_attempts == DEFAULT_MAX_ATTEMPTS
    assert s.endpoints == ()
    assert s.http.host_port is not None
    assert s.http.host_port[0] == "127.0.0.1"  # loopback by default
    assert s.database.path == tmp_path / "webhookd.db"


def test_environment_overrides_win_over_the_file_nested_with_double_underscore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
[retry]
initial_delay_seconds = 2
max_attempts = 5

[delivery]
header_prefix = "X-FromFile"
""",
    )
    monkeypatch.setenv("WEBHOOKD_RETRY__MAX_ATTEMPTS", "9")
    monkeypatch.setenv("WEBHOOKD_DELIVERY__ALLOW_HTTP", "true")
    monkeypatch.setenv("webhookd_log__level", "debug")  # names are case-insensitive
    s = load_settings(path)
    assert s.retry.max_attempts == 9  # env wins
    assert s.retry.initial_delay_seconds == 2  # the rest of the file's section is kept
    assert s.delivery.allow_http is True  # env sets what the file does not
    assert s.delivery.header_prefix == "X-FromFile"
    assert s.log.level == "debug"


def test_a_bad_environment_value_is_reported_with_its_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOKD_RETRY__MAX_ATTEMPTS", "lots")
    [line] = problems(write(tmp_path, ""))
    assert line.startswith("retry.max_attempts: ")


def test_relative_paths_are_resolved_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "crm").write_text("  from-the-file\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        conf_dir,
        """
[database]
path = "data/app.db"

[[endpoints]]
id = "crm"
url = "https://crm.example.com/hook"
secret_file = "secrets/crm"
""",
    )
    s = load_settings(path)
    assert s.database.path == conf_dir / "data" / "app.db"
    assert s.endpoints[0].secret_file == conf_dir / "secrets" / "crm"
    assert s.endpoints[0].secret_value() == "from-the-file"  # surrounding whitespace dropped


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, '[database]\npath = "/srv/app/app.db"\n'))
    assert s.database.path == Path("/srv/app/app.db")


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
colour = "blue"

[retry]
max_attempts = "many"

[[endpoints]]
id = "crm"
url = "not a url"
secret = "x"
""",
    )
    lines = problems(path)
    assert len(lines) == 3, lines
    by_path = {line.split(": ", 1)[0]: line for line in lines}
    assert set(by_path) == {"colour", "retry.max_attempts", "endpoints[0].url"}
    assert "unknown key" in by_path["colour"]
    assert "integer" in by_path["retry.max_attempts"]


def test_problems_across_keys_are_reported_together_with_the_others(tmp_path: Path) -> None:
    """One run of check-config shows everything to fix, not one batch after another."""
    path = write(
        tmp_path,
        """
colour = "blue"

[[endpoints]]
id = "crm"
url = "http://crm.example.com/hook"
secret = "x"

[[endpoints]]
id = "crm"
url = "https://crm.example.com/other"
""",
    )
    lines = problems(path)
    paths = [line.split(": ", 1)[0] for line in lines]
    assert "colour" in paths
    assert "endpoints[0].url" in paths  # plain http without delivery.allow_http
    assert "endpoints[1].id" in paths  # duplicate id
    assert "endpoints[1]" in paths  # neither secret nor secret_file


@pytest.mark.parametrize(
    ("endpoint", "secret"),
    [
        ('id = "crm"\nurl = "https://x.example/h"\nsecret = 98765432101', "98765432101"),
        ('id = "crm"\nurl = "https://x.example/h"\nsecret = ["hunter2-list"]', "hunter2-list"),
        ('id = "Bad Id!"\nurl = "https://x.example/h"\nsecret = "hunter2-valid"', "hunter2-valid"),
        (
            'id = "crm"\nurl = "https://u:hunter2-in-url@x.example/h"\nsecret = "s"',
            "hunter2-in-url",
        ),
    ],
    ids=["int-secret", "list-secret", "valid-secret", "password-in-url"],
)
def test_secrets_are_never_echoed_in_errors(tmp_path: Path, endpoint: str, secret: str) -> None:
    path = write(tmp_path, f"unknown = 1\n[[endpoints]]\n{endpoint}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) >= 2  # the unknown key, and whatever else
    assert secret not in str(caught.value)


def test_plain_http_is_refused_unless_allowed(tmp_path: Path) -> None:
    endpoint = '[[endpoints]]\nid = "crm"\nurl = "http://crm.example.com/hook"\nsecret = "s"\n'
    [line] = problems(write(tmp_path, endpoint))
    assert line.startswith("endpoints[0].url: ")
    assert "allow_http" in line
    allowed = load_settings(write(tmp_path, "[delivery]\nallow_http = true\n" + endpoint))
    assert allowed.endpoints[0].url == "http://crm.example.com/hook"


@pytest.mark.parametrize(
    "url", ["ftp://crm.example.com/h", "https:///nohost", "https://crm.example.com/h#frag"]
)
def test_bad_urls_are_refused(tmp_path: Path, url: str) -> None:
    [line] = problems(write(tmp_path, ENDPOINT.replace("https://crm.example.com/webhooks", url)))
    assert line.startswith("endpoints[0].url: ")


def test_duplicate_endpoint_ids_are_refused(tmp_path: Path) -> None:
    [line] = problems(write(tmp_path, ENDPOINT + ENDPOINT))
    assert line.startswith("endpoints[1].id: ")
    assert "duplicate" in line


def test_secret_and_secret_file_are_mutually_exclusive_and_one_is_required(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret.txt").write_text("abc\n", encoding="utf-8")
    both = ENDPOINT + 'secret_file = "secret.txt"\n'
    neither = '[[endpoints]]\nid = "crm"\nurl = "https://crm.example.com/h"\n'
    for text in (both, neither):
        [line] = problems(write(tmp_path, text))
        assert line.startswith("endpoints[0]: ")
        assert "exactly one of 'secret' or 'secret_file'" in line


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_an_unusable_secret_file_is_reported(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "secret.txt").write_text(content, encoding="utf-8")
    endpoint = (
        '[[endpoints]]\nid = "crm"\nurl = "https://crm.example.com/h"\nsecret_file = "secret.txt"\n'
    )
    [line] = problems(write(tmp_path, endpoint))
    assert line.startswith("endpoints[0].secret_file: ")
    assert "secret.txt" in line


def test_invalid_toml_is_one_clear_problem(tmp_path: Path) -> None:
    [line] = problems(write(tmp_path, "[retry\nmax_attempts = 3\n"))
    assert "not valid TOML" in line


def test_a_missing_config_file_is_reported(tmp_path: Path) -> None:
    [line] = problems(tmp_path / "nope.toml")
    assert "does not exist" in line


def test_settings_are_frozen() -> None:
    s = Settings.model_validate({})
    with pytest.raises(ValueError, match="frozen"):
        s.retry.max_attempts = 3  # type: ignore[misc]


def test_the_example_config_loads() -> None:
    example = REPO_ROOT / "config.example.toml"
    if not example.exists():
        pytest.skip("config.example.toml is not written yet")
    load_settings(example)  # raises ConfigError listing what is wrong with it
