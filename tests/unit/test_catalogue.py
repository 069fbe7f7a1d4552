"""The event catalogue: models of each event's data, the seed's examples as fixtures, the
problems ``check_data`` reports, the ``[events]`` policy applied to outbox rows, and the
``webhookd events list|show`` commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import pytest

from webhookd import cli
from webhookd.catalogue import CATALOGUE, SEED_EVENTS, CataloguePolicy, check_data
from webhookd.dispatcher import plan_fanout
from webhookd.errors import ConfigError
from webhookd.events import classify_row, event_from_row
from webhookd.models import Endpoint, Event, OutboxRow, Quarantined
from webhookd.settings import Settings, load_settings

SEED_TYPES = [event_type for event_type, *_ in SEED_EVENTS]
EXAMPLES = {event_type: data for event_type, _, _, data in SEED_EVENTS}
NOW = 1_705_312_800.0  # 2024-01-15T10:00:00Z


def example(event_type: str, **changes: Any) -> dict[str, Any]:
    """A copy of the catalogue's example for ``event_type`` with ``changes`` applied."""
    return {**CATALOGUE[event_type].example_data, **changes}


def without(event_type: str, field: str) -> dict[str, Any]:
    data = example(event_type)
    del data[field]
    return data


def required_fields() -> list[tuple[str, str]]:
    return [
        (event_type, name)
        for event_type, entry in CATALOGUE.items()
        for name, info in entry.model.model_fields.items()
        if info.is_required()
    ]


# -- the catalogue and its fixtures --------------------------------------------------------------


def test_the_catalogue_holds_the_seeds_seven_events_then_webhooks_own_ping() -> None:
    assert list(CATALOGUE) == [
        "booking.created",
        "booking.confirmed",
        "booking.cancelled",
        "booking.updated",
        "payment.succeeded",
        "payment.failed",
        "customer.created",
        "webhook.test",
    ]
    for event_type, description, timestamp, data in SEED_EVENTS:
        entry = CATALOGUE[event_type]
        assert (entry.type, entry.description, entry.origin) == (event_type, description, "seed")
        assert (entry.example_timestamp, entry.example_data) == (timestamp, data)
    assert CATALOGUE["webhook.test"].origin == "webhookd"


def test_the_seed_examples_keep_the_documentations_no_break_space() -> None:
    assert EXAMPLES["booking.created"]["customerEmail"] == "[email\u00a0protected]"
    assert EXAMPLES["customer.created"]["email"] == "[email\u00a0protected]"


@pytest.mark.parametrize("event_type", list(CATALOGUE))
def test_each_example_matches_its_own_model(event_type: str) -> None:
    entry = CATALOGUE[event_type]
    assert check_data(event_type, entry.example_data) is None
    model = entry.model.model_validate(dict(entry.example_data))
    assert model.model_dump() == entry.example_data  # every field of the example is modelled


def test_the_test_ping_says_what_it_is() -> None:
    data = CATALOGUE["webhook.test"].example_data
    assert data["id"].startswith("test_")
    assert data["message"] == "This is a test event from webhookd"


# -- what check_data reports -------------------------------------------------------------------


@pytest.mark.parametrize(("event_type", "field"), required_fields())
def test_a_missing_required_field_is_named(event_type: str, field: str) -> None:
    assert check_data(event_type, without(event_type, field)) == (
        f"data.{field}: required field is missing"
    )


def test_ids_and_statuses_are_required_everywhere() -> None:
    required = set(required_fields())
    for event_type in CATALOGUE:
        assert (event_type, "id") in required
        if "status" in CATALOGUE[event_type].model.model_fields:
            assert (event_type, "status") in required


