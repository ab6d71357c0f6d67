"""The worked examples of the vendor documents (seeds 000 and 004), replayed end to end in memory:
formula text -> compile -> aggregate the customer's events -> evaluate -> exact decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.errors import InvalidArgument
from core.formula import (
    EventRecord,
    Outcome,
    ResultOptions,
    SkipReason,
    compile_formula,
    inputs_from_events,
)
from core.periods import RelativeKind, RelativePeriod, TimeBackPeriod, resolve_period
from core.rounding import RoundingMode
from tests.unit.formula_helpers import deposits, ev, run

D = Decimal


def amount_of(source: str, *args: object, **kwargs: object) -> Decimal | None:
    evaluation = run(source, *args, **kwargs)  # type: ignore[arg-type]
    assert evaluation.outcome is Outcome.AMOUNT, evaluation.explain()
    return evaluation.amount


# --- seed 000: calculated rewards -----------------------------------------------------------

LAST_DEPOSIT_10 = "last(deposit.amount) * 10%"


@pytest.mark.parametrize(("history", "expected"), [(["50", "100"], "10"), (["300", "200"], "20")])
def test_10_percent_of_the_last_deposit(history: list[str], expected: str) -> None:
    assert amount_of(LAST_DEPOSIT_10, deposits(*history)) == D(expected)


def test_last_means_latest_in_time_not_latest_in_the_list() -> None:
    events = [ev("deposit", 200, minute=10), ev("deposit", 100, minute=5)]
    assert amount_of(LAST_DEPOSIT_10, events) == D(20)
    # same instant: the larger event id is the later one
    tied = [ev("deposit", 70, minute=1, event_id=9), ev("deposit", 30, minute=1, event_id=4)]
    assert amount_of(LAST_DEPOSIT_10, tied) == D(7)
    assert amount_of("first(deposit.amount) * 10%", tied) == D(3)


CASHBACK = """
# Deposit $50-$100: 10% cashback; $101-$200: 20%; over $200: 30%
deposit = last(deposit.amount)
if deposit > 200 then deposit * 30%
elif deposit > 100 then deposit * 20%
elif deposit >= 50 then deposit * 10%
else skip
"""


@pytest.mark.parametrize(
    ("deposit", "expected"),
    [("75", "7.5"), ("150", "30"), ("300", "90"), ("50", "5"), ("100", "10"), ("101", "20.2"),
     ("200", "40"), ("201", "60.3")],
)  # fmt: skip
def test_cashback_tiers(deposit: str, expected: str) -> None:
    assert amount_of(CASHBACK, deposits(deposit)) == D(expected)


def test_cashback_below_the_first_tier_is_skipped() -> None:
    evaluation = run(CASHBACK, deposits("40"))
    assert evaluation.outcome is Outcome.SKIPPED
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP
    assert evaluation.branch == "else"


LOYALTY = """
last_order = last(order.amount)
if customer.tier == "Gold" then last_order * 25%
elif customer.tier == "Silver" then last_order * 20%
elif customer.tier == "Bronze" then last_order * 15%
else skip
"""


@pytest.mark.parametrize(("tier", "expected"), [("Gold", "50"), ("Silver", "40"), ("Bronze", "30")])
def test_loyalty_tiers(tier: str, expected: str) -> None:
    orders = [ev("order", 80, minute=1), ev("order", 200, minute=2)]
    assert amount_of(LOYALTY, orders, properties={"tier": tier}) == D(expected)


@pytest.mark.parametrize("properties", [{"tier": "Platinum"}, {"tier": None}, {}])
def test_loyalty_without_a_known_tier_is_skipped(properties: dict[str, str | None]) -> None:
    evaluation = run(LOYALTY, [ev("order", 200)], properties=properties)
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP


def test_seed_000_rounding_of_a_calculated_reward() -> None:
    # 10% of 57.89 is 5.789: "2 decimals -> 5.78, 0 decimals -> 5" (rounding down)
    for decimals, expected in ((2, "5.78"), (0, "5")):
        options = ResultOptions(rounding=RoundingMode.ROUND_DOWN, decimals=decimals)
        evaluation = run(LAST_DEPOSIT_10, deposits("57.89"), options=options)
        assert str(evaluation.amount) == expected
        assert evaluation.raw_value == D("5.789")
    options = ResultOptions(rounding=RoundingMode.MROUND, decimals=1, factor=D("0.1"))
    assert str(run(LAST_DEPOSIT_10, deposits("347.5"), options=options).amount) == "34.8"
    options = ResultOptions(rounding=RoundingMode.MROUND, decimals=0, factor=D(3))
    assert str(run(LAST_DEPOSIT_10, deposits("110"), options=options).amount) == "12"


# --- seed 004: dynamic bonuses --------------------------------------------------------------

NET_LOSS_5 = """
net_loss = sum(bet.amount where game_category != "Roulette") -
           sum(win.amount where game_category != "Roulette")
