"""Helpers for tests of personalized promo codes: files, uploads over the real stream, a
PERSONALIZED promotion, and the pool's numbers straight from the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from promo.v1 import codes_pb2 as cpb
from promo.v1 import codes_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from tests.conftest import Api
from tests.e2e.promo_helpers import reward_type


def codes_file(prefix: str, n: int, start: int = 1) -> bytes:
    return "".join(f"{prefix}-{i:06d}\n" for i in range(start, start + n)).encode()


async def upload(api: Api, code: str, data: bytes, request_id: str, *,
                 chunk: int = 64 * 1024) -> cpb.UploadCodesResponse:
    async def messages() -> AsyncIterator[cpb.UploadCodesRequest]:
        yield cpb.UploadCodesRequest(promotion_code=code, request_id=request_id,
                                     data=data[:chunk])
        for offset in range(chunk, len(data), chunk):
            yield cpb.UploadCodesRequest(data=data[offset:offset + chunk])

    stub = cpb_grpc.CodePoolServiceStub(api.channel)
    return await stub.UploadCodes(messages(), metadata=api.key())


async def code_promotion(api: Api, code: str, *, fallback: str = "",
                         alerts: list[ppb.CodeAlertThreshold] | None = None,
                         customer_cap: int = 0) -> None:
    await reward_type(api, "percent_off")
    await ppb_grpc.PromotionServiceStub(api.channel).CreatePromotion(ppb.CreatePromotionRequest(
        request_id=f"create-{code}", activate=True, promotion=ppb.Promotion(
            promotion_code=code, name=f"Flash sale {code}",
            rewards=[ppb.PromotionReward(reward_type="percent_off",
                                         kind=ppb.REWARD_KIND_EXTERNAL)],
            code_type=ppb.CODE_TYPE_PERSONALIZED, fallback_code=fallback,
            code_alerts=alerts or [], customer_cap=customer_cap)), metadata=api.key())


async def get_promotion(api: Api, code: str) -> ppb.Promotion:
    response = await ppb_grpc.PromotionServiceStub(api.channel).GetPromotion(
        ppb.GetPromotionRequest(promotion_code=code), metadata=api.key())
    return response.promotion


async def pool_counts(pool: asyncpg.Pool, code: str) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        """SELECT coalesce(cp.total, 0) AS total, coalesce(cp.allocated, 0) AS allocated,
                  (SELECT count(*) FROM promo_codes c WHERE c.promotion_id = p.id) AS rows
             FROM promotions p LEFT JOIN code_pools cp ON cp.promotion_id = p.id
            WHERE p.code = $1""", code)
    return row["total"], row["allocated"], row["rows"]


async def until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