@pytest.mark.parametrize(
    ("event_type", "field", "value", "problem"),
    [
        ("booking.created", "totalAmount", "9000", "expected an integer, got a string"),
        (
            "booking.created",
            "participants",
            2.5,
            "expected an integer, got a number with a fraction",
        ),
        ("booking.created", "participants", True, "expected an integer, got a boolean"),
        ("booking.created", "participants", 0, "input should be greater than or equal to 1"),
        ("booking.created", "id", 123, "expected a string, got an integer"),
        ("booking.created", "startTime", None, "expected a string, got null"),
        ("booking.confirmed", "status", "", "must not be empty"),
        ("booking.cancelled", "refundAmount", -1, "input should be greater than or equal to 0"),
        ("booking.updated", "changes", [], "expected an object, got an array"),
        ("booking.updated", "changes", {}, "must not be empty"),
        ("payment.succeeded", "amount", "90.00", "expected an integer, got a string"),
        ("payment.succeeded", "method", {"type": "card"}, "expected a string, got an object"),
        ("payment.failed", "currency", "usd", "string should match pattern '^[A-Z]{3}$'"),
        ("customer.created", "phone", 1234567890, "expected a string, got an integer"),
    ],
)
def test_a_wrong_type_or_value_is_named_with_what_was_expected(
    event_type: str, field: str, value: object, problem: str
) -> None:
    assert check_data(event_type, example(event_type, **{field: value})) == (
        f"data.{field}: {problem}"
    )


def test_the_problem_never_echoes_the_value() -> None:
    # Values may be personal data; the line goes to logs and the quarantine table.
    problem = check_data("customer.created", example("customer.created", email=["jane@x.test"]))
    assert problem == "data.email: expected a string, got an array"
    problem = check_data("payment.failed", example("payment.failed", currency="secret-ish"))
    assert problem is not None
    assert "secret-ish" not in problem


def test_nested_problems_give_the_path_into_changes() -> None:
    changes = {"participants": {"old": 2}, "start time": {"new": "x"}}
    problem = check_data("booking.updated", {"id": "book_123", "changes": changes})
    assert (
        problem == "data.changes.participants.new: required field is missing (and 1 more problem)"
    )
    only_odd_key = {"id": "book_123", "changes": {"start time": {"new": "x"}}}
    assert check_data("booking.updated", only_odd_key) == (
        'data.changes["start time"].old: required field is missing'
    )


def test_several_problems_are_counted_after_the_first() -> None:
    assert check_data("booking.confirmed", {}) == (
        "data.id: required field is missing (and 2 more problems)"
    )


def test_extra_fields_are_allowed_at_every_level() -> None:
    data = example("booking.created", loyaltyTier="gold", notes={"any": ["thing", 1]})
    assert check_data("booking.created", data) is None
    changes = {"participants": {"old": 2, "new": 3, "reason": "phone call"}}
    assert check_data("booking.updated", {"id": "b", "changes": changes}) is None


@pytest.mark.parametrize(
    ("event_type", "field"),
    [
        ("booking.cancelled", "reason"),
        ("payment.failed", "errorMessage"),
        ("customer.created", "phone"),
    ],
)
def test_optional_fields_may_be_absent_or_null(event_type: str, field: str) -> None:
    assert check_data(event_type, without(event_type, field)) is None
    assert check_data(event_type, example(event_type, **{field: None})) is None


def test_change_values_may_be_any_json_value_null_included() -> None:
    changes = {"notes": {"old": None, "new": "window seat"}, "tags": {"old": [], "new": ["vip"]}}
    assert check_data("booking.updated", {"id": "b", "changes": changes}) is None


def test_an_integral_float_is_the_integer_receivers_read() -> None:
    # The body is JavaScript-canonical: 9000.0 is sent as 9000.
    assert check_data("payment.succeeded", example("payment.succeeded", amount=9000.0)) is None


def test_any_mapping_is_checked() -> None:
    assert check_data("booking.confirmed", MappingProxyType(EXAMPLES["booking.confirmed"])) is None


def test_types_outside_the_catalogue_are_left_to_the_caller() -> None:
    assert check_data("invoice.paid", {"whatever": True}) is None
    assert check_data("booking.create", {}) is None


# -- the policy applied to outbox rows ------------------------------------------------------------


