"""Rounding modes: every worked example of the vendor documents, plus the negative-value rule."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.errors import InvalidArgument
from core.rounding import RoundingMode, apply_rounding, parse_rounding_mode

D = Decimal

# (mode, value, decimals, factor, expected) -- expected compared as text, so the number of
# decimal places is part of the contract ("truncated or extended").
SEED_EXAMPLES = [
    # seed 004, "Rounding options for the Bonus amount"
    (RoundingMode.ROUND_DOWN, "2.735", 2, None, "2.73"),
    (RoundingMode.ROUND_UP, "2.735", 2, None, "2.74"),
    (RoundingMode.ROUND, "2.735", 2, None, "2.74"),
    (RoundingMode.ROUND, "2.734", 2, None, "2.73"),
    (RoundingMode.ROUND_DOWN, "2.735", 0, None, "2"),
    (RoundingMode.ROUND_UP, "2.735", 0, None, "3"),
    (RoundingMode.ROUND, "2.735", 0, None, "3"),
    (RoundingMode.ROUND, "2.735", 3, None, "2.735"),
    # seed 000, "Rounding Options"
    (RoundingMode.ROUND_DOWN, "5.789", 2, None, "5.78"),
    (RoundingMode.ROUND_DOWN, "5.789", 0, None, "5"),
    (RoundingMode.MROUND, "34.75", 1, "0.1", "34.8"),
    (RoundingMode.MROUND, "11", 0, "3", "12"),
    # the task's own examples
    (RoundingMode.ROUND_UP, "2.731", 2, None, "2.74"),
    (RoundingMode.NONE, "5.789", 2, None, "5.789"),
]

MORE_EXAMPLES = [
    # extension to more places
    (RoundingMode.ROUND, "2.7", 3, None, "2.700"),
    (RoundingMode.ROUND_DOWN, "7", 2, None, "7.00"),
    # MROUND: halves away from zero, then quantized to the decimals
    (RoundingMode.MROUND, "34.75", 2, "0.1", "34.80"),
    (RoundingMode.MROUND, "10", 0, "4", "12"),
    (RoundingMode.MROUND, "9.99", 2, "0.05", "10.00"),
    (RoundingMode.MROUND, "1.3", 1, "0.5", "1.5"),
    (RoundingMode.MROUND, "1.2", 1, "0.5", "1.0"),
    (RoundingMode.MROUND, "1", 0, "3", "0"),
    # exactness on large amounts
    (RoundingMode.ROUND_UP, "123456789012345678901234567.001", 2, None,
     "123456789012345678901234567.01"),
]  # fmt: skip

# Negative values: Excel semantics, symmetric around zero (see core.rounding's docstring).
NEGATIVE_EXAMPLES = [
    (RoundingMode.ROUND_UP, "-2.731", 2, None, "-2.74"),  # away from zero, not the ceiling
    (RoundingMode.ROUND_DOWN, "-2.739", 2, None, "-2.73"),  # towards zero, not the floor
    (RoundingMode.ROUND, "-2.735", 2, None, "-2.74"),
    (RoundingMode.ROUND, "-2.734", 2, None, "-2.73"),
    (RoundingMode.MROUND, "-11", 0, "3", "-12"),
    (RoundingMode.MROUND, "-34.75", 1, "0.1", "-34.8"),
]


@pytest.mark.parametrize(
    ("mode", "value", "decimals", "factor", "expected"),
    SEED_EXAMPLES + MORE_EXAMPLES + NEGATIVE_EXAMPLES,
)
def test_rounding_table(
    mode: RoundingMode, value: str, decimals: int, factor: str | None, expected: str
) -> None:
    result = apply_rounding(D(value), mode, decimals, D(factor) if factor else None)
    assert str(result) == expected


def test_none_returns_the_value_unchanged() -> None:
    value = D("1.23456789123")
    assert apply_rounding(value, RoundingMode.NONE, 2) is value


@pytest.mark.parametrize("decimals", [-1, 9, 100])
def test_decimals_out_of_range(decimals: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        apply_rounding(D("1.5"), RoundingMode.ROUND, decimals)
    assert info.value.reason == "INVALID_ROUNDING"
    assert "between 0 and 8" in info.value.message
    assert info.value.metadata["field"] == "decimals"


def test_decimals_are_validated_even_without_rounding() -> None:
    with pytest.raises(InvalidArgument):
        apply_rounding(D("1.5"), RoundingMode.NONE, 9)


@pytest.mark.parametrize("factor", [None, "0", "-0.1"])
def test_mround_needs_a_positive_factor(factor: str | None) -> None:
    with pytest.raises(InvalidArgument) as info:
        apply_rounding(D("34.75"), RoundingMode.MROUND, 1, D(factor) if factor else None)
    assert info.value.reason == "INVALID_ROUNDING"
    assert info.value.metadata["field"] == "factor"


def test_non_finite_values_are_rejected() -> None:
    with pytest.raises(InvalidArgument):
        apply_rounding(D("NaN"), RoundingMode.ROUND, 2)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("none", RoundingMode.NONE),
        ("No Round", RoundingMode.NONE),
        ("ROUND", RoundingMode.ROUND),
        ("Round to Nearest", RoundingMode.ROUND),
        ("round_up", RoundingMode.ROUND_UP),
        ("Round Up", RoundingMode.ROUND_UP),
        ("ROUND-DOWN", RoundingMode.ROUND_DOWN),
        ("  round   down ", RoundingMode.ROUND_DOWN),
        ("mRound", RoundingMode.MROUND),
    ],
)
def test_parse_rounding_mode(name: str, mode: RoundingMode) -> None:
    assert parse_rounding_mode(name) is mode


def test_parse_rounding_mode_unknown() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_rounding_mode("bankers")
    assert info.value.reason == "INVALID_ROUNDING"
    assert "'bankers'" in info.value.message and "MROUND" in info.value.message