net_loss * 5%
"""


def test_five_percent_of_net_loss_excluding_roulette() -> None:
    events = [
        ev("bet", "300", game="Gold Quest", game_category="Slots"),
        ev("bet", "250.50", game="Blackjack", game_category="Table"),
        ev("bet", "1000", game="Lightning", game_category="Roulette"),
        ev("bet", "49.50"),  # no category: not Roulette, so it counts
        ev("win", "100", game="Gold Quest", game_category="Slots"),
        ev("win", "900", game="Lightning", game_category="Roulette"),
        ev("deposit", "5000"),
    ]
    evaluation = run(NET_LOSS_5, events)
    # (300 + 250.50 + 49.50) - 100 = 500 -> 5% = 25
    assert evaluation.amount == D(25)
    assert evaluation.raw_value == D(25)
    assert {k: (v.value, v.count) for k, v in evaluation.aggregates_used.items()} == {
        "a0": (D("600.00"), 3),
        "a1": (D(100), 1),
    }


TIERED_BETS = """
total_bets = sum(bet.amount)
if total_bets > 500 then total_bets * 5%
elif total_bets > 300 then total_bets * 3%
else total_bets * 1%
"""


@pytest.mark.parametrize(
    ("bets", "expected", "branch"),
    [
        (["400", "200"], "30", "if #1 (total_bets > 500)"),
        (["250", "250"], "15", "elif #2 (total_bets > 300)"),
        (["200", "200"], "12", "elif #2 (total_bets > 300)"),
        (["100", "100"], "2", "else"),
    ],
)
def test_tiered_percent_of_bets(bets: list[str], expected: str, branch: str) -> None:
    evaluation = run(TIERED_BETS, [ev("bet", b) for b in bets])
    assert evaluation.amount == D(expected)
    assert evaluation.branch == branch


TIERED_DEPOSIT = """
# 50% of the deposit if above 500, max 1000; 30% if above 300; 10 if above 100; else 0
deposit = last(deposit.amount)
if deposit > 500 then min(deposit * 50%, 1000)
elif deposit > 300 then deposit * 30%
elif deposit > 100 then 10
else 0
"""


@pytest.mark.parametrize(
    ("deposit", "expected"),
    [("3000", "1000"), ("2000", "1000"), ("600", "300"), ("400", "120"), ("150", "10")],
)
def test_tiered_deposit_bonus(deposit: str, expected: str) -> None:
    assert amount_of(TIERED_DEPOSIT, deposits(deposit)) == D(expected)


def test_tiered_deposit_bonus_else_zero_is_skipped() -> None:
    evaluation = run(TIERED_DEPOSIT, deposits("50"))
    assert evaluation.outcome is Outcome.SKIPPED
    assert evaluation.skip_reason is SkipReason.ZERO_OR_NEGATIVE
    assert evaluation.raw_value == D(0)


# The seed lists "10% ... for users who made more than five deposits" and "5% ... more than
# five deposits" (a copy slip); we read the second tier as "more than two deposits".
DEPOSIT_COUNT_TIERS = """
deposit_count = count(deposit)
total = sum(deposit.amount)
if deposit_count > 5 then cap(total * 10%, 500)
elif deposit_count > 2 then cap(total * 5%, 500)
else skip
"""


@pytest.mark.parametrize(
    ("count", "each", "expected"),
    [(6, "100", "60"), (6, "1000", "500"), (3, "100", "15"), (5, "100", "25"),
     (3, "20000", "500")],
)  # fmt: skip
def test_deposit_count_tiers(count: int, each: str, expected: str) -> None:
    assert amount_of(DEPOSIT_COUNT_TIERS, deposits(*[each] * count)) == D(expected)


def test_deposit_count_tiers_skip_otherwise() -> None:
    evaluation = run(DEPOSIT_COUNT_TIERS, deposits("100", "100"))
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP
    assert evaluation.branch == "else"


NET_DEPOSIT = "sum(deposit.amount) - sum(withdrawal.amount)"


def test_net_deposit_and_net_deposit_capped_by_100() -> None:
    events = [*deposits("500", "300"), ev("withdrawal", "200")]
    assert amount_of(NET_DEPOSIT, events) == D(600)
    assert amount_of(f"cap({NET_DEPOSIT}, 100)", events) == D(100)
    assert amount_of(f"cap({NET_DEPOSIT}, 100)", [*deposits("80"), ev("withdrawal", "20")]) == D(60)


def test_net_deposit_with_no_transactions_is_no_matching_transactions() -> None:
    evaluation = run(NET_DEPOSIT, [ev("bet", 10)])
    assert evaluation.skip_reason is SkipReason.NO_MATCHING_TRANSACTIONS


def test_net_deposit_negative_is_zero_or_negative() -> None:
    evaluation = run(NET_DEPOSIT, [*deposits("50"), ev("withdrawal", "80")])
    assert evaluation.skip_reason is SkipReason.ZERO_OR_NEGATIVE
    assert evaluation.raw_value == D(-30)


FREE_SPINS = """
net_deposit = sum(deposit.amount) - sum(withdrawal.amount)
if net_deposit > 100 then template("10 Free Spins on Golden Quest") else skip
"""


def test_bonus_template_result() -> None:
    formula = compile_formula(FREE_SPINS)
    assert formula.returns_template and not formula.returns_amount
    evaluation = run(FREE_SPINS, [*deposits("300"), ev("withdrawal", "150")])
    assert evaluation.outcome is Outcome.TEMPLATE
    assert evaluation.template == "10 Free Spins on Golden Quest"
    assert evaluation.amount is None
    skipped = run(FREE_SPINS, [*deposits("300"), ev("withdrawal", "250")])
    assert skipped.skip_reason is SkipReason.EXPLICIT_SKIP


MULTI_CURRENCY_CAP = "cap(sum(deposit.amount) * 50%, max_bonus)"
MAX_BONUS = {"max_bonus": {"EUR": D(200), "USD": D(250)}}


@pytest.mark.parametrize(
    ("currency", "deposit", "expected"),
    [("EUR", "1000", "200"), ("USD", "1000", "250"), ("usd", "1000", "250"), ("EUR", "300", "150")],
)
def test_per_currency_cap_variable(currency: str, deposit: str, expected: str) -> None:
    events = [ev("deposit", deposit, currency=currency.upper())]
    result = amount_of(MULTI_CURRENCY_CAP, events, currency=currency, variables=MAX_BONUS)
    assert result == D(expected)


@pytest.mark.parametrize("currency", ["GBP", None])
def test_per_currency_variable_without_a_value(currency: str | None) -> None:
    evaluation = run(MULTI_CURRENCY_CAP, deposits("1000"), currency=currency, variables=MAX_BONUS)
    assert evaluation.skip_reason is SkipReason.MISSING_CURRENCY_VALUE


LOGINS = 'customer["Logins count ever"] * 2'


def test_user_properties_only_formula() -> None:
    formula = compile_formula(LOGINS)
    assert formula.aggregates == ()
    assert formula.properties_used == ("Logins count ever",)
    assert amount_of(LOGINS, properties={"Logins count ever": D(42)}) == D(84)
    missing = run(LOGINS, properties={})
    assert missing.skip_reason is SkipReason.MISSING_PROPERTY
    assert missing.skip_detail == "the customer property 'Logins count ever' has no value"


def test_last_deposit_plus_total_number_of_deposits() -> None:
    # "the last deposit amount plus the total number of deposits made by the user"
    source = "last(deposit.amount) + count(deposit) * customer.points_per_deposit"
    properties = {"points_per_deposit": D(10)}
    assert amount_of(source, deposits("20", "35"), properties=properties) == D(55)


def test_cap_amount_200_on_a_bonus_of_1000() -> None:
    evaluation = run(
        "last(deposit.amount)", deposits("1000"), options=ResultOptions(cap_amount=D(200))
    )
    assert evaluation.amount == D(200)
    assert evaluation.raw_value == D(1000)
    assert evaluation.value_after_cap == D(200)


def test_min_allowed_bonus_amount() -> None:
    options = ResultOptions(min_allowed=D(20))
    below = run(LAST_DEPOSIT_10, deposits("150"), options=options)
    assert below.outcome is Outcome.SKIPPED
    assert below.skip_reason is SkipReason.BELOW_MINIMUM
    assert below.value_after_cap == D(15) and below.amount is None
    assert run(LAST_DEPOSIT_10, deposits("250"), options=options).amount == D(25)
    assert run(LAST_DEPOSIT_10, deposits("200"), options=options).amount == D(20)


@pytest.mark.parametrize(
    ("mode", "decimals", "raw", "expected"),
    [
        (RoundingMode.ROUND_DOWN, 2, "27.35", "2.73"),
        (RoundingMode.ROUND_UP, 2, "27.35", "2.74"),
        (RoundingMode.ROUND, 2, "27.35", "2.74"),
        (RoundingMode.ROUND, 2, "27.34", "2.73"),
        (RoundingMode.ROUND_DOWN, 0, "27.35", "2"),
        (RoundingMode.ROUND_UP, 0, "27.35", "3"),
        (RoundingMode.ROUND, 0, "27.35", "3"),
        (RoundingMode.ROUND, 3, "27.35", "2.735"),
    ],
)
def test_seed_004_rounding_tables(
    mode: RoundingMode, decimals: int, raw: str, expected: str
) -> None:
    options = ResultOptions(rounding=mode, decimals=decimals)
    evaluation = run(LAST_DEPOSIT_10, deposits(raw), options=options)
    assert str(evaluation.amount) == expected


def test_weekend_cashback_with_a_relative_period() -> None:
    """'10% cashback for bets placed during the weekend', calculated on Monday."""
    monday = datetime(2026, 3, 9, 9, tzinfo=UTC)
    window = resolve_period(RelativePeriod(RelativeKind.LAST_WEEKEND, "UTC"), now=monday)
    times = [
        datetime(2026, 3, 6, 23, 59, tzinfo=UTC),  # Friday: before the weekend
        datetime(2026, 3, 7, 0, 0, tzinfo=UTC),  # Saturday 00:00: first instant inside
        datetime(2026, 3, 8, 23, 59, 59, tzinfo=UTC),  # Sunday, last second
        datetime(2026, 3, 9, 0, 0, tzinfo=UTC),  # Monday 00:00: first instant after
    ]
    events = [
        EventRecord(i, "bet", D(amount), "EUR", at, {})
        for i, (amount, at) in enumerate(zip((500, 100, 40, 70), times, strict=True))
    ]
    in_window = [e for e in events if window.contains(e.occurred_at)]
    formula = compile_formula("sum(bet.amount) * 10%")
    evaluation = formula.evaluate(inputs_from_events(formula.aggregates, in_window))
    assert [e.amount for e in in_window] == [D(100), D(40)]
    assert evaluation.amount == D(14)


def test_periods_are_limited_to_31_days() -> None:
    with pytest.raises(InvalidArgument) as info:
        TimeBackPeriod(32, "days")
    assert info.value.reason == "PERIOD_TOO_LONG"
    assert resolve_period(TimeBackPeriod(31, "days"), now=datetime.now(UTC)).length == timedelta(
        days=31
    )
