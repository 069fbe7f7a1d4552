"""``webhookd events show EVENT_ID``: where did this event go, and what happened at each endpoint?

The event (type, tenant, occurred_at, outbox row), why its outbox row was quarantined if it was,
then one block per delivery with its state and every attempt.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from webhookd.cli.common import EXIT_OK, iso, print_json, run_async, settings_from_args, with_store
from webhookd.cli.deliveries import delivery_dict, print_delivery
from webhookd.models import DeliveryFilter, DeliveryRecord, EventRecord, QuarantineRecord
from webhookd.store.base import Store


@dataclass(frozen=True, slots=True)
class EventTrace:
    event_id: str
    event: EventRecord | None  # None: never fanned out
    waiting_outbox_id: int | None  # its outbox row, while not fanned out yet
    quarantined: tuple[QuarantineRecord, ...]
    deliveries: tuple[DeliveryRecord, ...]  # oldest first, each with every attempt


async def trace_event(store: Store, event_id: str) -> EventTrace | None:
    """Everything the database knows about ``event_id``; None when it knows nothing."""
    event = await store.get_event(event_id)
    quarantined = tuple(await store.quarantined_event(event_id))
    waiting = await store.unprocessed_outbox_id(event_id) if event is None else None
    if event is None and waiting is None and not quarantined:
        return None
    deliveries: list[DeliveryRecord] = []
    if event is not None:
        listed = await store.list_deliveries(DeliveryFilter(event_id=event_id, limit=-1))
        for d in reversed(listed):
            full = await store.get_delivery(d.delivery_id)
            deliveries.append(full if full is not None else d)
    return EventTrace(event_id, event, waiting, quarantined, tuple(deliveries))


def _quarantine_dict(q: QuarantineRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(q), "quarantined_at": iso(q.quarantined_at)}


def trace_dict(t: EventTrace) -> dict[str, Any]:
    event = None
    if t.event is not None:
        event = {**dataclasses.asdict(t.event), "created_at": iso(t.event.created_at)}
    return {
        "event_id": t.event_id,
        "event": event,
        "waiting_in_outbox": t.waiting_outbox_id,
        "quarantined": [_quarantine_dict(q) for q in t.quarantined],
        "deliveries": [delivery_dict(d) for d in t.deliveries],
    }


def print_trace(t: EventTrace) -> None:
    e = t.event
    print(f"event       {t.event_id}")
    if e is not None:
        print(f"type        {e.event_type}")
        print(f"tenant      {e.tenant or '-'}")
        print(f"occurred    {e.occurred_at}")
        source = f"row {e.outbox_id}" if e.outbox_id is not None else "none (webhookd send-test)"
        print(f"outbox      {source}")
        print(f"fanned out  {iso(e.created_at)}")
    elif t.waiting_outbox_id is not None:
        print(
            f"outbox      row {t.waiting_outbox_id}, not fanned out yet (is `webhookd run` "
            "running on this database?)"
        )
    for q in t.quarantined:
        kind = f" ({q.event_type})" if q.event_type else ""
        print(
            f"quarantined outbox row {q.outbox_id}{kind} at {iso(q.quarantined_at)}: "
            f"{q.reason}: {q.detail}"
        )
    if e is None:
        return
    if not t.deliveries:
        print("deliveries  none: no enabled endpoint matched its type and tenant at fan-out")
        return
    states = Counter(d.state for d in t.deliveries)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    print(f"deliveries  {len(t.deliveries)}: {summary}")
    for d in t.deliveries:
        print()
        print_delivery(d, indent="  ")


def show_event(args: argparse.Namespace) -> int | None:
    """Print the trace of the event ``args.event_type`` names; None when there is no such
    event (nothing printed)."""
    settings = settings_from_args(args)
    trace = run_async(with_store(settings, lambda store: trace_event(store, args.event_type)))
    if trace is None:
        return None
    if getattr(args, "json", False):
        print_json(trace_dict(trace))
    else:
        print_trace(trace)
    return EXIT_OK
