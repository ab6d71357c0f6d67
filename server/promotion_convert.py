"""Protobuf <-> domain for promotions (enums, decimals, nested rewards and caps)."""

from __future__ import annotations

from core.catalogue.promotions import (
    BudgetCap,
    CapPeriod,
    Promotion,
    PromotionReward,
    PromotionStatus,
    RewardKind,
    Tier,
)
from core.codes import AlertThreshold, CodeType, Inventory
from core.errors import InvalidArgument
from core.money import format_decimal, parse_decimal
from promo.v1 import promotions_pb2 as pb

STATUS_TO_PB = {PromotionStatus.DRAFT: pb.PROMOTION_STATUS_DRAFT,
                PromotionStatus.ACTIVE: pb.PROMOTION_STATUS_ACTIVE,
                PromotionStatus.DEACTIVATED: pb.PROMOTION_STATUS_DEACTIVATED}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
KIND_TO_PB = {RewardKind.SINGLE: pb.REWARD_KIND_SINGLE, RewardKind.TIERED: pb.REWARD_KIND_TIERED,
              RewardKind.EXTERNAL: pb.REWARD_KIND_EXTERNAL,
              RewardKind.CALCULATED: pb.REWARD_KIND_CALCULATED}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
PERIOD_TO_PB = {CapPeriod.DAILY: pb.CAP_PERIOD_DAILY, CapPeriod.WEEKLY: pb.CAP_PERIOD_WEEKLY,
                CapPeriod.MONTHLY: pb.CAP_PERIOD_MONTHLY,
                CapPeriod.LIFETIME: pb.CAP_PERIOD_LIFETIME}
PERIOD_FROM_PB = {v: k for k, v in PERIOD_TO_PB.items()}
ROUNDING_TO_PB = {"NONE": pb.ROUNDING_MODE_NONE, "ROUND": pb.ROUNDING_MODE_ROUND,
                  "ROUND_UP": pb.ROUNDING_MODE_ROUND_UP,
                  "ROUND_DOWN": pb.ROUNDING_MODE_ROUND_DOWN,
                  "MROUND": pb.ROUNDING_MODE_MROUND}
ROUNDING_FROM_PB = {v: k for k, v in ROUNDING_TO_PB.items()}
CODE_TYPE_TO_PB = {CodeType.PROMOTION_CODE: pb.CODE_TYPE_PROMOTION_CODE,
                   CodeType.PERSONALIZED: pb.CODE_TYPE_PERSONALIZED}
CODE_TYPE_FROM_PB = {v: k for k, v in CODE_TYPE_TO_PB.items()}


def _threshold_from_pb(index: int, message: pb.CodeAlertThreshold) -> AlertThreshold:
    which = message.WhichOneof("level")
    if which == "remaining_codes":
        return AlertThreshold(remaining_codes=message.remaining_codes)
    if which == "remaining_percent":
        percent = parse_decimal(message.remaining_percent,
                                field=f"code_alerts[{index}].remaining_percent")
        return AlertThreshold(remaining_percent=percent)
    raise InvalidArgument(f"code_alerts[{index}] sets neither remaining_codes nor "
                          "remaining_percent", reason="INVALID_CODE_SETTINGS",
                          metadata={"field": f"code_alerts[{index}]"})


def threshold_to_pb(threshold: AlertThreshold) -> pb.CodeAlertThreshold:
    if threshold.remaining_codes is not None:
        return pb.CodeAlertThreshold(remaining_codes=threshold.remaining_codes)
    return pb.CodeAlertThreshold(remaining_percent=format_decimal(threshold.remaining_percent))


def _enum(value: int, table: dict[int, object], field: str, names: str) -> object:
    if value not in table:
        raise InvalidArgument(f"{field} is required: one of {names}", reason="INVALID_ENUM",
                              metadata={"field": field})
    return table[value]


