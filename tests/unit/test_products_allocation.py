"""Largest-remainder spreading: parts are whole cents and add up to the rounded total."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.products.allocation import largest_remainder, round_cents, spread_percentage

D = Decimal


def test_three_lines_at_ten_percent_lose_no_cent() -> None:
    # 10% of 0.05 is 0.005 on each line: rounding each gives 0.03 (or 0.00), the total is 0.02.
    assert spread_percentage([D("0.05")] * 3, D("10")) == [D("0.01"), D("0.01"), D("0.00")]


def test_remainders_decide_who_gets_the_missing_cents() -> None:
    # exact shares 3.333, 6.666, 0.001 -> floors 3.33, 6.66, 0.00 = 9.99; total 10.00
    assert spread_percentage([D("10.00"), D("20.00"), D("0.01")], D("33.33")) == [
        D("3.33"), D("6.67"), D("0.00")]
    assert sum(spread_percentage([D("10.00"), D("20.00"), D("0.01")], D("33.33"))) == D("10.00")


def test_total_rounds_half_up() -> None:
    assert round_cents(D("0.005")) == D("0.01")
    assert round_cents(D("0.0049")) == D("0.00")
    assert spread_percentage([D("0.25")], D("10")) == [D("0.03")]


def test_hundred_percent_is_the_whole_price() -> None:
    assert spread_percentage([D("1.99"), D("0.01")], D("100")) == [D("1.99"), D("0.01")]


def test_impossible_total_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be spread"):
        largest_remainder([D("0.001")], D("0.05"))


@given(st.lists(st.integers(min_value=0, max_value=10_000_00), min_size=1, max_size=12),
       st.decimals(min_value=D("0.000001"), max_value=D("100"), places=6))
def test_parts_sum_to_rounded_total_and_never_exceed_the_line(cents: list[int],
                                                               percent: Decimal) -> None:
    bases = [D(c) / 100 for c in cents]
    parts = spread_percentage(bases, percent)
    exact_total = sum((b * percent / 100 for b in bases), D(0))
    assert sum(parts, D(0)) == round_cents(exact_total)
    for base, part in zip(bases, parts, strict=True):
        assert part == part.quantize(D("0.01"))
        assert D(0) <= part <= base
        assert abs(part - base * percent / 100) < D("0.01")
