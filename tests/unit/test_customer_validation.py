"""core.customers: pure validation of customers and events, and how problems are reported."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.customers import (
    MAX_BATCH,
    CustomerInput,
    DecimalText,
    EventInput,
    Problem,
    Unreadable,
    attribute_value,
    raise_if_problems,
    unknown_customer_problems,
    validate_customers,
    validate_events,
)
from core.errors import InvalidArgument

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def ev(external_id: str = "e1", **kw: object) -> EventInput:
    values: dict[str, object] = {"customer_id": "c1", "kind": "bet", "amount": "10.5",
                                 "currency": "EUR", "occurred_at": NOW - timedelta(hours=1),
                                 "attributes": {}}
    values.update(kw)
    return EventInput(external_id=external_id, **values)  # type: ignore[arg-type]


def problems_of(*events: EventInput) -> list[tuple[int, str]]:
    return [(p.index, p.message) for p in validate_events(list(events), NOW)[1]]


def test_valid_event_is_parsed_exactly() -> None:
    events, problems = validate_events(
        [ev(amount="0.000001", attributes={"game": "gold_quest", "rtp": "96.5"})], NOW)
    assert problems == []
    (event,) = events
    assert event.amount == Decimal("0.000001")
    assert event.attributes == {"game": "gold_quest", "rtp": "96.5"}
    assert event.occurred_at == NOW - timedelta(hours=1)


@pytest.mark.parametrize("kind", ["bet", "win", "deposit", "withdrawal"])
def test_standard_kinds_must_not_be_negative(kind: str) -> None:
    assert problems_of(ev(kind=kind, amount="-0.5")) == [
        (0, f"amount must not be negative for kind {kind!r}, got '-0.5'")]


def test_custom_kinds_may_be_negative_and_zero_is_fine() -> None:
    assert problems_of(ev(kind="chargeback", amount="-20"), ev("e2", amount="0"),
                       ev("e3", amount="-0")) == []


@pytest.mark.parametrize(
    ("kind", "ok"),
    [("bet", True), ("a", True), ("x" * 40, True), ("x" * 41, False), ("free_spin_2", True),
     ("2bet", False), ("Bet", False), ("bet-x", False), ("_bet", False)],
)
def test_kind_pattern(kind: str, ok: bool) -> None:
    assert (problems_of(ev(kind=kind)) == []) is ok


def test_future_limit_is_five_minutes_inclusive() -> None:
    assert problems_of(ev(occurred_at=NOW + timedelta(minutes=5))) == []
    ((index, message),) = problems_of(ev(occurred_at=NOW + timedelta(minutes=5,
                                                                    microseconds=1)))
    assert index == 0 and "is more than 5 minutes after the server's time" in message


def test_missing_and_unreadable_times() -> None:
    assert problems_of(ev(occurred_at=None)) == [(0, "occurred_at is required")]
    assert problems_of(ev(occurred_at=Unreadable("year 10000 is out of range"))) == [
        (0, "occurred_at is not a valid time: year 10000 is out of range")]


def test_every_problem_of_an_event_is_listed() -> None:
    found = problems_of(ev(external_id="", customer_id="", kind="", amount="", currency=""))
    assert [i for i, _ in found] == [0] * 5
    assert [m.split(" ")[0] for _, m in found] == [
        "external_id", "customer_id", "kind", "amount", "currency"]


def test_duplicate_external_ids_name_the_first() -> None:
    assert problems_of(ev("a"), ev("b"), ev("a"), ev("a")) == [
        (2, "external_id 'a' repeats events[0]"), (3, "external_id 'a' repeats events[0]")]


@pytest.mark.parametrize(
    ("attributes", "fragment"),
    [({"amount": "1"}, "attribute name 'amount' is reserved"),
     ({"currency": "USD"}, "attribute name 'currency' is reserved"),
     ({"game category": "x"}, "attribute name 'game category' must be"),
     ({"g": "x" * 501}, "attribute 'g' must be at most 500 characters"),
     ({f"a{i}": "x" for i in range(51)}, "at most 50 attributes")],
)
def test_attribute_rules(attributes: dict[str, str], fragment: str) -> None:
    ((_, message), *_) = problems_of(ev(attributes=attributes))
    assert fragment in message


def test_ids_reject_control_characters_and_overlong_values() -> None:
    assert problems_of(ev("a\nb")) == [(0, "external_id must not contain control characters")]
    assert problems_of(ev(customer_id="c" * 129)) == [
        (0, "customer_id must be at most 128 characters, got 129")]


def test_batch_size_is_checked_first() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_events([ev(str(i)) for i in range(MAX_BATCH + 1)], NOW)
    assert err.value.reason == "BATCH_TOO_LARGE"
    assert err.value.metadata == {"field": "events", "count": "10001", "max": "10000"}
    with pytest.raises(InvalidArgument) as err:
        validate_events([], NOW)
    assert err.value.reason == "EMPTY_BATCH"


def test_unknown_customers_are_reported_per_event() -> None:
    found = unknown_customer_problems(["a", "b", "a", "c"], {"a"})
    assert [p.index for p in found] == [0, 2]
    assert found[0].message.startswith("customer 'a' does not exist")


def test_report_lists_ten_in_position_order_and_the_total() -> None:
    problems = [Problem(i, f"bad {i}") for i in reversed(range(12))]
    with pytest.raises(InvalidArgument) as err:
        raise_if_problems(problems, noun="events", reason="INVALID_EVENTS")
    assert err.value.reason == "INVALID_EVENTS"
    assert err.value.metadata == {"field": "events", "first_index": "0", "count": "12"}
    assert err.value.message == (
        "12 problems in events, nothing was written: "
        + "; ".join(f"events[{i}]: bad {i}" for i in range(10)) + "; and 2 more")
    raise_if_problems([], noun="events", reason="INVALID_EVENTS")  # nothing to report


def test_customers_are_validated_and_typed() -> None:
    (customer,) = validate_customers([CustomerInput(
        customer_id="alice", time_zone="America/New_York", currency="USD",
        properties={"balance": DecimalText("-12.50"), "vip": True, "segment": "A"})])
    assert customer.properties == {"balance": Decimal("-12.50"), "vip": True, "segment": "A"}
    assert (customer.time_zone, customer.currency) == ("America/New_York", "USD")
    (bare,) = validate_customers([CustomerInput(customer_id="bob")])
    assert (bare.time_zone, bare.currency, bare.properties) == (None, None, {})


@pytest.mark.parametrize(
    ("customer", "fragment"),
    [(CustomerInput(customer_id="a", time_zone="Europe/Atlantis"), "IANA time zone"),
     (CustomerInput(customer_id="a", time_zone="../../etc/passwd"), "IANA time zone"),
     # In the zone database, but the host's own setting, not a named zone.
     (CustomerInput(customer_id="a", time_zone="localtime"), "IANA time zone"),
     (CustomerInput(customer_id="a", currency="US"), "three uppercase letters"),
     (CustomerInput(customer_id="a", properties={"p": DecimalText("nan")}), "finite"),
     (CustomerInput(customer_id="a", properties={"p": None}), "has no value"),
     (CustomerInput(customer_id="a", properties={"p": "x" * 1001}), "at most 1000"),
     (CustomerInput(customer_id="a", properties={f"p{i}": True for i in range(101)}),
      "at most 100 properties")],
)
def test_bad_customers(customer: CustomerInput, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_customers([CustomerInput(customer_id="ok"), customer])
    assert err.value.reason == "INVALID_CUSTOMERS"
    assert err.value.metadata["first_index"] == "1"
    assert "customers[1]: " in err.value.message and fragment in err.value.message


def test_duplicate_customers_in_one_batch() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_customers([CustomerInput(customer_id="a"), CustomerInput(customer_id="a")])
    assert "customers[1]: customer_id 'a' repeats customers[0]" in err.value.message


@pytest.mark.parametrize(
    ("text", "value"),
    [("96.5", Decimal("96.5")), ("-3", Decimal(-3)), ("007", Decimal(7)),
     ("1" * 30 + "." + "9" * 30, Decimal("1" * 30 + "." + "9" * 30)),
     ("1" * 31, "1" * 31), ("1e3", "1e3"), (" 5", " 5"), ("5.", "5."), (".5", ".5"),
     ("+5", "+5"), ("", ""), ("Roulette", "Roulette"), ("NaN", "NaN"), ("٣", "٣")],
)
def test_attribute_values_in_plain_decimal_notation_are_numbers(text: str,
                                                                 value: str | Decimal) -> None:
    got = attribute_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "Factory"])
def test_a_promotion_zone_must_be_named_not_the_hosts(zone: str) -> None:
    from core.catalogue.promotions import validate_time_zone

    with pytest.raises(InvalidArgument) as err:
        validate_time_zone(zone)
    assert err.value.reason == "INVALID_TIME_ZONE"
    assert validate_time_zone("Europe/Berlin") == "Europe/Berlin"
