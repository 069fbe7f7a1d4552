"""Secrets from systemd's LoadCredential=: ``secret_file = "%d/NAME"`` (or
``"$CREDENTIALS_DIRECTORY/NAME"``) reads NAME from ``$CREDENTIALS_DIRECTORY``."""

from __future__ import annotations

from pathlib import Path

import pytest

from webhookd import endpoints
from webhookd.errors import ConfigError
from webhookd.settings import load_settings


def _config(tmp_path: Path, secret_file: str, previous_file: str | None = None) -> Path:
    text = (
        '[[endpoints]]\nid = "crm"\nurl = "https://crm.example.com/h"\n'
        f'secret_file = "{secret_file}"\n'
    )
    if previous_file is not None:
        text += (
            f'previous_secret_file = "{previous_file}"\n'
            'previous_secret_expires_at = "2099-01-01T00:00:00Z"\n'
        )
    config_dir = tmp_path / "etc"
    config_dir.mkdir(exist_ok=True)
    path = config_dir / "webhookd.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "crm.secret").write_text("from-the-credential\n", encoding="utf-8")
    (directory / "crm.old").write_text("the-previous-one", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


@pytest.mark.parametrize("prefix", ["%d/", "$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/"])
def test_secret_file_is_read_from_the_credentials_directory(
    tmp_path: Path, credentials: Path, prefix: str
) -> None:
    settings = load_settings(_config(tmp_path, f"{prefix}crm.secret", f"{prefix}crm.old"))
    ep = settings.endpoints[0]
    assert ep.secret_file == credentials / "crm.secret"
    assert ep.previous_secret_file == credentials / "crm.old"
    [endpoint] = endpoints.from_settings(settings)
    assert endpoint.secret == "from-the-credential"
    assert endpoint.previous_secret == "the-previous-one"


def test_without_credentials_directory_the_error_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, "%d/crm.secret"))
    [problem] = caught.value.problems
    assert problem.startswith("endpoints[0].secret_file: ")
    assert "$CREDENTIALS_DIRECTORY is not set" in problem
    assert "LoadCredential=" in problem


def test_other_relative_secret_files_stay_relative_to_the_config_file(
    tmp_path: Path, credentials: Path
) -> None:
    path = _config(tmp_path, "secrets/crm")
    (path.parent / "secrets").mkdir()
    (path.parent / "secrets" / "crm").write_text("beside-the-config", encoding="utf-8")
    [endpoint] = endpoints.from_settings(load_settings(path))
    assert endpoint.secret == "beside-the-config"
