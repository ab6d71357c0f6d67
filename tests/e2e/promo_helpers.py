"""Builders for promotion tests: reward types, promotions, and GetReward calls."""

from __future__ import annotations

import uuid

from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from tests.conftest import Api


async def reward_type(api: Api, name: str = "cashback", *, category: int = 1,
                      min_value: str = "", max_value: str = "") -> None:
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    await stub.CreateRewardType(rtpb.CreateRewardTypeRequest(
        request_id=f"rt-{name}", reward_type=rtpb.RewardType(
            name=name, display_name=name.title(), category=category or 1,
            min_value=min_value, max_value=max_value)), metadata=api.key())


def single(reward_type_name: str = "cashback", value: str = "15") -> ppb.PromotionReward:
    return ppb.PromotionReward(reward_type=reward_type_name, kind=ppb.REWARD_KIND_SINGLE,
                               value=value)


def cap(period: int, limit: str, reward_type_name: str = "cashback") -> ppb.BudgetCap:
    return ppb.BudgetCap(reward_type=reward_type_name, period=period, limit=limit)


async def promotion(api: Api, code: str = "VIP25", *, rewards: list[ppb.PromotionReward] | None
                    = None, caps: list[ppb.BudgetCap] | None = None, customer_cap: int = 0,
                    time_zone: str = "UTC", activate: bool = True,
                    properties: dict[str, str] | None = None) -> ppb.Promotion:
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    response = await stub.CreatePromotion(ppb.CreatePromotionRequest(
        request_id=f"create-{code}", activate=activate, promotion=ppb.Promotion(
            promotion_code=code, name=f"Promotion {code}", time_zone=time_zone,
            rewards=rewards or [single()], budget_caps=caps or [], customer_cap=customer_cap,
            properties=properties or {})), metadata=api.key())
    return response.promotion


async def get_promotion(api: Api, code: str = "VIP25") -> ppb.Promotion:
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    return (await stub.GetPromotion(ppb.GetPromotionRequest(promotion_code=code),
                                    metadata=api.key())).promotion


async def get_reward(api: Api, customer: str, code: str = "VIP25", *,
                     request_id: str | None = None, stub: rpb_grpc.RewardServiceStub | None = None,
                     **kw: object) -> rpb.GetRewardResponse:
    stub = stub or rpb_grpc.RewardServiceStub(api.channel)
    return await stub.GetReward(rpb.GetRewardRequest(
        promotion_code=code, customer_id=customer,
        request_id=uuid.uuid4().hex if request_id is None else request_id,
        **kw),  # type: ignore[arg-type]
        metadata=api.key("runtime"))


async def revoke(api: Api, grant_id: str) -> rpb.RevokeGrantResponse:
    stub = rpb_grpc.RewardServiceStub(api.channel)
    return await stub.RevokeGrant(rpb.RevokeGrantRequest(
        request_id=uuid.uuid4().hex, grant_id=grant_id, reason="credit failed"),
        metadata=api.key("runtime"))
