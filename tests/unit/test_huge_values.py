"""Values far beyond any amount (from 10^100 on, core.money.HUGE_DIGITS): not
rounded, never written out in full. Found by tests/unit/test_formula_audit.py's generated
formulas (a sum of 1E+999999 with MROUND raised "cannot round" instead of skipping) and by
tests/e2e/test_expensive_inputs_audit.py (10^983045 was a 6 MB DryRun answer)."""

from __future__ import annotations

from decimal import Decimal as D

from core.formula import (
    AggregateValue,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
    compile_formula,
)
from core.money import parse_decimal, shown_number
from core.rounding import RoundingMode

SUM = compile_formula("sum(bet.amount)")


def evaluate(value: D, **options: object) -> object:
    settings = dict(rounding=RoundingMode.MROUND, decimals=0, factor=D("0.1"), cap_amount=None,
                    min_allowed=None)
    settings.update(options)
    return SUM.evaluate(FormulaInputs(
        aggregates={SUM.aggregates[0].key: AggregateValue(D(value), 1)}, properties={},
        currency=None), ResultOptions(**settings))  # type: ignore[arg-type]


def test_a_huge_value_without_a_cap_is_skipped_as_too_large_in_a_few_characters() -> None:
    result = evaluate(D("1E+999999"))
    assert (result.outcome, result.skip_reason) == (Outcome.SKIPPED, SkipReason.AMOUNT_TOO_LARGE)
    assert result.skip_detail == "the calculated value 1.000000E+999999 is far more than any amount"
    assert result.raw_value == D("1E+999999") and result.value_after_rounding is None
    assert len(result.explain()) < 300


def test_a_huge_value_under_a_cap_gives_the_cap_unrounded() -> None:
    result = evaluate(D("1E+999999"), cap_amount=D(100))
    assert (result.outcome, result.amount, result.value_after_cap) == (Outcome.AMOUNT, D(100),
                                                                      D(100))
    assert "Not rounded: far more than any amount." in result.explain()
    below = evaluate(D("1E+999999"), cap_amount=D(100), min_allowed=D(200))
    assert below.skip_reason is SkipReason.BELOW_MINIMUM


def test_a_negative_huge_value_is_not_positive_in_a_few_characters() -> None:
    result = evaluate(D("-1E+999999"))
    assert result.skip_reason is SkipReason.ZERO_OR_NEGATIVE
    assert result.skip_detail == "the calculated value -1.000000E+999999 is not positive"


def test_below_100_digits_every_digit_is_kept_and_rounded() -> None:
    value = D("9" * 99 + ".44")
    result = evaluate(value, rounding=RoundingMode.ROUND, decimals=1, factor=None)
    assert result.outcome is Outcome.AMOUNT and result.amount == D("9" * 99 + ".4")
    assert shown_number(value) == "9" * 99 + ".44"
    assert shown_number(D("1E+100")) == "1.000000E+100"


def test_a_zero_with_a_huge_exponent_is_read_as_plain_zero() -> None:
    """asyncpg cannot encode Decimal('0E+999999'): a zero written with an exponent is 0."""
    for text in ("0e999999", "-0E+99", "0.0e5"):
        value = parse_decimal(text, field="amount", allow_negative=True)
        assert value == 0 and value.as_tuple().exponent == 0, (text, value)
    assert parse_decimal("0.00", field="amount") == D("0.00")
