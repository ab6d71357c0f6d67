"""A caller-chosen listener secret enters the stored request fingerprint (idempotency_keys)
only through scrypt, salted with the RPC and the request id: a plain SHA-256 of the request, as
stored before, let anyone reading that table test guesses of a sealed secret offline. Retries
still replay, other input is still REQUEST_ID_REUSED, and a row stored with the plain
fingerprint (before this change) still answers its retry."""

from __future__ import annotations

import hashlib

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc
from server.convert import request_fingerprint
from tests.conftest import Api, rpc_error_reason

SECRET = "a-chosen-secret-of-thirty-two-ch"
OTHER_SECRET = "another-secret-of-thirty-two-chx"


def _register(request_id: str, secret: str = SECRET) -> pb.RegisterListenerRequest:
    return pb.RegisterListenerRequest(request_id=request_id, listener=pb.Listener(
        event_type=pb.EVENT_TYPE_BONUS_ISSUED, url="https://hooks.example.com/bonus",
        secret=secret))


def _expected(scope: str, request: pb.RegisterListenerRequest | pb.UpdateListenerRequest,
              secret: str) -> bytes:
    """The documented construction, computed independently of server/secret_fingerprint.py."""
    stretched = hashlib.scrypt(secret.encode(), salt=f"{scope}\x00{request.request_id}".encode(),
                               n=2 ** 14, r=8, p=1, dklen=32, maxmem=64 * 1024 * 1024).hex()
    copy = type(request)()
    copy.CopyFrom(request)
    copy.request_id = ""
    copy.listener.secret = f"scrypt:{stretched}"
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


async def _stored_hash(pool: asyncpg.Pool, request_id: str) -> bytes:
    async with pool.acquire() as conn:
        return bytes(await conn.fetchval(
            "SELECT request_hash FROM idempotency_keys WHERE request_id = $1", request_id))


async def test_a_chosen_secret_is_stored_only_stretched_in_the_fingerprint(
        api: Api, pool: asyncpg.Pool) -> None:
    stub = pb_grpc.ListenerServiceStub(api.channel)
    request = _register("with-secret")
    first = await stub.RegisterListener(request, metadata=api.key())
    stored = await _stored_hash(pool, "with-secret")
    assert stored != request_fingerprint(request)  # the plain SHA-256 a guess could be tested on
    assert stored == _expected("RegisterListener", request, SECRET)
    assert await stub.RegisterListener(request, metadata=api.key()) == first  # a retry
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterListener(_register("with-secret", OTHER_SECRET), metadata=api.key())
    assert rpc_error_reason(caught.value) == "REQUEST_ID_REUSED"

    rotate = pb.UpdateListenerRequest(
        request_id="rotate", listener=pb.Listener(listener_id=first.listener.listener_id,
                                                  secret=OTHER_SECRET),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"]))
    rotated = await stub.UpdateListener(rotate, metadata=api.key())
    assert await _stored_hash(pool, "rotate") == _expected("UpdateListener", rotate, OTHER_SECRET)
    assert await stub.UpdateListener(rotate, metadata=api.key()) == rotated
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_listeners") == 1


async def test_without_a_chosen_secret_the_fingerprint_is_the_plain_one(
        api: Api, pool: asyncpg.Pool) -> None:
    stub = pb_grpc.ListenerServiceStub(api.channel)
    request = pb.RegisterListenerRequest(request_id="generated", listener=pb.Listener(
        event_type=pb.EVENT_TYPE_BONUS_ISSUED, url="https://hooks.example.com/bonus"))
    await stub.RegisterListener(request, metadata=api.key())
    assert await _stored_hash(pool, "generated") == request_fingerprint(request)


async def test_a_row_with_the_plain_fingerprint_still_answers_its_retry(
        api: Api, pool: asyncpg.Pool) -> None:
    """As stored by the previous version: the retry replays (no second listener), another
    secret under that id is still refused."""
    stub = pb_grpc.ListenerServiceStub(api.channel)
    request = _register("old")
    first = await stub.RegisterListener(request, metadata=api.key())
    async with pool.acquire() as conn:
        await conn.execute("UPDATE idempotency_keys SET request_hash = $1",
                           request_fingerprint(request))
    assert await stub.RegisterListener(request, metadata=api.key()) == first
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterListener(_register("old", OTHER_SECRET), metadata=api.key())
    assert rpc_error_reason(caught.value) == "REQUEST_ID_REUSED"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_listeners") == 1
