"""Clearance benchmark: a campaign of 1,000,000 customers, paged and approved over gRPC, and
the delay between webhook events' due time and their arrival at a local listener.

    .venv/bin/python -m bench.clearance            # full: 1,000,000 customers, 1,000 events
    .venv/bin/python -m bench.clearance --quick    # 100,000 customers, 200 events (< 1 min)

The server runs in its own process (``--serve``), the client here, as a listener would; both
share this machine's 2 cores. Ends with one JSON line: page_all_s, approve_all_s,
delivery_p99_s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from grpc import aio

from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc

ADMIN_KEY = "bench-admin-key-0123456789"
LISTENER_KEY = "bench-listener-key-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _server_env(database_url: str, port: int, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(
        PROMO_DATABASE_URL=database_url, PROMO_GRPC_PORT=str(port), PROMO_LOG_LEVEL="WARNING",
        PROMO_DB_POOL_MAX_SIZE="10",
        PROMO_API_KEYS=json.dumps([
            {"name": "bench-admin", "key": ADMIN_KEY, "roles": ["admin"]},
            {"name": "bench-listener", "key": LISTENER_KEY, "roles": ["listener"]}]))
    if redis_url:
        env["PROMO_REDIS_URL"] = redis_url
    return env


async def _wait_ready(address: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while True:
        channel = aio.insecure_channel(address)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        finally:
            await channel.close()


async def _setup(channel: aio.Channel, customers: int) -> str:
    admin = (("x-api-key", ADMIN_KEY),)
    await rtpb_grpc.RewardTypeServiceStub(channel).CreateRewardType(
        rtpb.CreateRewardTypeRequest(request_id="rt", reward_type=rtpb.RewardType(
            name="cashback", display_name="Cashback", category=rtpb.REWARD_CATEGORY_AMOUNT)),
        metadata=admin)
    await ppb_grpc.PromotionServiceStub(channel).CreatePromotion(ppb.CreatePromotionRequest(
        request_id="p", activate=True, promotion=ppb.Promotion(
            promotion_code="BIG", name="Big campaign promotion", rewards=[ppb.PromotionReward(
                reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="5")])),
        metadata=admin)
    stub = cpb_grpc.CampaignServiceStub(channel)
    execute_at = datetime.now(UTC) + timedelta(days=1)
    campaign = cpb.Campaign(campaign_id="big", name="One million", conditional_execution=True,
                            promotion_codes=["BIG"])
    campaign.execute_at.FromDatetime(execute_at)
    await stub.CreateCampaign(cpb.CreateCampaignRequest(request_id="c", campaign=campaign),
                              metadata=admin)
    chunk = 100_000
    for start in range(0, customers, chunk):
        ids = [f"cust-{i:08d}" for i in range(start, min(customers, start + chunk))]
        await stub.AddCampaignTargets(cpb.AddCampaignTargetsRequest(
            request_id=f"t{start}", campaign_id="big", customer_ids=ids), metadata=admin)
    return "big"


async def _page_all(channel: aio.Channel, campaign_id: str) -> tuple[float, int]:
    stub = cpb_grpc.ClearanceServiceStub(channel)
    listener = (("x-api-key", LISTENER_KEY),)
    started = time.perf_counter()
    token, seen = "", 0
    while True:
        page = await stub.GetProcessedCampaignCustomers(cpb.GetProcessedCampaignCustomersRequest(
            campaign_id=campaign_id, page_size=10_000, page_token=token), metadata=listener)
        seen += len(page.customers)
        token = page.next_page_token
        if not token:
            return time.perf_counter() - started, seen


async def _approve_all(channel: aio.Channel, campaign_id: str, customers: int,
                       in_flight: int) -> tuple[float, int]:
    stub = cpb_grpc.ClearanceServiceStub(channel)
    listener = (("x-api-key", LISTENER_KEY),)
    requests = []
    for start in range(0, customers, 10_000):
        statuses = [cpb.CustomerPromotionStatus(customer_id=f"cust-{i:08d}", approved=True)
                    for i in range(start, min(customers, start + 10_000))]
        requests.append(cpb.UpdateCustomerPromotionStatusRequest(
            campaign_id=campaign_id, request_id=f"a{start}", statuses=statuses))
    semaphore = asyncio.Semaphore(in_flight)
    updated = 0

    async def send(request: cpb.UpdateCustomerPromotionStatusRequest) -> None:
        nonlocal updated
        async with semaphore:
            reply = await stub.UpdateCustomerPromotionStatus(request, metadata=listener)
            updated += reply.updated

    started = time.perf_counter()
    await asyncio.gather(*(send(r) for r in requests))
    return time.perf_counter() - started, updated


class _ArrivalListener:
    """A minimal HTTP/1.1 listener on loopback that records when each event id arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.expected = 0
        self.all_arrived = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                del line
                headers: dict[str, str] = {}
                while (raw := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = raw.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.arrivals.setdefault(headers.get("promo-event-id", ""), time.time())
                if self.expected and len(self.arrivals) >= self.expected:
                    self.all_arrived.set()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _delivery_latency(database_url: str, redis_url: str, events: int,
                            workers: int) -> dict[str, float]:
    """Emit ``events`` events due now in one transaction, queue them as the server does after
    commit, and measure due -> arrival at the listener with real worker processes."""
    from arq import create_pool as create_arq_pool
    from arq.connections import RedisSettings

    from core.events import EventType
    from storage.db import create_pool
    from storage.queue import queue_after_commit
    from storage.webhooks import emit_event, insert_listener

    listener = _ArrivalListener()
    await listener.start()
    queue = f"promo:bench:{uuid.uuid4().hex[:8]}"
    env = _server_env(database_url, 0, redis_url)
    env.update(PROMO_QUEUE_NAME=queue, PROMO_WORKER_MAX_JOBS="50")
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", "worker",
                                                  cwd=ROOT, env=env) for _ in range(workers)]
    pool = await create_pool(database_url, min_size=1, max_size=4)
    redis = await create_arq_pool(RedisSettings.from_dsn(redis_url))
    try:
        async with pool.acquire() as conn:
            await insert_listener(conn, event_type=int(EventType.SCHEDULED_CAMPAIGN),
                                  url=f"http://127.0.0.1:{listener.port}/hook",
                                  secret="bench-secret-0123456789", active=True,
                                  description="bench", now=datetime.now(UTC))
        await asyncio.sleep(2.0)  # let the workers start and connect
        due = datetime.now(UTC)
        emitted = []
        async with pool.acquire() as conn, conn.transaction():
            for i in range(events):
                event = await emit_event(conn, event_type=int(EventType.SCHEDULED_CAMPAIGN),
                                         payload={"campaign_id": f"c{i}"}, now=due)
                assert event is not None
                emitted.append(event)
        for event in emitted:
            for job_id in event.outbox_job_ids:
                await queue_after_commit(redis, job_id=job_id, due_at=due, queue_name=queue)
        listener.expected = events
        if len(listener.arrivals) < events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.all_arrived.wait(), timeout=120)
        delays = sorted(listener.arrivals[e.event_id] - due.timestamp() for e in emitted
                        if e.event_id in listener.arrivals)
        assert len(delays) == events, f"only {len(delays)} of {events} events arrived"
        return {"p50": delays[len(delays) // 2], "p99": delays[int(len(delays) * 0.99) - 1],
                "max": delays[-1]}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), timeout=30)
        await redis.aclose()
        await pool.close()
        await listener.stop()


