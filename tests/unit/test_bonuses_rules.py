"""core.bonuses.rules: automation rules (every N matching events with accumulation, a
qualification with an execution limit, the rule's transaction period) and weekly schedules."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest

from core.bonuses.rules import (
    Firing,
    PeriodMode,
    Qualification,
    Rule,
    RuleState,
    Schedule,
    apply_event,
    compile_filter,
    next_run,
    validate_rule,
    validate_schedule,
)
from core.errors import InvalidArgument
from core.formula import EventRecord

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
MICRO = timedelta(microseconds=1)


def event(kind: str, amount: str, minute: int, **attributes: str) -> EventRecord:
    return EventRecord(event_id=minute, kind=kind, amount=Decimal(amount), currency="EUR",
                       occurred_at=T0 + timedelta(minutes=minute), attributes=attributes)


def run(rule: Rule, events: list[EventRecord],
        state: RuleState | None = None) -> tuple[RuleState, list[Firing]]:
    state = state or RuleState()
    firings = []
    for e in events:
        state, firing = apply_event(rule, state, e)
        if firing is not None:
            firings.append(firing)
    return state, firings


def test_every_n_matching_events_with_accumulation() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 3, compile_filter(
        "bet", 'game = "Gold Quest"', field="filter"), period_mode=PeriodMode.FIRST_TO_LAST))
    gold = [event("bet", "1", m, game="Gold Quest") for m in range(5)]
    other = [event("bet", "1", 10 + m, game="Other") for m in range(5)]
    state, firings = run(rule, gold[:2] + other)
    assert firings == [] and state.accumulated == 2 and state.first_event_at == T0
    state, firings = run(rule, gold[2:], state)  # a later call: the count carries over
    assert firings == [Firing(1, (T0, T0 + timedelta(minutes=2) + MICRO))]
    assert (state.accumulated, state.first_event_at) == (2, T0 + timedelta(minutes=3))


def test_events_out_of_order_still_give_a_window_around_all_counted_events() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 3, period_mode=PeriodMode.FIRST_TO_LAST))
    _, firings = run(rule, [event("bet", "1", 5), event("bet", "1", 9), event("bet", "1", 2)])
    assert firings == [Firing(1, (T0 + timedelta(minutes=2),
                                  T0 + timedelta(minutes=9) + MICRO))]


def test_qualification_and_the_execution_limit() -> None:
    rule = validate_rule(Rule(
        "r", "d", "bet", 1, qualification=Qualification("deposit", Decimal(100)),
        max_executions=3, period_mode=PeriodMode.QUALIFICATION_TO_LAST))
    events = [event("bet", "1", 0), event("deposit", "99.99", 1), event("deposit", "100", 2),
              *[event("bet", "1", 3 + m) for m in range(5)], event("deposit", "500", 10),
              event("bet", "1", 11)]
    state, firings = run(rule, events)
    qualified = T0 + timedelta(minutes=2)
    assert [f.period for f in firings] == [
        (qualified, T0 + timedelta(minutes=3) + MICRO),
        (qualified, T0 + timedelta(minutes=4) + MICRO),
        (qualified, T0 + timedelta(minutes=5) + MICRO),
        (T0 + timedelta(minutes=10), T0 + timedelta(minutes=11) + MICRO)]
    assert [f.number for f in firings] == [1, 2, 3, 4]
    assert (state.executions, state.fired) == (1, 4)


def test_fixed_end_and_definition_periods() -> None:
    end = datetime(2026, 12, 1, tzinfo=UTC)
    fixed = validate_rule(Rule("r", "d", "bet", 2, period_mode=PeriodMode.FIRST_TO_FIXED_END,
                               period_end=end))
    _, firings = run(fixed, [event("bet", "1", 1), event("bet", "1", 2)])
    assert firings == [Firing(1, (T0 + timedelta(minutes=1), end))]
    own = validate_rule(Rule("r", "d", "bet", 1))
    _, firings = run(own, [event("bet", "1", 1)])
    assert firings == [Firing(1, None)]


@pytest.mark.parametrize(("rule", "field"), [
    (Rule("R", "d", "bet", 1), "rule_id"),
    (Rule("r", "d", "Bet", 1), "event_kind"),
    (Rule("r", "d", "bet", 0), "every"),
    (Rule("r", "d", "bet", 1, max_executions=3), "max_executions"),
    (Rule("r", "d", "bet", 1, qualification=Qualification("deposit"), max_executions=0),
     "max_executions"),
    (Rule("r", "d", "bet", 1, period_mode=PeriodMode.QUALIFICATION_TO_LAST), "period_mode"),
    (Rule("r", "d", "bet", 1, period_mode=PeriodMode.FIRST_TO_FIXED_END), "period_end"),
    (Rule("r", "d", "bet", 1, period_end=T0), "period_end"),
    (Rule("r", "d", "bet", 1, qualification=Qualification("deposit", Decimal(-1))),
     "qualification.min_amount"),
])
def test_bad_rules(rule: Rule, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_rule(rule)
    assert caught.value.metadata["field"] == field


def test_filters_use_the_formula_syntax() -> None:
    flt = compile_filter("bet", 'game = "Gold Quest" and game_category != "Roulette"',
                         field="filter")
    assert [f.describe() for f in flt] == ['game = "Gold Quest"',
                                          'game_category != "Roulette"']
    assert compile_filter("bet", "  ", field="filter") == ()
    with pytest.raises(InvalidArgument) as caught:
        compile_filter("bet", "game = Gold", field="filter")
    assert caught.value.metadata == {"field": "filter", "column": "8"}
    with pytest.raises(InvalidArgument):
        compile_filter("bet", 'game = "a"\nor x', field="filter")


def test_schedules_run_weekly_or_daily_at_a_local_time() -> None:
    monday = validate_schedule(Schedule("s", "d", ("c1",), 1, time(6, 0), "Europe/Berlin"))
    sunday_noon = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert next_run(monday, sunday_noon) == datetime(2026, 11, 23, 5, 0, tzinfo=UTC)
    at_run = datetime(2026, 11, 23, 5, 0, tzinfo=UTC)
    assert next_run(monday, at_run) == datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
    daily = validate_schedule(Schedule("s", "d", ("c1",), None, time(0, 30), "UTC"))
    validate_schedule(Schedule("s", "d", (), None, time(0, 30), "UTC", campaign_id="c",
                               since_campaign_entrance=True))
    assert next_run(daily, sunday_noon) == datetime(2026, 11, 23, 0, 30, tzinfo=UTC)
    # Across the end of summer time in Berlin (2026-10-25): still 06:00 local.
    before = datetime(2026, 10, 20, tzinfo=UTC)
    assert next_run(monday, before) == datetime(2026, 10, 26, 5, 0, tzinfo=UTC)
    assert next_run(monday, datetime(2026, 10, 1, tzinfo=UTC)) == datetime(
        2026, 10, 5, 4, 0, tzinfo=UTC)
    for bad, field in ((Schedule("s", "d", (), 1, time(6), "UTC"), "customer_ids"),
                       (Schedule("s", "d", ("a", "a"), 1, time(6), "UTC"), "customer_ids"),
                       (Schedule("s", "d", ("a",), 8, time(6), "UTC"), "weekday"),
                       (Schedule("s", "d", ("a",), 1, time(6), "UTC", campaign_id="c"),
                        "customer_ids"),
                       (Schedule("s", "d", ("a",), 1, time(6), "UTC",
                                 since_campaign_entrance=True), "since_campaign_entrance")):
        with pytest.raises(InvalidArgument) as caught:
            validate_schedule(bad)
        assert caught.value.metadata["field"] == field
    with pytest.raises(InvalidArgument) as caught:
        validate_schedule(Schedule("s", "d", ("a",), 1, time(6), "Mars/Base"))
    assert caught.value.reason == "INVALID_TIME_ZONE"
