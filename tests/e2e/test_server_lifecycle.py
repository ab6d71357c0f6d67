"""Health, reflection, and the graceful stop of a real server."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from config.settings import Settings
from promo.v1 import reward_types_pb2 as pb
from promo.v1 import reward_types_pb2_grpc as pb_grpc
from server.app import Dependencies, RunningServer, start_server
from tests.conftest import Api


async def test_health_is_serving_without_a_key(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    named = await stub.Check(health_pb2.HealthCheckRequest(service="promo.v1.RewardTypeService"))
    assert named.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for response in stub.ServerReflectionInfo(requests()):
        names += [s.name for s in response.list_services_response.service]
    assert "promo.v1.RewardTypeService" in names
    assert "grpc.health.v1.Health" in names


async def test_graceful_stop_finishes_in_flight_calls(settings: Settings,
                                                      pool: asyncpg.Pool) -> None:
    running = await start_server(settings, Dependencies(pool=pool))
    channel = aio.insecure_channel(running.address)
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.RewardTypeServiceStub(channel)
    key = Api.key()
    # Hold a database lock so an in-flight call is still running when the stop begins.
    blocker = await pool.acquire()
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE reward_types IN ACCESS EXCLUSIVE MODE")
    in_flight = asyncio.ensure_future(stub.CreateRewardType(pb.CreateRewardTypeRequest(
        request_id="slow", reward_type=pb.RewardType(name="slow", display_name="Slow",
                                                     category=pb.REWARD_CATEGORY_AMOUNT)),
        metadata=key))
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(running.stop(5))
    await asyncio.sleep(0.2)
    try:
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError as exc:  # the server may already refuse new calls
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    await tx.rollback()
    await pool.release(blocker)
    created = await in_flight
    assert created.reward_type.name == "slow"
    await stopping
    await channel.close()


async def test_a_crashed_worker_stops_promo_up_gracefully_then_raises(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`promo up` runs server and worker in one process: when the worker dies, the server is
    stopped the graceful way (health NOT_SERVING, calls in flight finish) before the worker's
    error ends the process, rather than closing the pool under running calls."""
    import cli.runtime as runtime

    class CrashingWorker:
        def __init__(self) -> None:
            self.ctx: dict[str, object] = {}

        async def async_run(self) -> None:
            await asyncio.sleep(0)
            raise RuntimeError("the worker fell over")

        async def close(self) -> None:
            return None

    stops: list[float] = []
    original_stop = RunningServer.stop

    async def recorded_stop(self: RunningServer, grace: float) -> None:
        stops.append(grace)
        await original_stop(self, grace)

    import workers.main as worker_main

    monkeypatch.setattr(worker_main, "build_worker", lambda *a, **k: CrashingWorker())
    monkeypatch.setattr(RunningServer, "stop", recorded_stop)
    ready: list[RunningServer] = []
    quiet = settings.model_copy(update={"metrics_port": 0, "redis_url": None})
    with pytest.raises(RuntimeError, match="the worker fell over"):
        await runtime.run_server(quiet, on_ready=ready.append, with_worker=True)
    assert len(ready) == 1 and stops == [quiet.shutdown_grace_seconds]
