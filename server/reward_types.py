"""RewardTypeService: thin translation between protobuf and core/storage."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
from grpc import aio

from core.catalogue import reward_types as domain
from core.errors import InvalidArgument
from core.money import format_decimal, parse_decimal
from core.pagination import effective_page_size
from promo.v1 import reward_types_pb2 as pb
from promo.v1 import reward_types_pb2_grpc as pb_grpc
from server.convert import required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.page_tokens import decode_page_token, encode_page_token
from storage import reward_types as repo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardTypeService"].full_name
ROLES = {f"/{SERVICE_NAME}/{m}": {"admin"} for m in
         ("CreateRewardType", "GetRewardType", "ListRewardTypes", "UpdateRewardType")}

_CATEGORY_FROM_PB = {pb.REWARD_CATEGORY_AMOUNT: domain.RewardCategory.AMOUNT,
                     pb.REWARD_CATEGORY_UNITS: domain.RewardCategory.UNITS}
_CATEGORY_TO_PB = {v: k for k, v in _CATEGORY_FROM_PB.items()}


def to_domain(message: pb.RewardType) -> domain.RewardType:
    category = _CATEGORY_FROM_PB.get(message.category)
    if category is None:
        raise InvalidArgument("category is required: REWARD_CATEGORY_AMOUNT or "
                              "REWARD_CATEGORY_UNITS", reason="INVALID_CATEGORY",
                              metadata={"field": "category"})
    return domain.RewardType(
        name=message.name, display_name=message.display_name, category=category,
        description=message.description, image_url=message.image_url,
        min_value=parse_decimal(message.min_value, field="min_value", allow_empty=True),
        max_value=parse_decimal(message.max_value, field="max_value", allow_empty=True))


def to_pb(value: domain.RewardType) -> pb.RewardType:
    return pb.RewardType(
        name=value.name, display_name=value.display_name, description=value.description,
        image_url=value.image_url, category=_CATEGORY_TO_PB[value.category],
        min_value=format_decimal(value.min_value), max_value=format_decimal(value.max_value),
        create_time=timestamp(value.create_time), update_time=timestamp(value.update_time))


class RewardTypeServicer(pb_grpc.RewardTypeServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def CreateRewardType(self, request: pb.CreateRewardTypeRequest,
                               context: aio.ServicerContext) -> pb.CreateRewardTypeResponse:
        reward_type = domain.validate_reward_type(to_domain(request.reward_type))

        async def work(conn: asyncpg.Connection) -> bytes:
            created = await repo.insert(conn, reward_type)
            return pb.CreateRewardTypeResponse(reward_type=to_pb(created)).SerializeToString()

        raw = await run_request_once(self._pool, "CreateRewardType", request, work)
        return pb.CreateRewardTypeResponse.FromString(raw)

    async def GetRewardType(self, request: pb.GetRewardTypeRequest,
                            context: aio.ServicerContext) -> pb.GetRewardTypeResponse:
        required_id(request.name, "name")
        async with self._pool.acquire() as conn:
            found = await repo.get(conn, request.name)
        return pb.GetRewardTypeResponse(reward_type=to_pb(found))

    async def ListRewardTypes(self, request: pb.ListRewardTypesRequest,
                              context: aio.ServicerContext) -> pb.ListRewardTypesResponse:
        size = effective_page_size(request.page_size)
        cursor = decode_page_token(request.page_token, {}, key=(str,))
        after = str(cursor.after[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await repo.list_page(conn, after_name=after, limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = encode_page_token([page[-1].name], {}) if more else ""
        return pb.ListRewardTypesResponse(reward_types=[to_pb(r) for r in page],
                                          next_page_token=token)

    async def UpdateRewardType(self, request: pb.UpdateRewardTypeRequest,
                               context: aio.ServicerContext) -> pb.UpdateRewardTypeResponse:
        required_id(request.reward_type.name, "reward_type.name")
        paths = list(request.update_mask.paths)
        patch_message = pb.RewardType()
        patch_message.CopyFrom(request.reward_type)
        if patch_message.category == pb.REWARD_CATEGORY_UNSPECIFIED:
            # Only validated when the mask names it; any value keeps to_domain happy.
            patch_message.category = pb.REWARD_CATEGORY_AMOUNT
            if "category" in paths:
                raise InvalidArgument("category cannot be unset", reason="INVALID_CATEGORY",
                                      metadata={"field": "category"})
        patch = to_domain(patch_message)

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await repo.get(conn, request.reward_type.name, for_update=True)
            updated = domain.apply_update(current, replace(patch, name=current.name), paths)
            saved = await repo.update(conn, updated)
            return pb.UpdateRewardTypeResponse(reward_type=to_pb(saved)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdateRewardType", request, work)
        return pb.UpdateRewardTypeResponse.FromString(raw)


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_RewardTypeServiceServicer_to_server(RewardTypeServicer(deps.pool), server)
