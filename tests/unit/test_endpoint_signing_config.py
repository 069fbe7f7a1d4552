"""Signature schemes and rotated-out secrets, from the config file and from table rows."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from webhookd.endpoints import from_settings, from_table_row
from webhookd.errors import ConfigError
from webhookd.settings import Settings, load_settings

WHSEC = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OLD_WHSEC = "whsec_" + base64.b64encode(bytes(range(40))).decode()
SETTINGS = Settings.model_validate({})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_a_static_endpoint_with_both_schemes_and_a_previous_secret(tmp_path: Path) -> None:
    (tmp_path / "old.secret").write_text(OLD_WHSEC + "\n")
    settings = load_settings(
        write(
            tmp_path,
            f"""
[[endpoints]]
id = "crm"
url = "https://crm.example/h"
secret = "{WHSEC}"
signature_schemes = ["seed", "standard"]
previous_secret_file = "old.secret"
previous_secret_expires_at = "2030-01-01T00:00:00Z"
""",
        )
    )
    [ep] = from_settings(settings)
    assert ep.schemes == ("seed", "standard")
    assert ep.previous_secret == OLD_WHSEC
    assert ep.previous_secret_expires_at == 1893456000.0
    assert ep.problem is None


def test_config_problems_with_schemes_and_rotation_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[[endpoints]]
id = "a"
url = "https://a.example/h"
secret = "not-a-whsec-secret"
signature_schemes = ["standard"]

[[endpoints]]
id = "b"
url = "https://b.example/h"
secret = "{WHSEC}"
previous_secret = "{OLD_WHSEC}"

[[endpoints]]
id = "c"
url = "https://c.example/h"
secret = "{WHSEC}"
signature_schemes = ["seed", "seed"]

[[endpoints]]
id = "d"
url = "https://d.example/h"
secret = "{WHSEC}"
signature_schemes = ["sed"]
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = "\n".join(info.value.problems)
    assert "endpoints[0]: secret: the standard scheme needs a secret of the form whsec_" in text
    assert "endpoints[1]: 'previous_secret' (or 'previous_secret_file') and" in text
    assert "endpoints[2].signature_schemes" in text
    assert "endpoints[3].signature_schemes[0]" in text
    assert "not-a-whsec-secret" not in text
    assert OLD_WHSEC not in text


ROW = {"id": "crm", "url": "https://crm.example/h", "secret": WHSEC}


@pytest.mark.parametrize(
    ("value", "schemes"),
    [
        (None, ("seed",)),
        ("", ("seed",)),
        ("seed", ("seed",)),
        ("standard", ("standard",)),
        ("seed,standard", ("seed", "standard")),
        ("seed standard", ("seed", "standard")),
        ('["standard", "seed"]', ("standard", "seed")),
    ],
)
def test_table_rows_name_their_schemes(value: str | None, schemes: tuple[str, ...]) -> None:
    ep = from_table_row({**ROW, "signature_schemes": value}, SETTINGS)
    assert (ep.schemes, ep.problem) == (schemes, None)


def test_a_table_row_with_an_unknown_scheme_or_a_non_whsec_secret_is_a_problem() -> None:
    ep = from_table_row({**ROW, "signature_schemes": "seed,hmac"}, SETTINGS)
    assert ep.problem is not None
    assert "signature_schemes" in ep.problem
    ep = from_table_row({**ROW, "secret": "plain", "signature_schemes": "standard"}, SETTINGS)
    assert ep.problem is not None
    assert "whsec_" in ep.problem
    assert "plain" not in ep.problem


def test_a_table_row_in_rotation_grace() -> None:
    ep = from_table_row(
        {
            **ROW,
            "previous_secret": OLD_WHSEC,
            "previous_secret_expires_at": "2030-01-01T00:00:00.000Z",
        },
        SETTINGS,
    )
    assert (ep.previous_secret, ep.previous_secret_expires_at) == (OLD_WHSEC, 1893456000.0)
    bad = from_table_row(
        {**ROW, "previous_secret": OLD_WHSEC, "previous_secret_expires_at": "soon"}, SETTINGS
    )
    assert bad.problem is not None
    assert "previous_secret_expires_at" in bad.problem
    assert bad.previous_secret_expires_at is None
