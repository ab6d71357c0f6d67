"""Admission control (server/admission.py) through the real interceptor on a loopback gRPC server.

The service here is a test double whose calls wait on an asyncio.Event, so "calls in flight" is
exact: with a limit of 3, three calls are taken in and every further one is refused at once with
RESOURCE_EXHAUSTED SERVER_OVERLOADED (ErrorInfo and log line included), health answers all the
while, and whatever way a call ends (OK, domain error, client cancel, deadline), its place is
given back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from config.settings import ApiKeyConfig, Settings
from core.errors import NotFound
from server.admission import Admission, core_options
from server.auth import Authenticator
from server.interceptors import ServiceInterceptor

KEY = "k" * 32
METHOD = "/test.Slow/Call"
METADATA = (("x-api-key", KEY),)


class SlowService:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def call(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self.started += 1
        if request == b"fail":
            raise NotFound("no such thing", reason="THING_NOT_FOUND")
        await self.release.wait()
        return request


@pytest.fixture
async def served() -> AsyncIterator[tuple[aio.Channel, SlowService, Admission]]:
    admission = Admission(3)
    authenticator = Authenticator([ApiKeyConfig(name="t", roles=["admin"], key=KEY)],
                                  {METHOD: {"admin"}})
    server = aio.server(interceptors=[ServiceInterceptor(authenticator, None, admission)],
                        options=core_options(admission.limit))
    service = SlowService()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(service.call)}),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, service, admission
    finally:
        service.release.set()
        await channel.close()
        await server.stop(0)


async def _until(predicate: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds * 100)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not reached in {seconds} s")


async def _code(call: Any) -> str:
    try:
        await call
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


async def test_calls_beyond_the_limit_are_refused_at_once_with_error_info(
        served: tuple[aio.Channel, SlowService, Admission],
        caplog: pytest.LogCaptureFixture) -> None:
    channel, service, admission = served
    caplog.set_level(logging.INFO)
    call = channel.unary_unary(METHOD)
    held = [asyncio.ensure_future(call(b"x", metadata=METADATA, timeout=10)) for _ in range(3)]
    await _until(lambda: service.started == 3)
    assert admission.in_flight == 3

    with pytest.raises(aio.AioRpcError) as refused:
        await call(b"x", metadata=METADATA, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == (
        "the server is at its limit of 3 calls in flight; retry with backoff (a retry with the "
        "same request_id never applies a change twice)")
    status = rpc_status.from_call(refused.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == ("SERVER_OVERLOADED",
                                                  {"max_calls_in_flight": "3"})
    assert service.started == 3  # the refused call never reached the service

    # 20 more at once: all refused, one warning for the lot (not one per call), each logged.
    codes = Counter(await asyncio.gather(*[_code(call(b"x", metadata=METADATA, timeout=10))
                                           for _ in range(20)]))
    assert codes == {"RESOURCE_EXHAUSTED": 20}
    assert admission.refused_total == 21
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.getMessage().startswith("calls refused")]
    assert len(warnings) == 1 and warnings[0].refused == 1  # type: ignore[attr-defined]
    failed_lines = [r for r in caplog.records if r.getMessage() == "rpc failed"
                    and getattr(r, "reason", None) == "SERVER_OVERLOADED"]
    assert len(failed_lines) == 21

    # Health is not counted: a load balancer still sees a serving server.
    health_stub = health_pb2_grpc.HealthStub(channel)
    answer = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    service.release.set()
    assert [await h for h in held] == [b"x", b"x", b"x"]
    await _until(lambda: admission.in_flight == 0)
    assert await call(b"y", metadata=METADATA, timeout=10) == b"y"  # places are given back


async def test_every_way_a_call_ends_gives_its_place_back(
        served: tuple[aio.Channel, SlowService, Admission]) -> None:
    channel, service, admission = served
    call = channel.unary_unary(METHOD)
    assert await _code(call(b"fail", metadata=METADATA, timeout=5)) == "NOT_FOUND"
    assert await _code(call(b"x", metadata=METADATA, timeout=0.2)) == "DEADLINE_EXCEEDED"
    cancelled = call(b"x", metadata=METADATA, timeout=10)
    await _until(lambda: admission.in_flight == 1)
    cancelled.cancel()
    await _until(lambda: admission.in_flight == 0)
    # An unauthenticated call is refused before it is counted.
    assert await _code(call(b"x", timeout=5)) == "UNAUTHENTICATED"
    assert admission.in_flight == 0
    # All three places are free again.
    held = [asyncio.ensure_future(call(b"x", metadata=METADATA, timeout=10)) for _ in range(3)]
    await _until(lambda: admission.in_flight == 3)
    service.release.set()
    assert [await h for h in held] == [b"x", b"x", b"x"]


async def test_a_burst_larger_than_grpc_cores_pending_queue_is_refused_not_cancelled(
        served: tuple[aio.Channel, SlowService, Admission]) -> None:
    """gRPC core's own pending-call limit (1,000, hard 3,000 by default) would hold back part of
    a burst of 4,000 (measured: 998 calls never reached the application and ended CANCELLED);
    core_options raises it."""
    channel, service, admission = served
    call = channel.unary_unary(METHOD)
    burst = asyncio.gather(*[_code(call(b"x", metadata=METADATA, timeout=30))
                             for _ in range(4000)])
    await _until(lambda: admission.refused_total == 3997, seconds=60)
    service.release.set()
    assert Counter(await burst) == {"OK": 3, "RESOURCE_EXHAUSTED": 3997}


def test_core_options_and_the_setting() -> None:
    assert core_options(1000) == [("grpc.server.max_pending_requests", 20000),
                                  ("grpc.server.max_pending_requests_hard_limit", 20000)]
    assert core_options(3)[0] == ("grpc.server.max_pending_requests", 20000)
    assert core_options(5000)[1] == ("grpc.server.max_pending_requests_hard_limit", 100000)
    assert Settings().max_calls_in_flight == 500
    with pytest.raises(ValueError, match="max_calls_in_flight"):
        Settings(max_calls_in_flight=0)
