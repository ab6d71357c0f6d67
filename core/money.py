"""Exact decimal parsing for values that arrive as strings on the wire.

Why strings: protobuf has no decimal type and floats cannot hold 0.1 exactly. Every amount
crosses the API as a decimal string and becomes a ``Decimal`` here, with a clear error otherwise.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation

from core.errors import InvalidArgument

MAX_DIGITS = 20
MAX_SCALE = 6
# What the API calls a decimal: ASCII digits with an optional sign, point and exponent.
# Python's Decimal() also reads "1_000" and non-ASCII digits ("١٢"); an amount that a person
# would read differently from the server is refused instead.
_NON_FINITE = frozenset({"inf", "infinity", "nan", "snan"})
_DECIMAL_SYNTAX = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def read_decimal(text: str) -> Decimal | None:
    """The finite decimal ``text`` spells in the API's syntax (surrounding spaces allowed), or
    None: no bounds are checked here, see parse_decimal."""
    stripped = text.strip()
    if not _DECIMAL_SYNTAX.fullmatch(stripped):
        return None
    try:
        return Decimal(stripped)
    except InvalidOperation:  # pragma: no cover - the syntax check admits only valid text
        return None


def parse_decimal(text: str, *, field: str, allow_negative: bool = False,
                  allow_empty: bool = False) -> Decimal | None:
    """Parse ``text`` as an exact decimal with at most 20 digits and 6 decimal places."""
    stripped = text.strip()
    if not stripped:
        if allow_empty:
            return None
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD",
                              metadata={"field": field})
    value = read_decimal(stripped)
    if value is None:
        expected = ("a finite number" if stripped.lstrip("+-").lower() in _NON_FINITE
                    else "a decimal number such as 10.50")
        raise InvalidArgument(f"{field} must be {expected}, got {text!r}",
                              reason="INVALID_DECIMAL", metadata={"field": field})
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    scale = max(0, -exponent)
    # Digits before the point, exponent included: "1e20" has 21 (it is 100000000000000000000).
    integer_digits = 0 if value.is_zero() else len(digits) + exponent
    if scale > MAX_SCALE or integer_digits > MAX_DIGITS - MAX_SCALE:
        raise InvalidArgument(
            f"{field} allows at most {MAX_DIGITS - MAX_SCALE} integer digits and {MAX_SCALE} "
            f"decimal places, got {text!r}",
            reason="INVALID_DECIMAL", metadata={"field": field})
    if value < 0 and not allow_negative:
        raise InvalidArgument(f"{field} must not be negative, got {text!r}",
                              reason="INVALID_DECIMAL", metadata={"field": field})
    if value.is_zero() and exponent > 0:
        # "0e999999" is zero, but as Decimal('0E+999999') the database driver cannot encode it.
        return Decimal(0)
    return value


LARGEST_AMOUNT = Decimal("99999999999999.999999")
"""The largest amount stored anywhere (numeric(20,6): 14 integer digits): a computed value
beyond it is refused where it is computed (a grant denied, a bonus skipped), never stored."""

HUGE_DIGITS = 100
"""Values from 10^HUGE_DIGITS on (more than this many integer digits) are written in scientific
notation wherever they are shown or stored (``shown_number``), and are not rounded
(core.formula.evaluator): a formula can compute 10^983045 in 300 characters, and writing it out
was 6 MB of answer and 3 MB of stored result per customer. Below it every digit is kept (a
formula's exact 40-digit value stays exact)."""


def shown_number(value: Decimal) -> str:
    """A value as text: plain from 10^-HUGE_DIGITS to 10^HUGE_DIGITS, else scientific with 7
    significant digits (1.000000E+100), which core.money.parse_decimal reads back."""
    if not value.is_finite():
        return str(value)
    if far_from_amounts(value):
        return f"{value:.6E}"
    return format(plain(value), "f")


def far_from_amounts(value: Decimal) -> bool:
    """From 10^HUGE_DIGITS on, or nonzero below 10^-HUGE_DIGITS: no amount, and too many digits
    to write out (1 / 10^983045 has as many as 10^983045). 10^-HUGE_DIGITS itself is near."""
    if not value.is_finite() or value.is_zero():
        return False
    return value.adjusted() >= HUGE_DIGITS or value.adjusted() < -HUGE_DIGITS


def format_decimal(value: Decimal | None) -> str:
    """The wire form: plain notation, no exponent, empty for None."""
    if value is None:
        return ""
    return format(value, "f")


def plain(value: Decimal) -> Decimal:
    """The same amount without trailing zeros or exponent (25.000000 -> 25, 7.50 -> 7.5).

    Every digit is kept: the context is as wide as the value (the default 28-digit one would
    round 100/3 computed to 34 digits, and fail on integers of more than 28 digits).
    """
    _, digits, exponent = value.as_tuple()
    # As wide as every digit the value has, the zeros of a positive exponent included (1E+40
    # is 41 digits written plainly).
    exact = Context(prec=max(28, len(digits) + max(0, exponent if isinstance(exponent, int)
                                                    else 0)))
    if value == value.to_integral_value():
        return value.quantize(Decimal(1), context=exact)
    return value.normalize(exact)
