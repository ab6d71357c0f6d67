"""Small builders shared by the formula tests: events and one-call evaluation, all in memory."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from core.formula import (
    DEFAULT_RESULT_OPTIONS,
    Evaluation,
    EventRecord,
    ResultOptions,
    VariableValue,
    compile_formula,
    inputs_from_events,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def ev(
    kind: str,
    amount: str | int | Decimal,
    *,
    minute: int = 0,
    event_id: int | None = None,
    currency: str = "EUR",
    **attributes: str | Decimal | bool | None,
) -> EventRecord:
    """An event ``minute`` minutes after T0; ids increase in creation order unless given."""
    return EventRecord(
        event_id=next(_ids) if event_id is None else event_id,
        kind=kind,
        amount=Decimal(amount),
        currency=currency,
        occurred_at=T0 + timedelta(minutes=minute),
        attributes=attributes,
    )


def run(
    source: str,
    events: Iterable[EventRecord] = (),
    *,
    properties: Mapping[str, str | Decimal | bool | None] | None = None,
    currency: str | None = "EUR",
    variables: Mapping[str, VariableValue] | None = None,
    options: ResultOptions = DEFAULT_RESULT_OPTIONS,
) -> Evaluation:
    """Compile and evaluate a formula for one customer with the in-memory aggregation."""
    formula = compile_formula(source, variables=variables)
    inputs = inputs_from_events(
        formula.aggregates, events, properties=properties, currency=currency
    )
    return formula.evaluate(inputs, options)


def deposits(*amounts: str | int) -> list[EventRecord]:
    """Deposits in time order (the last one given is the latest)."""
    return [ev("deposit", a, minute=i) for i, a in enumerate(amounts)]
