"""Exact money spreading: a total split over lines so that the parts add up to the cent.

Why largest remainder: rounding each line's share on its own can lose or invent a cent (three
lines of 0.05 at 10% are 0.005 each: rounded each they give 0.03 or 0.00, but the total is 0.02).
Each line first gets its share rounded down to the cent; the cents still missing go one each to
the lines with the largest remainders (ties: the earlier line), so no line gets more than its
exact share rounded up and the parts always sum to the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def round_cents(value: Decimal) -> Decimal:
    """Half up to the cent (0.005 -> 0.01), the rounding of a discount's total."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def percentage_of(amount: Decimal, percent: Decimal) -> Decimal:
    """The exact (unrounded) ``percent`` of ``amount``."""
    return amount * percent / Decimal(100)


def spread_percentage(bases: Sequence[Decimal], percent: Decimal) -> list[Decimal]:
    """``percent`` of the sum of ``bases``, rounded half up to the cent, split over the bases.

    The result has one amount per base, each a whole number of cents, summing exactly to the
    rounded total."""
    exact = [percentage_of(base, percent) for base in bases]
    total = round_cents(sum(exact, Decimal(0)))
    return largest_remainder(exact, total)


def largest_remainder(exact: Sequence[Decimal], total: Decimal) -> list[Decimal]:
    """Whole cents per line summing to ``total`` (itself whole cents), closest to ``exact``.

    ``total`` must lie between the sum of the shares rounded down and that sum plus one cent per
    line, which holds whenever ``total`` is the rounded sum of ``exact``."""
    floors = [share.quantize(CENT, rounding=ROUND_DOWN) for share in exact]
    missing = int((total - sum(floors, Decimal(0))) / CENT)
    if missing < 0 or missing > len(exact):
        raise ValueError(f"total {total} cannot be spread over shares {list(exact)}")
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for index in order[:missing]:
        floors[index] += CENT
    return floors
