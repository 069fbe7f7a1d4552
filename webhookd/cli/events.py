"""``webhookd events list|show``: the event catalogue, as receivers' developers need it, and
where one event went.

webhookd events list [--json]          # types, descriptions, fields with types
webhookd events show booking.created   # the example body, as the receiver gets it
webhookd events show EVENT_ID [--json] # that event, and each delivery with every attempt
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from webhookd import canonical_json
from webhookd.catalogue import CATALOGUE, CatalogueEntry
from webhookd.cli.event_trace import show_event
from webhookd.errors import NotFoundError, WebhookdError
from webhookd.events import build_body

EXIT_OK = 0
EXIT_USAGE = 2

_OWN_MARK = "webhookd's own: sent by `webhookd send-test`, never by the application"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One top-level field of an event's ``data``, for people."""

    name: str
    type: str
    required: bool
    description: str


def add_events_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common_parents: Sequence[argparse.ArgumentParser] = (),
    listing_parent: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """Add ``events list`` and ``events show`` to ``subparsers``; each sets ``func``.

    ``listing_parent`` is the parser that adds ``--json`` to listings.
    """
    events = subparsers.add_parser(
        "events",
        help="the event catalogue: known event types and their payloads",
        description="The event catalogue: the event types receivers are told about, the fields "
        "of their data, and an example of each.",
        parents=list(common_parents),
    )
    sub = events.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    listing = [listing_parent] if listing_parent is not None else []
    p = sub.add_parser(
        "list",
        help="event types with their descriptions and fields",
        description="Event types with their descriptions and the fields of their data (extra "
        "fields are always allowed).",
        parents=[*common_parents, *listing],
    )
    if listing_parent is None:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_events_list)
    p = sub.add_parser(
        "show",
        help="an event type's example, or where an event went (by its id)",
        description="Given an event type of the catalogue: print its example body (the full "
        "envelope) as the receiver gets it, pretty-printed. Given an event id: the event and, "
        "for each endpoint it went to, the delivery's state and every attempt.",
        parents=[*common_parents, *listing],
    )
    if listing_parent is None:
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "event_type",
        metavar="TYPE_OR_EVENT_ID",
        help="event type, e.g. booking.created, or an event id",
    )
    p.add_argument(
        "--data",
        action="store_true",
        help='print only the data, e.g. for `webhookd enqueue TYPE "$(...)"`',
    )
    p.set_defaults(func=cmd_events_show)
    return events


# -- commands ----------------------------------------------------------------------------------


def cmd_events_list(args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps([entry_as_json(e) for e in CATALOGUE.values()], indent=2,
                         ensure_ascii=False))  # fmt: skip
        return EXIT_OK
    for i, entry in enumerate(CATALOGUE.values()):
        if i:
            print()
        print(f"{entry.type}  {entry.description}")
        if entry.origin == "webhookd":
            print(f"  ({_OWN_MARK})")
        specs = field_specs(entry)
        name_width = max(len(s.name) for s in specs)
        type_width = max(len(s.type) for s in specs)
        for spec in specs:
            flag = "required" if spec.required else "optional"
            line = f"  {spec.name.ljust(name_width)}  {spec.type.ljust(type_width)}  {flag}"
            print(f"{line}  {spec.description}".rstrip())
    print()
    print("Extra fields are allowed. `webhookd events show TYPE` prints an example.")
    return EXIT_OK


def cmd_events_show(args: argparse.Namespace) -> int:
    entry = CATALOGUE.get(args.event_type)
    if entry is None:
        hint = difflib.get_close_matches(args.event_type, list(CATALOGUE), n=1)
        if not args.data:
            # Not a catalogue type: an event id? (A near-miss of a type is reported as such.)
            try:
                shown = show_event(args)
            except WebhookdError:
                if not hint:
                    raise
                shown = None
            if shown is not None:
                return shown
            if not hint:
                raise NotFoundError(
                    f"{args.event_type!r} is neither an event type of the catalogue nor the id "
                    "of an event in the database (or the outbox, or the quarantine)"
                )
        also = f" (did you mean {hint[0]}?)" if hint else ""
        print(
            f"webhookd: error: {args.event_type!r} is not in the event catalogue{also}; "
            "`webhookd events list` shows the known types",
            file=sys.stderr,
        )
        return EXIT_USAGE
    value: Any = example_data(entry) if args.data else example_envelope(entry)
    print(json.dumps(value, indent=2, ensure_ascii=False))
    return EXIT_OK


# -- presentation ------------------------------------------------------------------------------


def example_body(entry: CatalogueEntry) -> bytes:
    """The exact body webhookd sends for the entry's example (signed as it is)."""
    data = canonical_json.dumps(dict(entry.example_data))
    return build_body(entry.type, entry.example_timestamp, data)


def example_envelope(entry: CatalogueEntry) -> dict[str, Any]:
    """The example body parsed, keys in the order sent: what ``JSON.parse`` gives a receiver."""
    envelope: dict[str, Any] = json.loads(example_body(entry))
    return envelope


def example_data(entry: CatalogueEntry) -> dict[str, Any]:
    data: dict[str, Any] = example_envelope(entry)["data"]
    return data


def entry_as_json(entry: CatalogueEntry) -> dict[str, Any]:
    return {
        "type": entry.type,
        "description": entry.description,
        "origin": entry.origin,
        "fields": [asdict(spec) for spec in field_specs(entry)],
        "schema": entry.model.model_json_schema(),
        "example": example_envelope(entry),
    }


def field_specs(entry: CatalogueEntry) -> list[FieldSpec]:
    """The top-level fields of the entry's data, in the model's order."""
    schema = entry.model.model_json_schema()
    defs: Mapping[str, Any] = schema.get("$defs", {})
    required = set(schema.get("required", ()))
    return [
        FieldSpec(name, type_text(prop, defs), name in required, prop.get("description", ""))
        for name, prop in schema["properties"].items()
    ]


def type_text(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    """A JSON Schema type as a short phrase: ``integer >= 0``, ``string | null``."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        return "{" + ", ".join(target.get("properties", {})) + "}"
    if "anyOf" in schema:
        return " | ".join(type_text(s, defs) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind is None:
        return "any"
    text = str(kind)
    values = schema.get("additionalProperties")
    if kind == "object" and isinstance(values, Mapping):
        text = f"object of name -> {type_text(values, defs)}"
    if schema.get("minLength") == 1 or schema.get("minProperties") == 1:
        text = f"non-empty {text}"
    if "minimum" in schema:
        text += f" >= {schema['minimum']}"
    if "pattern" in schema:
        text += f" matching {schema['pattern']}"
    return text
