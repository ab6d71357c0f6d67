"""core.bonuses.rules, three review findings: API request ids never take a trigger's request
key, nothing counts from a rule's fixed end on, and a qualification's minimum amount has a
currency (the rule's, else the customer's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.bonuses.rules import (
    Firing,
    PeriodMode,
    Qualification,
    Rule,
    RuleState,
    api_request_key,
    apply_event,
    check_api_request_id,
    counting_end,
    qualifies,
    rule_request_key,
    schedule_request_key,
    validate_rule,
)
from core.errors import InvalidArgument
from core.formula import EventRecord
from core.periods import FixedPeriod, Period, TimeBackPeriod

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
END = T0 + timedelta(minutes=10)


def event(kind: str, amount: str, minute: int, currency: str = "EUR") -> EventRecord:
    return EventRecord(event_id=minute, kind=kind, amount=Decimal(amount), currency=currency,
                       occurred_at=T0 + timedelta(minutes=minute), attributes={})


def run(rule: Rule, events: list[EventRecord], *, customer_currency: str | None = None,
        definition_period: Period | None = None) -> tuple[RuleState, list[Firing]]:
    state, firings = RuleState(), []
    for e in events:
        state, firing = apply_event(rule, state, e, customer_currency=customer_currency,
                                    definition_period=definition_period)
        if firing is not None:
            firings.append(firing)
    return state, firings


# --- request keys ------------------------------------------------------------------------------


def test_trigger_and_api_keys_keep_their_stored_formats() -> None:
    assert rule_request_key("gold-quest", 3, "c/1") == "rule:gold-quest:3/c/1"
    assert schedule_request_key("monday", T0, "c1") == (
        "schedule:monday:2026-11-22T08:00:00+00:00/c1")
    assert api_request_key("req-1", "c1") == "req-1/c1"


@pytest.mark.parametrize("request_id", ["rule:x:1", "rule:", "schedule:s:2026-11-23",
                                        "schedule:"])
def test_api_request_ids_with_a_trigger_prefix_are_refused(request_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_api_request_id(request_id)
    assert caught.value.reason == "INVALID_REQUEST_ID"
    assert caught.value.metadata == {"field": "request_id"}
    assert caught.value.message == (
        f"request_id {request_id!r} starts with a prefix reserved for the requests of "
        "automation rules and schedules ('rule:', 'schedule:'); use another request_id")


@pytest.mark.parametrize("request_id", ["rule", "Rule:x:1", "rules:x", "x-rule:1", "schedule",
                                        "schedules:1", "r"])
def test_other_api_request_ids_pass(request_id: str) -> None:
    assert check_api_request_id(request_id) == request_id
    key = api_request_key(request_id, "c1")
    assert not key.startswith(("rule:", "schedule:"))


# --- fixed ends ----------------------------------------------------------------------------------


def test_first_to_fixed_end_ignores_events_from_the_end_on() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 2, period_mode=PeriodMode.FIRST_TO_FIXED_END,
                              period_end=END))
    state, firings = run(rule, [event("bet", "1", 1), event("bet", "1", 9),
                                event("bet", "1", 9), event("bet", "1", 10),
                                event("bet", "1", 11), event("bet", "1", 12)])
    assert firings == [Firing(1, (T0 + timedelta(minutes=1), END))]
    assert (state.accumulated, state.fired) == (1, 1)


def test_qualification_to_fixed_end_ignores_a_qualification_at_the_end() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 1, qualification=Qualification("deposit"),
                              period_mode=PeriodMode.QUALIFICATION_TO_FIXED_END,
                              period_end=END))
    state, firings = run(rule, [event("deposit", "5", 10), event("bet", "1", 11)])
    assert firings == [] and state == RuleState()
    state, firings = run(rule, [event("deposit", "5", 9), event("bet", "1", 9),
                                event("deposit", "5", 10), event("bet", "1", 10)])
    assert firings == [Firing(1, (T0 + timedelta(minutes=9), END))]
    assert state.qualified_at == T0 + timedelta(minutes=9)  # the late deposit changed nothing


def test_a_definitions_fixed_dates_end_the_counting() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 1))
    fixed = FixedPeriod(T0 - timedelta(days=1), END)
    _, firings = run(rule, [event("bet", "1", 9), event("bet", "1", 10)],
                     definition_period=fixed)
    assert firings == [Firing(1, None)]
    assert counting_end(rule, fixed) == END


def test_windows_that_move_have_no_end() -> None:
    back = TimeBackPeriod(1, "days")
    assert counting_end(validate_rule(Rule("r", "d", "bet", 1)), back) is None
    assert counting_end(validate_rule(Rule("r", "d", "bet", 1)), None) is None
    last = validate_rule(Rule("r", "d", "bet", 1, period_mode=PeriodMode.FIRST_TO_LAST))
    assert counting_end(last, FixedPeriod(T0, END)) is None
    _, firings = run(last, [event("bet", "1", 9), event("bet", "1", 60)])
    assert len(firings) == 2


# --- the qualification's currency ----------------------------------------------------------------


def test_a_minimum_without_a_currency_is_in_the_customers_currency() -> None:
    q = Qualification("deposit", Decimal(100))
    assert not qualifies(q, event("deposit", "100", 0, "JPY"), "EUR")
    assert qualifies(q, event("deposit", "100", 0, "EUR"), "EUR")
    assert not qualifies(q, event("deposit", "99.99", 0, "EUR"), "EUR")
    assert qualifies(q, event("deposit", "100", 0, "JPY"), None)  # nothing names a currency
    anything = Qualification("deposit")  # no amount: any currency
    assert qualifies(anything, event("deposit", "1", 0, "JPY"), "EUR")


def test_a_qualification_currency_wins_over_the_customers() -> None:
    q = validate_rule(Rule("r", "d", "bet", 1, qualification=Qualification(
        "deposit", Decimal(100), currency="EUR"))).qualification
    assert q is not None
    assert not qualifies(q, event("deposit", "20000", 0, "JPY"), "JPY")
    assert qualifies(q, event("deposit", "100", 0, "EUR"), "JPY")
    assert qualifies(q, event("deposit", "100", 0, "EUR"), None)
    any_amount = Qualification("deposit", currency="EUR")
    assert not qualifies(any_amount, event("deposit", "1", 0, "USD"), None)


def test_a_rule_qualifies_with_the_customers_currency() -> None:
    rule = validate_rule(Rule("r", "d", "bet", 1,
                              qualification=Qualification("deposit", Decimal(100))))
    events = [event("deposit", "100", 0, "JPY"), event("bet", "1", 1),
              event("deposit", "100", 2, "EUR"), event("bet", "1", 3)]
    state, firings = run(rule, events, customer_currency="EUR")
    assert [f.number for f in firings] == [1]
    assert state.qualified_at == T0 + timedelta(minutes=2)


@pytest.mark.parametrize("currency", ["eur", "EURO", "", "E1R"])
def test_a_bad_qualification_currency_is_refused(currency: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_rule(Rule("r", "d", "bet", 1,
                           qualification=Qualification("deposit", currency=currency)))
    assert caught.value.reason == "INVALID_BONUS_RULE"
    assert caught.value.metadata == {"field": "qualification.currency"}
    assert caught.value.message.startswith("qualification.currency: ")
