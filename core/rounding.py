"""Rounding of calculated reward amounts.

Operators pick a rounding mode and a number of decimal places for a calculated reward (and a
factor for MROUND). The vendor documents give worked examples, which the unit tests replay:

========== ============ ========== ==========
mode       value        decimals   result
========== ============ ========== ==========
ROUND      2.735        2          2.74
ROUND      2.734        2          2.73
ROUND      2.735        0          3
ROUND_UP   2.735        2          2.74
ROUND_UP   2.735        0          3
ROUND_DOWN 2.735        2          2.73
ROUND_DOWN 2.735        0          2
ROUND_DOWN 5.789        2          5.78
ROUND_DOWN 5.789        0          5
MROUND     34.75 (0.1)  1          34.8
MROUND     34.75 (0.1)  0          34.8
MROUND     34.75 (0.1)  2          34.80
MROUND     11 (3)       0          12
========== ============ ========== ==========

Negative values follow Excel's ROUND / ROUNDUP / ROUNDDOWN / MROUND, i.e. every mode is
*symmetric around zero*: ROUND_UP moves away from zero (-2.731 -> -2.74, not the ceiling
-2.73), ROUND_DOWN moves towards zero (-2.739 -> -2.73, a truncation), ROUND and MROUND send
halves away from zero (-2.735 -> -2.74, MROUND(-11, 3) -> -12; Excel would refuse the mixed signs,
we mirror the positive case instead). We chose the Excel reading because the seeds name the modes
after Excel functions and because operators reason about magnitudes ("round the bonus up"); in
practice a reward that reaches rounding is positive, negative amounts are skipped before.

Everything is Decimal: money is never a float. Results are quantized to exactly ``decimals``
places ("truncated or extended", as the vendor puts it), so 2.7 with 3 decimals is 2.700.
MROUND is the one exception: its result is a multiple of the factor, shown with
``max(decimals, decimal places of the factor)`` places, so fewer decimals than the factor has
never round the multiple a second time (MROUND(34.75, 0.1) is 34.8 whatever ``decimals`` says,
as in seed 000; with 2 decimals it is written 34.80).
"""

from __future__ import annotations

import enum
from decimal import (
    ROUND_DOWN,
    ROUND_HALF_UP,
    ROUND_UP,
    Context,
    Decimal,
    DecimalException,
    localcontext,
)

from core.errors import InvalidArgument

MIN_DECIMALS = 0
MAX_DECIMALS = 8


class RoundingMode(enum.Enum):
    """How a calculated amount is rounded before it is issued."""

    NONE = "NONE"
    """Keep the exact calculated value ("No Round")."""
    ROUND = "ROUND"
    """Nearest value; halves go away from zero (2.735 -> 2.74, 2.734 -> 2.73)."""
    ROUND_UP = "ROUND_UP"
    """Away from zero (2.731 -> 2.74, -2.731 -> -2.74)."""
    ROUND_DOWN = "ROUND_DOWN"
    """Towards zero, i.e. truncation (5.789 -> 5.78, -5.789 -> -5.78)."""
    MROUND = "MROUND"
    """Nearest multiple of a factor, halves away from zero (Excel's MROUND)."""


_DECIMAL_ROUNDING = {
    RoundingMode.ROUND: ROUND_HALF_UP,
    RoundingMode.ROUND_UP: ROUND_UP,
    RoundingMode.ROUND_DOWN: ROUND_DOWN,
}

# Names operators and API clients use for the modes, normalised (lower case, single spaces).
_ALIASES = {
    "none": RoundingMode.NONE,
    "no round": RoundingMode.NONE,
    "no rounding": RoundingMode.NONE,
    "round": RoundingMode.ROUND,
    "nearest": RoundingMode.ROUND,
    "round to nearest": RoundingMode.ROUND,
    "round nearest": RoundingMode.ROUND,
    "round up": RoundingMode.ROUND_UP,
    "roundup": RoundingMode.ROUND_UP,
    "up": RoundingMode.ROUND_UP,
    "round down": RoundingMode.ROUND_DOWN,
    "rounddown": RoundingMode.ROUND_DOWN,
    "down": RoundingMode.ROUND_DOWN,
    "mround": RoundingMode.MROUND,
}


def parse_rounding_mode(name: str) -> RoundingMode:
    """Read a rounding mode name as operators write it.

    Case, underscores, hyphens and extra spaces do not matter, so ``"round_up"``, ``"Round Up"``
    and ``"ROUND-UP"`` are all ROUND_UP; the vendor's labels ("No Round", "Round to Nearest")
    are accepted too, so a value copied from the UI works.
    """
    if not isinstance(name, str):
        raise InvalidArgument(
            f"rounding mode must be text, got {type(name).__name__}",
            reason="INVALID_ROUNDING",
            metadata={"field": "rounding"},
        )
    key = " ".join(name.replace("_", " ").replace("-", " ").lower().split())
    mode = _ALIASES.get(key)
    if mode is None:
        known = ", ".join(m.value for m in RoundingMode)
        raise InvalidArgument(
            f"unknown rounding mode {name!r}; use one of {known}",
            reason="INVALID_ROUNDING",
            metadata={"field": "rounding", "value": name},
        )
    return mode


