"""Promotions (seeds 000-002): what a promotion pays, to how many customers, within which budgets.

Lifecycle: DRAFT -> ACTIVE -> DEACTIVATED -> ACTIVE ... Only ACTIVE promotions grant rewards.
Edits are allowed in DRAFT and DEACTIVATED (never to the promotion code), so a running
promotion's rules cannot change under a customer mid-flight.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.catalogue.reward_types import RewardCategory, RewardType
from core.codes import AlertThreshold, CodeType, validate_code_settings
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.periods import NOT_ZONES

CODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_PROPERTIES = 50
MAX_REWARDS = 10
MAX_TIERS = 20
# customer_cap is int64 on the wire but counted in integer columns (the cap and its counter).
MAX_CUSTOMER_CAP = 2**31 - 1


class PromotionStatus(enum.Enum):
    DRAFT = "DRAFT"
    ACTIVE = "ACTIVE"
    DEACTIVATED = "DEACTIVATED"


class RewardKind(enum.Enum):
    """SINGLE: one value for everyone. TIERED: the first tier whose condition holds.
    EXTERNAL: the promotion system computes the value. CALCULATED: a formula."""

    SINGLE = "SINGLE"
    TIERED = "TIERED"
    EXTERNAL = "EXTERNAL"
    CALCULATED = "CALCULATED"


class CapPeriod(enum.Enum):
    DAILY = "DAILY"
    WEEKLY = "WEEKLY"
    MONTHLY = "MONTHLY"
    LIFETIME = "LIFETIME"


_TRANSITIONS = {
    (PromotionStatus.DRAFT, PromotionStatus.ACTIVE),
    (PromotionStatus.ACTIVE, PromotionStatus.DEACTIVATED),
    (PromotionStatus.DEACTIVATED, PromotionStatus.ACTIVE),
}


@dataclass(frozen=True)
class Tier:
    """A tier: a condition and the value it pays, both in the formula language
    (e.g. condition ``customer.tier == "Gold"``, value ``last(order.amount) * 25%``)."""

    condition: str
    value: str


@dataclass(frozen=True)
class PromotionReward:
    reward_type: str
    kind: RewardKind
    value: Decimal | None = None          # SINGLE
    tiers: tuple[Tier, ...] = ()          # TIERED
    formula: str = ""                     # CALCULATED
    rounding: str = "NONE"                # rounding mode name (core.rounding)
    decimals: int = 2
    rounding_factor: Decimal | None = None
    lookback_days: int = 30               # transactions window for TIERED / CALCULATED
    min_value: Decimal | None = None      # overrides of the reward type's bounds
    max_value: Decimal | None = None


@dataclass(frozen=True)
class BudgetCap:
    """At most ``limit`` of ``reward_type``'s value granted per period (in the promotion's
    time zone). Several caps may name the same reward type (a daily pace under a lifetime cap)."""

    reward_type: str
    period: CapPeriod
    limit: Decimal


@dataclass(frozen=True)
class Promotion:
    code: str
    name: str
    description: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)
    status: PromotionStatus = PromotionStatus.DRAFT
    time_zone: str = "UTC"
    rewards: tuple[PromotionReward, ...] = ()
    customer_cap: int | None = None
    budget_caps: tuple[BudgetCap, ...] = ()
    # The promo code customers get: the promotion code, or one from a pool of unique codes.
    code_type: CodeType = CodeType.PROMOTION_CODE
    fallback_code: str = ""                       # PERSONALIZED: given once the pool is empty
    code_alerts: tuple[AlertThreshold, ...] = ()  # PERSONALIZED: low-inventory alerts
    version: int = 1
    create_time: datetime | None = None
    update_time: datetime | None = None


def validate_code(code: str) -> str:
    if not CODE_PATTERN.fullmatch(code):
        raise InvalidArgument(
            "promotion_code must be 1-64 characters of letters, digits, '_', '-' or '.', "
            f"starting with a letter or digit; got {code!r}",
            reason="INVALID_PROMOTION_CODE", metadata={"field": "promotion_code"})
    return code


def validate_time_zone(name: str, *, field_name: str = "time_zone") -> str:
    # "localtime" (and the rest of NOT_ZONES) opens, but is the host's setting, not a zone.
    try:
        named = name.lower() not in NOT_ZONES and ZoneInfo(name) is not None
    except (ZoneInfoNotFoundError, ValueError):
        named = False
    if not named:
        raise InvalidArgument(f"{field_name} {name!r} is not an IANA time zone such as "
                              "'Europe/Berlin' or 'UTC'", reason="INVALID_TIME_ZONE",
                              metadata={"field": field_name})
    return name


def _bad(message: str, reason: str, field_name: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"field": field_name})


def _validate_reward(index: int, reward: PromotionReward,
                     reward_types: Mapping[str, RewardType]) -> PromotionReward:
    where = f"rewards[{index}]"
    reward_type = reward_types.get(reward.reward_type)
    if reward_type is None:
        # NOT_FOUND, as GetRewardType's and every other unknown reference in a request body.
        raise NotFound(f"{where}.reward_type names no reward type: {reward.reward_type!r}",
                       reason="REWARD_TYPE_NOT_FOUND",
                       metadata={"field": f"{where}.reward_type", "name": reward.reward_type})
    if reward.kind is RewardKind.SINGLE:
        if reward.value is None:
            raise _bad(f"{where}: a SINGLE reward needs a value", "MISSING_VALUE",
                       f"{where}.value")
        whole = reward.value == reward.value.to_integral()
        if reward_type.category is RewardCategory.UNITS and not whole:
            raise _bad(f"{where}: {reward.reward_type} counts units, so its value must be a "
                       f"whole number, got {reward.value}", "INVALID_VALUE", f"{where}.value")
    if reward.kind is RewardKind.TIERED:
        if not reward.tiers:
            raise _bad(f"{where}: a TIERED reward needs at least one tier", "MISSING_TIERS",
                       f"{where}.tiers")
        if len(reward.tiers) > MAX_TIERS:
            raise _bad(f"{where}: at most {MAX_TIERS} tiers", "TOO_MANY_TIERS", f"{where}.tiers")
        for t_index, tier in enumerate(reward.tiers):
            if not tier.condition.strip() or not tier.value.strip():
                raise _bad(f"{where}.tiers[{t_index}] needs a condition and a value",
                           "INVALID_TIER", f"{where}.tiers[{t_index}]")
    if reward.kind is RewardKind.CALCULATED and not reward.formula.strip():
        raise _bad(f"{where}: a CALCULATED reward needs a formula", "MISSING_FORMULA",
                   f"{where}.formula")
    if not 0 <= reward.decimals <= 6:
        raise _bad(f"{where}.decimals must be 0-6", "INVALID_ROUNDING", f"{where}.decimals")
    if not 1 <= reward.lookback_days <= 31:
        raise _bad(f"{where}.lookback_days must be 1-31 (transaction periods are at most 31 "
                   "days)", "PERIOD_TOO_LONG", f"{where}.lookback_days")
    low = reward.min_value if reward.min_value is not None else reward_type.min_value
    high = reward.max_value if reward.max_value is not None else reward_type.max_value
    if low is not None and high is not None and low > high:
        raise _bad(f"{where}: min_value {low} is above max_value {high}", "INVALID_BOUNDS",
                   f"{where}.min_value")
    if reward.kind is RewardKind.SINGLE and reward.value is not None:
        if low is not None and reward.value < low:
            raise _bad(f"{where}: value {reward.value} is below the minimum {low}",
                       "INVALID_VALUE", f"{where}.value")
        if high is not None and reward.value > high:
            raise _bad(f"{where}: value {reward.value} is above the maximum {high}",
                       "INVALID_VALUE", f"{where}.value")
    return reward


def validate_promotion(promotion: Promotion,
                       reward_types: Mapping[str, RewardType]) -> Promotion:
    """Check every field of a promotion against the reward types it names."""
    validate_code(promotion.code)
    name = promotion.name.strip()
    if not name or len(name) > 200:
        raise _bad("name is required and at most 200 characters", "INVALID_NAME", "name")
    if len(promotion.description) > 2000:
        raise _bad("description must be at most 2000 characters", "INVALID_DESCRIPTION",
                   "description")
    if len(promotion.properties) > MAX_PROPERTIES:
        raise _bad(f"at most {MAX_PROPERTIES} properties", "TOO_MANY_PROPERTIES", "properties")
    for key, value in promotion.properties.items():
        if not key.strip() or len(key) > 100 or len(value) > 1000:
            raise _bad(f"property {key!r}: keys are 1-100 characters, values at most 1000",
                       "INVALID_PROPERTY", "properties")
    validate_time_zone(promotion.time_zone)
    if not promotion.rewards:
        raise _bad("a promotion needs at least one reward", "MISSING_REWARDS", "rewards")
    if len(promotion.rewards) > MAX_REWARDS:
        raise _bad(f"at most {MAX_REWARDS} rewards", "TOO_MANY_REWARDS", "rewards")
    rewards = tuple(_validate_reward(i, r, reward_types) for i, r in enumerate(promotion.rewards))
    names = [r.reward_type for r in rewards]
    if len(set(names)) != len(names):
        raise _bad("each reward type may appear once among a promotion's rewards",
                   "DUPLICATE_REWARD_TYPE", "rewards")
    if promotion.customer_cap is not None and not 0 < promotion.customer_cap <= MAX_CUSTOMER_CAP:
        raise _bad(f"customer_cap must be 1-{MAX_CUSTOMER_CAP} (or unset for no cap)",
                   "INVALID_CAP", "customer_cap")
    seen_caps: set[tuple[str, CapPeriod]] = set()
    for index, cap in enumerate(promotion.budget_caps):
        where = f"budget_caps[{index}]"
        if cap.reward_type not in names:
            raise _bad(f"{where} names reward type {cap.reward_type!r}, which this promotion "
                       "does not pay", "INVALID_CAP", f"{where}.reward_type")
        if cap.limit <= 0:
            raise _bad(f"{where}.limit must be positive", "INVALID_CAP", f"{where}.limit")
        if (cap.reward_type, cap.period) in seen_caps:
            raise _bad(f"{where}: {cap.reward_type} already has a {cap.period.value} cap",
                       "DUPLICATE_CAP", where)
        seen_caps.add((cap.reward_type, cap.period))
    validate_code_settings(promotion.code_type, promotion.fallback_code, promotion.code_alerts)
    return replace(promotion, name=name, rewards=rewards)


def check_transition(current: PromotionStatus, target: PromotionStatus, *, code: str) -> None:
    if (current, target) not in _TRANSITIONS:
        raise FailedPrecondition(
            f"a {current.value} promotion cannot become {target.value}; allowed: DRAFT -> "
            "ACTIVE -> DEACTIVATED -> ACTIVE", reason="INVALID_STATUS_TRANSITION",
            metadata={"promotion_code": code, "status": current.value, "target": target.value})


def check_editable(current: Promotion) -> None:
    if current.status is PromotionStatus.ACTIVE:
        raise FailedPrecondition(
            f"promotion {current.code!r} is ACTIVE; deactivate it before editing",
            reason="PROMOTION_NOT_EDITABLE",
            metadata={"promotion_code": current.code, "status": current.status.value})