def reward_from_pb(index: int, message: pb.PromotionReward) -> PromotionReward:
    where = f"rewards[{index}]"
    kind = _enum(message.kind, KIND_FROM_PB, f"{where}.kind", "REWARD_KIND_SINGLE, _TIERED, "
                 "_EXTERNAL, _CALCULATED")
    assert isinstance(kind, RewardKind)
    # UNSPECIFIED means no rounding; a value this server does not know is refused, never
    # read as NONE (the reward would be paid unrounded).
    rounding = "NONE"
    if message.rounding != pb.ROUNDING_MODE_UNSPECIFIED:
        if message.rounding not in ROUNDING_FROM_PB:
            raise InvalidArgument(
                f"{where}.rounding {message.rounding} is not a rounding mode: one of "
                "ROUNDING_MODE_NONE, _ROUND, _ROUND_UP, _ROUND_DOWN, _MROUND",
                reason="INVALID_ENUM", metadata={"field": f"{where}.rounding"})
        rounding = ROUNDING_FROM_PB[message.rounding]
    return PromotionReward(
        reward_type=message.reward_type, kind=kind,
        value=parse_decimal(message.value, field=f"{where}.value", allow_empty=True),
        tiers=tuple(Tier(t.condition, t.value) for t in message.tiers),
        formula=message.formula, rounding=rounding,
        decimals=message.decimals if message.decimals or rounding != "NONE" else 2,
        rounding_factor=parse_decimal(message.rounding_factor, field=f"{where}.rounding_factor",
                                      allow_empty=True),
        lookback_days=message.lookback_days or 30,
        min_value=parse_decimal(message.min_value, field=f"{where}.min_value", allow_empty=True),
        max_value=parse_decimal(message.max_value, field=f"{where}.max_value", allow_empty=True))


def promotion_from_pb(message: pb.Promotion) -> Promotion:
    caps = []
    for index, cap in enumerate(message.budget_caps):
        period = _enum(cap.period, PERIOD_FROM_PB, f"budget_caps[{index}].period",
                       "CAP_PERIOD_DAILY, _WEEKLY, _MONTHLY, _LIFETIME")
        assert isinstance(period, CapPeriod)
        limit = parse_decimal(cap.limit, field=f"budget_caps[{index}].limit")
        assert limit is not None
        caps.append(BudgetCap(cap.reward_type, period, limit))
    code_type = CodeType.PROMOTION_CODE
    if message.code_type:
        found = _enum(message.code_type, CODE_TYPE_FROM_PB, "code_type",
                      "CODE_TYPE_PROMOTION_CODE, CODE_TYPE_PERSONALIZED")
        assert isinstance(found, CodeType)
        code_type = found
    return Promotion(
        code=message.promotion_code, name=message.name, description=message.description,
        properties=dict(message.properties), time_zone=message.time_zone or "UTC",
        rewards=tuple(reward_from_pb(i, r) for i, r in enumerate(message.rewards)),
        customer_cap=message.customer_cap or None, budget_caps=tuple(caps),
        code_type=code_type, fallback_code=message.fallback_code.strip(),
        code_alerts=tuple(_threshold_from_pb(i, t) for i, t in enumerate(message.code_alerts)))


def reward_to_pb(reward: PromotionReward) -> pb.PromotionReward:
    return pb.PromotionReward(
        reward_type=reward.reward_type, kind=KIND_TO_PB[reward.kind],
        value=format_decimal(reward.value),
        tiers=[pb.Tier(condition=t.condition, value=t.value) for t in reward.tiers],
        formula=reward.formula, rounding=ROUNDING_TO_PB.get(reward.rounding, 0),
        decimals=reward.decimals, rounding_factor=format_decimal(reward.rounding_factor),
        lookback_days=reward.lookback_days, min_value=format_decimal(reward.min_value),
        max_value=format_decimal(reward.max_value))


def promotion_to_pb(promotion: Promotion) -> pb.Promotion:
    message = pb.Promotion(
        promotion_code=promotion.code, name=promotion.name, description=promotion.description,
        properties=dict(promotion.properties), status=STATUS_TO_PB[promotion.status],
        time_zone=promotion.time_zone, rewards=[reward_to_pb(r) for r in promotion.rewards],
        customer_cap=promotion.customer_cap or 0,
        budget_caps=[pb.BudgetCap(reward_type=c.reward_type, period=PERIOD_TO_PB[c.period],
                                  limit=format_decimal(c.limit))
                     for c in promotion.budget_caps],
        code_type=CODE_TYPE_TO_PB[promotion.code_type], fallback_code=promotion.fallback_code,
        code_alerts=[threshold_to_pb(t) for t in promotion.code_alerts],
        version=promotion.version)
    if promotion.create_time:
        message.create_time.FromDatetime(promotion.create_time)
    if promotion.update_time:
        message.update_time.FromDatetime(promotion.update_time)
    return message


def inventory_to_pb(inventory: Inventory) -> pb.CodeInventory:
    return pb.CodeInventory(total=inventory.total, used=inventory.used,
                            available=inventory.available,
                            fallback_grants=inventory.fallback_grants)