def validate_rounding(mode: RoundingMode, decimals: int, factor: Decimal | None) -> None:
    """Check a rounding configuration once, when it is saved, rather than at every calculation.

    Raises InvalidArgument(reason="INVALID_ROUNDING") naming the offending field.
    """
    if not isinstance(mode, RoundingMode):
        raise InvalidArgument(
            f"rounding mode must be a RoundingMode, got {mode!r}",
            reason="INVALID_ROUNDING",
            metadata={"field": "rounding"},
        )
    if isinstance(decimals, bool) or not isinstance(decimals, int):
        raise InvalidArgument(
            f"decimals must be a whole number, got {decimals!r}",
            reason="INVALID_ROUNDING",
            metadata={"field": "decimals"},
        )
    if not MIN_DECIMALS <= decimals <= MAX_DECIMALS:
        raise InvalidArgument(
            f"decimals must be between {MIN_DECIMALS} and {MAX_DECIMALS}, got {decimals}",
            reason="INVALID_ROUNDING",
            metadata={"field": "decimals", "value": decimals},
        )
    if mode is RoundingMode.MROUND:
        if factor is None:
            raise InvalidArgument(
                "MROUND needs a factor (the multiple to round to), e.g. 0.1 or 5",
                reason="INVALID_ROUNDING",
                metadata={"field": "factor"},
            )
        if not isinstance(factor, Decimal) or not factor.is_finite() or factor <= 0:
            raise InvalidArgument(
                f"the MROUND factor must be a number greater than 0, got {factor}",
                reason="INVALID_ROUNDING",
                metadata={"field": "factor", "value": factor},
            )
    elif factor is not None and (not isinstance(factor, Decimal) or not factor.is_finite()):
        raise InvalidArgument(
            f"the rounding factor must be a number, got {factor!r}",
            reason="INVALID_ROUNDING",
            metadata={"field": "factor"},
        )


def factor_places(factor: Decimal) -> int:
    """Decimal places of an MROUND factor, ignoring trailing zeros (0.10 -> 1, 5 -> 0)."""
    exponent = factor.normalize(Context(prec=max(28, len(factor.as_tuple().digits)))).as_tuple()
    assert isinstance(exponent.exponent, int)
    return max(0, -exponent.exponent)


def _context_for(value: Decimal, decimals: int) -> Context:
    """A context wide enough that quantizing ``value`` is exact up to the last kept digit.

    The default 28 digits would make ``quantize`` fail (InvalidOperation) on large amounts with
    many decimals; sizing the precision from the value keeps the operation exact instead.
    """
    digits = max(value.adjusted(), 0) + decimals + 4
    return Context(prec=max(28, digits))


def apply_rounding(
    value: Decimal,
    mode: RoundingMode,
    decimals: int,
    factor: Decimal | None = None,
) -> Decimal:
    """Round ``value`` as configured and return it with exactly ``decimals`` places.

    NONE returns the value unchanged (decimals are still validated, so a bad configuration is
    caught even while rounding is off). MROUND rounds to the nearest multiple of ``factor``
    (halves away from zero) and writes it with ``max(decimals, factor_places(factor))`` places,
    which is exact: MROUND(34.75, 0.1) is 34.8 with 0 or 1 decimals and 34.80 with 2.
    """
    validate_rounding(mode, decimals, factor)
    if not isinstance(value, Decimal) or not value.is_finite():
        raise InvalidArgument(
            f"only finite Decimal amounts can be rounded, got {value!r}",
            reason="INVALID_ROUNDING",
            metadata={"field": "value"},
        )
    if mode is RoundingMode.NONE:
        return value
    exponent = Decimal(1).scaleb(-decimals)
    try:
        with localcontext(_context_for(value, decimals)) as ctx:
            if mode is RoundingMode.MROUND:
                assert factor is not None  # validate_rounding guarantees it
                ctx.prec = max(ctx.prec, max(value.adjusted(), 0) - factor.adjusted() + 10)
                multiples = (value / factor).quantize(Decimal(1), rounding=ROUND_HALF_UP)
                places = max(decimals, factor_places(factor))
                ctx.prec += places - decimals
                return (multiples * factor).quantize(Decimal(1).scaleb(-places))
            return value.quantize(exponent, rounding=_DECIMAL_ROUNDING[mode])
    except DecimalException as exc:  # pragma: no cover - guarded by the sized context
        raise InvalidArgument(
            f"cannot round {value} to {decimals} decimals",
            reason="INVALID_ROUNDING",
            metadata={"field": "value"},
        ) from exc
