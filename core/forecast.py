"""Campaign forecast: what approving customers would cost against a promotion's caps.

Counted at the campaign's execution time: periodic caps use the window that contains it (a
future window has used nothing yet). SINGLE rewards are projected exactly (value x customers);
rewards whose value depends on the customer are listed as not estimated rather than guessed.
The customer cap counts only customers new to the promotion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from core.cap_state import CUSTOMERS_SCOPE, windows
from core.catalogue.promotions import CapPeriod, Promotion, RewardKind


@dataclass(frozen=True)
class CapForecast:
    scope: str
    period: CapPeriod
    limit: Decimal
    used: Decimal
    projected: Decimal
    grants: int = 0  # the grants that would be charged to this cap

    @property
    def remaining_after(self) -> Decimal:
        return self.limit - self.used - self.projected

    @property
    def fits(self) -> bool:
        """A cap that has met its limit takes no grant at all, not even one charged 0 (an
        EXTERNAL reward, projected as 0 because it is not estimated)."""
        if self.grants > 0 and self.used >= self.limit:
            return False
        return self.remaining_after >= 0


@dataclass(frozen=True)
class PromotionForecast:
    promotion_code: str
    customers: int
    projected_value: dict[str, Decimal]
    not_estimated: tuple[str, ...]
    caps: tuple[CapForecast, ...]

    @property
    def fits(self) -> bool:
        return all(cap.fits for cap in self.caps)


def forecast(promotion: Promotion, *, at: datetime, customers: int, new_customers: int,
             usage: Mapping[tuple[str, str], Decimal]) -> PromotionForecast:
    """``usage`` maps (scope, period name) to what the window containing ``at`` has used."""
    projected: dict[str, Decimal] = {}
    not_estimated: list[str] = []
    for reward in promotion.rewards:
        if reward.kind is RewardKind.SINGLE and reward.value is not None:
            projected[reward.reward_type] = reward.value * customers
        else:
            not_estimated.append(reward.reward_type)
    caps = []
    for scope, period, _start, _end, limit in windows(promotion, at):
        is_customers = scope == CUSTOMERS_SCOPE
        amount = Decimal(new_customers) if is_customers else projected.get(scope, Decimal(0))
        caps.append(CapForecast(scope, period, limit, usage.get((scope, period.value),
                                                               Decimal(0)), amount,
                                new_customers if is_customers else customers))
    return PromotionForecast(promotion.code, customers, projected, tuple(not_estimated),
                             tuple(caps))
