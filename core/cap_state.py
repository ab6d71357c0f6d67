"""What an operator sees of the caps: each cap's window, usage, and whether it is reached.

A cap counts as reached when the next grant cannot fit: for a SINGLE reward (known value) when
used + value exceeds the limit, otherwise when used has met the limit. The first reached cap
stops the promotion: until its period rolls over (periodic) or for good (lifetime).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from core.caps import LIFETIME_START, period_window
from core.catalogue.promotions import CapPeriod, Promotion, PromotionStatus, RewardKind

CUSTOMERS_SCOPE = "#customers"


class Availability(enum.Enum):
    AVAILABLE = "AVAILABLE"
    NOT_ACTIVE = "NOT_ACTIVE"
    CAPPED_FOR_PERIOD = "CAPPED_FOR_PERIOD"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    CUSTOMER_CAP_REACHED = "CUSTOMER_CAP_REACHED"
    OUT_OF_CODES = "OUT_OF_CODES"


@dataclass(frozen=True)
class CapState:
    scope: str
    period: CapPeriod
    start: datetime
    end: datetime | None
    used: Decimal
    limit: Decimal
    grants: int
    reached: bool


def windows(promotion: Promotion, now: datetime) -> list[tuple[str, CapPeriod, datetime,
                                                               datetime | None, Decimal]]:
    """(scope, period, start, end, limit) of every cap's current window."""
    result: list[tuple[str, CapPeriod, datetime, datetime | None, Decimal]] = []
    if promotion.customer_cap is not None:
        result.append((CUSTOMERS_SCOPE, CapPeriod.LIFETIME, LIFETIME_START, None,
                       Decimal(promotion.customer_cap)))
    for cap in promotion.budget_caps:
        start, end = period_window(cap.period, now, promotion.time_zone)
        result.append((cap.reward_type, cap.period, start, end, cap.limit))
    return result


def cap_states(promotion: Promotion, now: datetime,
               usage: Mapping[tuple[str, str], tuple[Decimal, int]]) -> list[CapState]:
    """``usage`` maps (scope, period name) to (used, grants) of the current windows."""
    next_charge = {r.reward_type: r.value for r in promotion.rewards
                   if r.kind is RewardKind.SINGLE and r.value is not None}
    states = []
    for scope, period, start, end, limit in windows(promotion, now):
        used, grants = usage.get((scope, period.value), (Decimal(0), 0))
        step = Decimal(1) if scope == CUSTOMERS_SCOPE else next_charge.get(scope)
        reached = used + step > limit if step is not None and step > 0 else used >= limit
        states.append(CapState(scope, period, start, end, used, limit, grants, reached))
    return states


def availability(promotion: Promotion, states: list[CapState], *,
                 codes_available: int | None = None) -> Availability:
    """``codes_available``: a PERSONALIZED promotion's remaining codes (None otherwise); an
    empty pool without a fallback code pauses the promotion."""
    if promotion.status is not PromotionStatus.ACTIVE:
        return Availability.NOT_ACTIVE
    if codes_available is not None and codes_available <= 0 and not promotion.fallback_code:
        return Availability.OUT_OF_CODES
    reached = [s for s in states if s.reached]
    if any(s.scope == CUSTOMERS_SCOPE for s in reached):
        return Availability.CUSTOMER_CAP_REACHED
    if any(s.period is CapPeriod.LIFETIME for s in reached):
        return Availability.BUDGET_EXHAUSTED
    if reached:
        return Availability.CAPPED_FOR_PERIOD
    return Availability.AVAILABLE