async def _campaign_part(args: argparse.Namespace, port: int, customers: int,
                         result: dict[str, object]) -> None:
    """The campaign part: the targets added, paged and approved over gRPC."""
    address = f"127.0.0.1:{port}"
    await _wait_ready(address)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
               ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with aio.insecure_channel(address, options=options) as channel:
        started = time.perf_counter()
        campaign_id = await _setup(channel, customers)
        print(f"setup: {customers:,} targets added in {time.perf_counter() - started:.1f} s")
        page_s, seen = await _page_all(channel, campaign_id)
        assert seen == customers, (seen, customers)
        print(f"page all: {seen:,} customers in {page_s:.2f} s "
              f"({seen / page_s:,.0f} customers/s, pages of 10,000)")
        approve_s, updated = await _approve_all(channel, campaign_id, customers,
                                                args.in_flight)
        assert updated == customers, (updated, customers)
        print(f"approve all: {updated:,} in {approve_s:.2f} s ({updated / approve_s:,.0f}/s, "
              f"calls of 10,000, {args.in_flight} in flight)")
    result.update(page_all_s=round(page_s, 3), approve_all_s=round(approve_s, 3))


async def run(args: argparse.Namespace) -> dict[str, object]:
    from storage.migrate import migrate

    customers = 100_000 if args.quick else args.customers
    name = f"promo_bench_clearance_{os.getpid()}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database_url = _with_database(args.database_url, name)
    conn = await asyncpg.connect(database_url)
    await migrate(conn)
    await conn.close()
    port = _free_port()
    server = None if args.only_delivery else await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve", cwd=ROOT,
        env=_server_env(database_url, port, None))
    result: dict[str, object] = {"bench": "clearance", "customers": customers}
    try:
        if server is not None:
            await _campaign_part(args, port, customers, result)
        events = 200 if args.quick else args.events
        latency = await _delivery_latency(database_url, args.redis_url, events, args.workers)
        print(f"delivery: {events:,} events due at once, {args.workers} worker process(es): "
              f"p50 {latency['p50']:.3f} s, p99 {latency['p99']:.3f} s, "
              f"max {latency['max']:.3f} s after their due time")
        result.update(events=events, delivery_p50_s=round(latency["p50"], 3),
                      delivery_p99_s=round(latency["p99"], 3),
                      delivery_max_s=round(latency["max"], 3))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), timeout=30)
        admin = await asyncpg.connect(args.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--in-flight", type=int, default=2,
                        help="approval calls in flight at once")
    parser.add_argument("--database-url", default=os.environ.get(
        "PROMO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--redis-url", default=os.environ.get(
        "PROMO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--run-id", default="")
    parser.add_argument("--only-delivery", action="store_true",
                        help="skip the campaign paging/approval part; measure delivery only")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