def outbox_row(event_type: str, data: object, outbox_id: int = 7) -> OutboxRow:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return OutboxRow(outbox_id, event_type, payload, f"evt_{outbox_id}", None, None)


BAD_AMOUNT = example("payment.succeeded", amount="9000")
AMOUNT_PROBLEM = "data.amount: expected an integer, got a string"


def classify(row: OutboxRow, **policy: Any) -> Any:
    return classify_row(row, max_payload_bytes=65536, now=NOW, policy=CataloguePolicy(**policy))


def test_warn_delivers_the_event_unaltered_and_reports_the_problem() -> None:
    outcome = classify(outbox_row("payment.succeeded", BAD_AMOUNT), schema_mismatch="warn")
    assert isinstance(outcome.item, Event)
    assert json.loads(outcome.item.body)["data"] == BAD_AMOUNT
    assert outcome.schema_problem == AMOUNT_PROBLEM


def test_warn_reports_nothing_for_matching_data() -> None:
    outcome = classify(outbox_row("payment.succeeded", EXAMPLES["payment.succeeded"]))
    assert isinstance(outcome.item, Event)
    assert outcome.schema_problem is None


def test_deliver_does_not_check() -> None:
    outcome = classify(outbox_row("payment.succeeded", BAD_AMOUNT), schema_mismatch="deliver")
    assert isinstance(outcome.item, Event)
    assert outcome.schema_problem is None


def test_quarantine_refuses_the_row_with_the_problem() -> None:
    outcome = classify(outbox_row("payment.succeeded", BAD_AMOUNT), schema_mismatch="quarantine")
    assert isinstance(outcome.item, Quarantined)
    assert (outcome.item.reason, outcome.item.event_type, outcome.item.event_id) == (
        "schema_mismatch",
        "payment.succeeded",
        "evt_7",
    )
    assert AMOUNT_PROBLEM in outcome.item.detail
    good = classify(
        outbox_row("payment.succeeded", EXAMPLES["payment.succeeded"]), schema_mismatch="quarantine"
    )
    assert isinstance(good.item, Event)


def test_unknown_types_are_delivered_unless_disallowed() -> None:
    row = outbox_row("invoice.paid", {"id": "inv_1"})
    assert isinstance(classify(row).item, Event)
    refused = classify(row, allow_unknown_types=False).item
    assert isinstance(refused, Quarantined)
    assert refused.reason == "unknown_event_type"
    assert "invoice.paid" in refused.detail
    known = classify(outbox_row("booking.confirmed", EXAMPLES["booking.confirmed"]),
                     allow_unknown_types=False)  # fmt: skip
    assert isinstance(known.item, Event)


def test_contract_problems_come_before_catalogue_problems() -> None:
    refused = classify(outbox_row("payment.succeeded", "[1]"), schema_mismatch="quarantine").item
    assert isinstance(refused, Quarantined)
    assert refused.reason == "not_object"


def test_event_from_row_applies_the_policy_it_is_given() -> None:
    row = outbox_row("payment.succeeded", BAD_AMOUNT)
    assert isinstance(event_from_row(row, max_payload_bytes=65536, now=NOW), Event)
    refused = event_from_row(
        row,
        max_payload_bytes=65536,
        now=NOW,
        policy=CataloguePolicy(schema_mismatch="quarantine"),
    )
    assert isinstance(refused, Quarantined)


def test_the_fanout_plan_carries_the_warnings_with_their_rows() -> None:
    endpoint = Endpoint(id="a", url="http://127.0.0.1:1/hook", secret="s")
    rows = [
        outbox_row("payment.succeeded", EXAMPLES["payment.succeeded"], outbox_id=1),
        outbox_row("payment.succeeded", BAD_AMOUNT, outbox_id=2),
        outbox_row("payment.succeeded", "not json", outbox_id=3),
    ]
    plan = plan_fanout(rows, [endpoint], max_payload_bytes=65536, now=NOW)
    assert [p.event.outbox_id for p in plan.events] == [1, 2]
    assert [p.deliveries[0].endpoint_id for p in plan.events] == ["a", "a"]
    assert [q.outbox_id for q in plan.quarantined] == [3]
    [warning] = plan.schema_warnings
    assert (warning.outbox_id, warning.event_id, warning.event_type, warning.problem) == (
        2,
        "evt_2",
        "payment.succeeded",
        AMOUNT_PROBLEM,
    )


