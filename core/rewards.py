"""Deciding a grant: each reward's value, its bounds, and what each cap is charged.

Pure: the caller supplies the promotion, the reward types, the clock's ``now`` and, for TIERED
and CALCULATED rewards, the values a formula evaluator computed. The result is either the
values plus the charges, or a denial with a machine-readable reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from core.caps import period_window
from core.catalogue.promotions import CapPeriod, Promotion, PromotionReward, RewardKind
from core.catalogue.reward_types import RewardType
from core.money import LARGEST_AMOUNT, plain


@dataclass(frozen=True)
class RewardValue:
    reward_type: str
    kind: RewardKind
    value: Decimal | None  # None: an EXTERNAL reward whose value the caller did not pass


@dataclass(frozen=True)
class Denial:
    reason: str   # NOT_ELIGIBLE, BELOW_MINIMUM, ...
    message: str


@dataclass(frozen=True)
class Charge:
    """Add ``amount`` to the ``scope``/``period`` window starting at ``start``, within ``limit``."""

    scope: str
    period: CapPeriod
    start: datetime
    amount: Decimal
    limit: Decimal | None


def bounds(reward: PromotionReward, reward_type: RewardType) -> tuple[Decimal | None,
                                                                       Decimal | None]:
    low = reward.min_value if reward.min_value is not None else reward_type.min_value
    high = reward.max_value if reward.max_value is not None else reward_type.max_value
    return low, high


def apply_bounds(reward: PromotionReward, reward_type: RewardType,
                 value: Decimal) -> Decimal | Denial:
    """Below the minimum is a denial; above the maximum is cut to the maximum. A value still
    beyond LARGEST_AMOUNT (a formula without a maximum, e.g. 10^700) is denied as NOT_ELIGIBLE
    rather than handed out: no system downstream takes such an amount."""
    low, high = bounds(reward, reward_type)
    if low is not None and value < low:
        return Denial("BELOW_MINIMUM", f"{reward.reward_type}: computed value {value} is below "
                                       f"the minimum {low}")
    if high is not None and value > high:
        return plain(high)
    if abs(value) > LARGEST_AMOUNT:
        return Denial("NOT_ELIGIBLE", f"{reward.reward_type}: computed value {value:.6E} is "
                                      f"beyond the largest amount {LARGEST_AMOUNT}; give the "
                                      "reward or its type a max_value")
    return value


def decide_values(promotion: Promotion, reward_types: Mapping[str, RewardType], *,
                  computed: Mapping[str, Decimal | Denial],
                  external_values: Mapping[str, Decimal]) -> list[RewardValue] | Denial:
    """Every reward's final value. ``computed`` holds the evaluator's result for each TIERED or
    CALCULATED reward (by reward type); any denial denies the whole grant (all or nothing)."""
    values: list[RewardValue] = []
    for reward in promotion.rewards:
        reward_type = reward_types[reward.reward_type]
        raw: Decimal | Denial | None
        if reward.kind is RewardKind.SINGLE:
            raw = reward.value
        elif reward.kind is RewardKind.EXTERNAL:
            raw = external_values.get(reward.reward_type)
        else:
            raw = computed.get(reward.reward_type)
            if raw is None:
                raise ValueError(f"no computed value for {reward.reward_type}")
        if isinstance(raw, Denial):
            return raw
        if raw is not None and reward.kind is not RewardKind.EXTERNAL:
            bounded = apply_bounds(reward, reward_type, raw)
            if isinstance(bounded, Denial):
                return bounded
            raw = bounded
        values.append(RewardValue(reward.reward_type, reward.kind, raw))
    return values


def charges_for(promotion: Promotion, values: list[RewardValue], now: datetime) -> list[Charge]:
    """One charge per budget cap, in the promotion's time zone, ordered so that every process
    locks the counter rows in the same order (no deadlocks between concurrent grants)."""
    by_type = {v.reward_type: v.value or Decimal(0) for v in values}
    charges = []
    for cap in promotion.budget_caps:
        start, _ = period_window(cap.period, now, promotion.time_zone)
        charges.append(Charge(cap.reward_type, cap.period, start, by_type[cap.reward_type],
                              cap.limit))
    charges.sort(key=lambda c: (c.scope, c.period.value))
    return charges

