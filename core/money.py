"""Exact decimal parsing for values that arrive as strings on the wire.

Why strings: protobuf has no decimal type and floats cannot hold 0.1 exactly. Every amount
crosses the API as a decimal string and becomes a ``Decimal`` here, with a clear error otherwise.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from core.errors import InvalidArgument

MAX_DIGITS = 20
MAX_SCALE = 6


def parse_decimal(text: str, *, field: str, allow_negative: bool = False,
                  allow_empty: bool = False) -> Decimal | None:
    """Parse ``text`` as an exact decimal with at most 20 digits and 6 decimal places."""
    stripped = text.strip()
    if not stripped:
        if allow_empty:
            return None
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD",
                              metadata={"field": field})
    try:
        value = Decimal(stripped)
    except InvalidOperation as exc:
        raise InvalidArgument(f"{field} must be a decimal number such as 10.50, got {text!r}",
                              reason="INVALID_DECIMAL", metadata={"field": field}) from exc
    if not value.is_finite():
        raise InvalidArgument(f"{field} must be a finite number, got {text!r}",
                              reason="INVALID_DECIMAL", metadata={"field": field})
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    scale = max(0, -exponent)
    if scale > MAX_SCALE or len(digits) - scale > MAX_DIGITS - MAX_SCALE:
        raise InvalidArgument(
            f"{field} allows at most {MAX_DIGITS - MAX_SCALE} integer digits and {MAX_SCALE} "
            f"decimal places, got {text!r}",
            reason="INVALID_DECIMAL", metadata={"field": field})
    if value < 0 and not allow_negative:
        raise InvalidArgument(f"{field} must not be negative, got {text!r}",
                              reason="INVALID_DECIMAL", metadata={"field": field})
    return value


def format_decimal(value: Decimal | None) -> str:
    """The wire form: plain notation, no exponent, empty for None."""
    if value is None:
        return ""
    return format(value, "f")


def plain(value: Decimal) -> Decimal:
    """The same amount without trailing zeros or exponent (25.000000 -> 25, 7.50 -> 7.5)."""
    return value.quantize(1) if value == value.to_integral() else value.normalize()