# -- settings ----------------------------------------------------------------------------------


def test_the_events_section_defaults_to_warn_and_allowing_unknown_types() -> None:
    policy = Settings.model_validate({}).events.policy()
    assert policy == CataloguePolicy(schema_mismatch="warn", allow_unknown_types=True)


def test_the_events_section_is_read_from_the_file_and_the_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "webhookd.toml"
    path.write_text('[events]\nschema_mismatch = "quarantine"\nallow_unknown_types = false\n')
    assert load_settings(path).events.policy() == CataloguePolicy("quarantine", False)
    monkeypatch.setenv("WEBHOOKD_EVENTS__SCHEMA_MISMATCH", "deliver")
    assert load_settings(path).events.schema_mismatch == "deliver"


def test_a_misspelt_policy_is_a_config_error_naming_the_key(tmp_path: Any) -> None:
    path = tmp_path / "webhookd.toml"
    path.write_text('[events]\nschema_mismatch = "drop"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    [problem] = caught.value.problems
    assert problem.startswith("events.schema_mismatch: ")
    assert "'deliver', 'warn' or 'quarantine'" in problem


# -- webhookd events list / show ---------------------------------------------------------------


def run_cli(argv: Sequence[str]) -> int:
    return cli.main(list(argv))


def test_events_list_shows_types_descriptions_and_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(["events", "list"]) == 0
    out = capsys.readouterr().out
    for event_type, entry in CATALOGUE.items():
        assert f"{event_type}  {entry.description}" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == ["totalAmount", "integer", ">="] for line in lines)
    assert any(line.split() == ["reason", "string", "|", "null", "optional"] for line in lines)
    assert "webhookd's own" in out.split("webhook.test", 1)[1]
    assert "webhookd's own" not in out.split("webhook.test", 1)[0]


def test_events_list_json_describes_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["events", "list", "--json"]) == 0
    listed = {item["type"]: item for item in json.loads(capsys.readouterr().out)}
    assert list(listed) == list(CATALOGUE)
    created = listed["booking.created"]
    assert created["origin"] == "seed"
    fields = {f["name"]: f for f in created["fields"]}
    assert list(fields) == list(EXAMPLES["booking.created"])
    assert fields["participants"]["type"] == "integer >= 1"
    assert fields["customerEmail"] == {
        "name": "customerEmail",
        "type": "string",
        "required": True,
        "description": "",
    }
    assert created["schema"]["required"] == list(EXAMPLES["booking.created"])
    assert created["example"]["data"] == EXAMPLES["booking.created"]
    cancelled = {f["name"]: f["required"] for f in listed["booking.cancelled"]["fields"]}
    assert cancelled["reason"] is False
    assert listed["webhook.test"]["origin"] == "webhookd"


def test_events_show_prints_the_envelope_the_receiver_gets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(["events", "show", "booking.updated"]) == 0
    out = capsys.readouterr().out
    envelope = json.loads(out)
    assert list(envelope) == ["event", "timestamp", "data"]
    assert envelope == {
        "event": "booking.updated",
        "timestamp": "2024-01-15T10:15:00Z",
        "data": EXAMPLES["booking.updated"],
    }
    assert out.startswith('{\n  "event": "booking.updated",\n')  # pretty-printed, as the docs


def test_events_show_data_prints_only_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["events", "show", "customer.created", "--data"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == EXAMPLES["customer.created"]
    assert "[email\u00a0protected]" in out  # printed as the receiver reads it, not escaped


def test_events_show_of_an_unknown_type_suggests_the_closest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(["events", "show", "booking.create"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "'booking.create' is not in the event catalogue" in captured.err
    assert "did you mean booking.created?" in captured.err
