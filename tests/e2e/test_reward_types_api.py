"""RewardTypeService through a real server: auth, validation, idempotency, pagination."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from promo.v1 import reward_types_pb2 as pb
from promo.v1 import reward_types_pb2_grpc as pb_grpc
from tests.conftest import Api, rpc_error_reason


def _free_spins(name: str = "free_spins", **kw: str) -> pb.RewardType:
    return pb.RewardType(name=name, display_name=kw.get("display_name", "Free spins"),
                         category=pb.REWARD_CATEGORY_UNITS, min_value=kw.get("min_value", "1"),
                         max_value=kw.get("max_value", "100"))


async def test_create_get_list_update(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    created = await stub.CreateRewardType(
        pb.CreateRewardTypeRequest(request_id="r1", reward_type=_free_spins()),
        metadata=api.key())
    assert created.reward_type.name == "free_spins"
    assert created.reward_type.min_value == "1.000000" or created.reward_type.min_value == "1"
    assert created.reward_type.create_time.seconds > 0

    got = await stub.GetRewardType(pb.GetRewardTypeRequest(name="free_spins"), metadata=api.key())
    assert got.reward_type == created.reward_type

    updated = await stub.UpdateRewardType(pb.UpdateRewardTypeRequest(
        request_id="u1", reward_type=pb.RewardType(name="free_spins", display_name="Spins!",
                                                   max_value="50"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "max_value"])),
        metadata=api.key())
    assert updated.reward_type.display_name == "Spins!"
    assert updated.reward_type.category == pb.REWARD_CATEGORY_UNITS
    assert float(updated.reward_type.max_value) == 50
    assert updated.reward_type.description == ""


async def test_decimal_values_are_exact(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    created = await stub.CreateRewardType(pb.CreateRewardTypeRequest(
        request_id="r1", reward_type=pb.RewardType(
            name="cash", display_name="Cash", category=pb.REWARD_CATEGORY_AMOUNT,
            min_value="0.10", max_value="1000000.123456")), metadata=api.key())
    assert created.reward_type.max_value == "1000000.123456"
    assert created.reward_type.min_value == "0.100000"


async def test_retry_with_same_request_id_returns_first_answer(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    request = pb.CreateRewardTypeRequest(request_id="same", reward_type=_free_spins())
    answers = await asyncio.gather(*(stub.CreateRewardType(request, metadata=api.key())
                                     for _ in range(10)))
    assert len({a.SerializeToString() for a in answers}) == 1
    listed = await stub.ListRewardTypes(pb.ListRewardTypesRequest(), metadata=api.key())
    assert [r.name for r in listed.reward_types] == ["free_spins"]


async def test_request_id_reused_for_other_input_is_rejected(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id="x",
                                                           reward_type=_free_spins("a")),
                                metadata=api.key())
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id="x",
                                                               reward_type=_free_spins("b")),
                                    metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "REQUEST_ID_REUSED"


@pytest.mark.parametrize(
    ("reward_type", "request_id", "reason", "fragment"),
    [
        (_free_spins("bad name"), "r", "INVALID_NAME", "letters, digits"),
        (_free_spins(display_name=""), "r", "INVALID_DISPLAY_NAME", "display_name is required"),
        (_free_spins(min_value="abc"), "r", "INVALID_DECIMAL", "min_value must be a decimal"),
        (_free_spins(min_value="-1"), "r", "INVALID_DECIMAL", "must not be negative"),
        (_free_spins(min_value="10", max_value="5"), "r", "INVALID_BOUNDS", "above max_value"),
        (pb.RewardType(name="n", display_name="N"), "r", "INVALID_CATEGORY", "category is"),
        (_free_spins(), "", "INVALID_REQUEST_ID", "request_id is required"),
    ],
)
async def test_bad_input_is_invalid_argument_and_writes_nothing(
        api: Api, reward_type: pb.RewardType, request_id: str, reason: str, fragment: str) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id=request_id,
                                                               reward_type=reward_type),
                                    metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == reason
    assert fragment in (err.value.details() or "")
    listed = await stub.ListRewardTypes(pb.ListRewardTypesRequest(), metadata=api.key())
    assert list(listed.reward_types) == []


async def test_duplicate_name_is_already_exists(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id="1",
                                                           reward_type=_free_spins()),
                                metadata=api.key())
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id="2",
                                                               reward_type=_free_spins()),
                                    metadata=api.key())
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_error_reason(err.value) == "REWARD_TYPE_EXISTS"


async def test_unknown_is_not_found(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.GetRewardType(pb.GetRewardTypeRequest(name="nope"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(err.value) == "REWARD_TYPE_NOT_FOUND"


async def test_update_mask_is_checked(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    await stub.CreateRewardType(pb.CreateRewardTypeRequest(request_id="1",
                                                           reward_type=_free_spins()),
                                metadata=api.key())
    for paths, reason in ((["name"], "INVALID_UPDATE_MASK"), ([], "EMPTY_UPDATE_MASK")):
        with pytest.raises(grpc.RpcError) as err:
            await stub.UpdateRewardType(pb.UpdateRewardTypeRequest(
                request_id=f"u{paths}", reward_type=pb.RewardType(name="free_spins"),
                update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=api.key())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error_reason(err.value) == reason


async def test_pagination_walks_every_row_once(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    names = [f"type_{i:02d}" for i in range(23)]
    for name in names:
        await stub.CreateRewardType(pb.CreateRewardTypeRequest(
            request_id=name, reward_type=_free_spins(name)), metadata=api.key())
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListRewardTypes(pb.ListRewardTypesRequest(page_size=5, page_token=token),
                                          metadata=api.key())
        seen += [r.name for r in page.reward_types]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    assert pages == 5
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListRewardTypes(pb.ListRewardTypesRequest(page_token="garbage!"),
                                   metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"


async def test_missing_key_is_unauthenticated(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListRewardTypes(pb.ListRewardTypesRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error_reason(err.value) == "MISSING_API_KEY"
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListRewardTypes(pb.ListRewardTypesRequest(),
                                   metadata=(("x-api-key", "wrong-key-wrong-key"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error_reason(err.value) == "INVALID_API_KEY"


async def test_bearer_key_is_accepted(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    key = dict(api.key())["x-api-key"]
    await stub.ListRewardTypes(pb.ListRewardTypesRequest(),
                               metadata=(("authorization", f"Bearer {key}"),))


async def test_wrong_role_is_permission_denied(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListRewardTypes(pb.ListRewardTypesRequest(), metadata=api.key("runtime"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_error_reason(err.value) == "ROLE_REQUIRED"
    assert "test-runtime" in (err.value.details() or "")


async def test_request_id_echoed_in_trailers(api: Api) -> None:
    stub = pb_grpc.RewardTypeServiceStub(api.channel)
    call = stub.ListRewardTypes(pb.ListRewardTypesRequest(),
                                metadata=(*api.key(), ("x-request-id", "trace-42")))
    await call
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "trace-42"
