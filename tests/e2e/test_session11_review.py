"""Review of c8808be..HEAD (0b510a0 and 00a90dd: the state-machine, caps, outage and
bonus-race audits' mends).

Reviewed: UpdatePromotion/CreatePromotion/transitions retried after a deadlock; migration
0026 (a full budget grants nothing, not even a charge of 0) and what else reads a budget's
"full"; GetPromotionReconciliation's "#customers" row; CAMPAIGN_NOT_CONDITIONAL, the late
clearance notification, CancelCampaign cancelling the pending clearance deliveries and
schedules refusing CANCELLED campaigns; the bonus batch's restart on a message edit, its cost
from written results, add_requests re-opening a finished window and the batch purge's NOT
EXISTS; queue_after_commit's 1 s bound; WorkerRunner; the DATABASE_UNAVAILABLE mapping; the
grant batcher cancelling futures.

Defects (xfail strict, each test asserts the correct behaviour):

- UpdateBonusSchedule refuses every edit of a schedule whose campaign was cancelled after the
  schedule was made, pausing it included (storage/bonus_triggers.py _schedule_references runs
  on every update): the operator cannot stop it without also changing its campaign.
- queue_after_commit is not bounded by QUEUE_TIMEOUT_SECONDS when Redis stalls after answering
  arq's WATCH: the cancelled pipeline's cleanup (redis-py Pipeline.reset) sends UNWATCH on a
  fresh connection without a socket timeout and waits for Redis, so the committed call waits
  as long as Redis stalls.
- The "#customers" reconciliation row reports a counter mismatch once the customer cap is
  removed and another customer is granted: without a cap the counter is deliberately not kept
  (README "Caps after an edit"), unlike a removed budget cap, whose rows keep matching.
- ForecastCampaign says a campaign fits a budget that is full when its reward is not
  estimated (EXTERNAL): since 0026 every grant of it is refused BUDGET_CAP_REACHED.
- The batch-record purge reads all of bonus_results for every chunk (NOT EXISTS on batch_pk,
  which has no index): measured 1.8 s with 3 M narrow rows (hash anti join spilling to disk),
  33 ms with an index on batch_pk.
- WorkerRunner treats a PostgreSQL that is down at the worker's first start (an OSError from
  on_startup, after ctx["settings"] is set) as "worker lost Redis": it retries every second
  forever instead of failing at once.

Checked and found correct (passing tests): the batched grant path (promo_grant_batch) refuses a
0 charge on a full budget and still opens a new window with a 0 charge; the "#customers" row
with a customer holding several live grants and partial revokes; the grant batcher's waiters
when the lone sender's call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from arq.connections import ArqRedis
from google.protobuf import field_mask_pb2

from config.settings import Settings
from core.caps import LIFETIME_START
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from storage import promotions as repo
from storage.promotions import GrantCharge, GrantRequest
from storage.queue import queue_after_commit
from tests.conftest import Api, rpc_error_reason
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import cap, get_reward, promotion, revoke, reward_type
from tests.e2e.test_caps_budgets_audit import _edit
from tests.e2e.test_state_machine_audit import (
    _campaign_schedule,
    _campaign_schedule_world,
    _cancel,
)

# --- schedules ---------------------------------------------------------------------------------


async def test_a_schedule_whose_campaign_was_cancelled_later_can_still_be_paused(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md: "a schedule cannot be created or edited to *name* a cancelled one".
    A schedule made while its campaign was open names it already; pausing it (there is no
    DeleteBonusSchedule: `active` is the only way to stop a schedule) must work."""
    await _campaign_schedule_world(api, pool, settings, clock)
    await bonus_api.stub(api).CreateBonusSchedule(_campaign_schedule("daily"),
                                                  metadata=api.key())
    await _cancel(api, "cancel")
    reason = None
    try:
        reply = await bonus_api.stub(api).UpdateBonusSchedule(bpb.UpdateBonusScheduleRequest(
            request_id="pause", schedule=bpb.BonusSchedule(schedule_id="daily", active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
    except grpc.RpcError as exc:
        reason = f"{exc.code().name}:{rpc_error_reason(exc)}"
    assert reason is None
    assert reply.schedule.active is False


# --- queueing after commit -------------------------------------------------------------------


class _StallingRedis:
    """A Redis stand-in that answers until it has answered a WATCH, then stalls every command
    on every connection (a Redis that hangs mid-transaction: a long command, a failover)."""

    def __init__(self) -> None:
        self.stalled = False
        self.commands: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if not line.startswith(b"*"):
                    continue
                args = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2])
                name = args[0].decode().upper()
                self.commands.append(name + (" (stalled)" if self.stalled else ""))
                if self.stalled:
                    continue
                writer.write(b"+PONG\r\n" if name == "PING" else b"+OK\r\n")
                await writer.drain()
                if name == "WATCH":
                    self.stalled = True
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return


async def test_queueing_after_commit_is_bounded_when_redis_stalls_mid_transaction() -> None:
    """storage/queue.py: "Queueing after commit waits at most this long for Redis (1 s): a
    Redis that accepts connections but does not answer ... must not hold an answer whose
    change has committed"."""
    fake = _StallingRedis()
    url = await fake.start()
    redis = ArqRedis.from_url(url)
    began = time.monotonic()
    try:
        with contextlib.suppress(TimeoutError):  # still waiting after 4 s
            await asyncio.wait_for(queue_after_commit(
                redis, job_id=1, due_at=datetime.now(UTC), queue_name="review11"), 4)
        took = time.monotonic() - began
    finally:
        await fake.stop()
        await redis.aclose(close_connection_pool=True)
    assert "WATCH" in fake.commands
    assert took < 2.0, (round(took, 2), fake.commands)


# --- reconciliation: "#customers" --------------------------------------------------------------


async def _reconciliation(api: Api, code: str = "VIP25") -> dict[str, ppb.ReconciliationRow]:
    reply = await ppb_grpc.PromotionServiceStub(api.channel).GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code=code), metadata=api.key())
    return {r.scope: r for r in reply.rows}


async def test_customers_row_counts_customers_not_grants(api: Api) -> None:
    """A customer holding two live grants (two campaigns) is one customer; revoking one of them
    frees nothing; revoking both makes the customer "revoked". The row matches the counter at
    every step (checked: customer_reconciliation's live_grants, promo_revoke's slot)."""
    await reward_type(api)
    await promotion(api, customer_cap=10)
    a1 = await get_reward(api, "a", campaign_id="spring")
    a2 = await get_reward(api, "a", campaign_id="summer")
    await get_reward(api, "b")
    assert a1.HasField("grant") and a2.HasField("grant")
    assert a1.grant.grant_id != a2.grant.grant_id
    row = (await _reconciliation(api))["#customers"]
    assert (row.granted_count, row.revoked_count, row.net_amount, row.limit,
            row.counter_matches) == (2, 0, "2", "10", True)
    await revoke(api, a1.grant.grant_id)
    row = (await _reconciliation(api))["#customers"]
    assert (row.granted_count, row.revoked_count, row.net_amount, row.counter_matches) == (
        2, 0, "2", True)
    await revoke(api, a2.grant.grant_id)
    row = (await _reconciliation(api))["#customers"]
    assert (row.granted_count, row.revoked_count, row.net_amount, row.counter_matches) == (
        2, 1, "1", True)


async def test_customers_row_raises_no_false_alarm_after_the_cap_is_removed(api: Api) -> None:
    """README "Caps after an edit": grants made while a cap is off are not counted by it, and a
    revoke frees a slot "only while a customer cap is set". A removed budget cap's rows keep
    matching (they count charged grants only); the "#customers" row must not report drift
    either: no row while no cap is set, or one that matches."""
    await reward_type(api)
    await promotion(api, customer_cap=5)
    assert (await get_reward(api, "a")).HasField("grant")
    await _edit(api, "VIP25", ["customer_cap"], customer_cap=0)
    assert (await get_reward(api, "b")).HasField("grant")
    rows = await _reconciliation(api)
    row = rows.get("#customers")
    assert row is None or row.counter_matches, row


# --- 0026: a full budget, and what else reads "full" --------------------------------------------


async def test_forecast_of_a_full_budget_does_not_fit(api: Api, clock: FixedClock) -> None:
    """An EXTERNAL reward's lifetime budget of 10 is used up; every further GetReward of the
    promotion is BUDGET_CAP_REACHED, with or without a value. ForecastCampaign for a campaign of
    two customers must not say the campaign fits that cap."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(reward_type="cashback",
                                                      kind=ppb.REWARD_KIND_EXTERNAL)],
                    caps=[cap(ppb.CAP_PERIOD_LIFETIME, "10")])
    first = await get_reward(api, "x", external_values={"cashback": "10"})
    assert first.HasField("grant")
    refused = await get_reward(api, "y")
    assert (refused.HasField("grant"), refused.denial_reason) == (
        False, rpb.DENIAL_REASON_BUDGET_CAP_REACHED)
    await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                          customers=["c1", "c2"], conditional=False)
    forecast = await cpb_grpc.ClearanceServiceStub(api.channel).ForecastCampaign(
        cpb.ForecastCampaignRequest(campaign_id="spring"), metadata=api.key("listener"))
    [promo] = forecast.promotions
    [budget] = promo.caps
    assert (budget.used, budget.limit) == ("10", "10")
    assert (budget.fits, promo.fits, forecast.fits) == (False, False, False)


def _zero_grant(row: asyncpg.Record, customer: str, start: datetime) -> GrantRequest:
    return GrantRequest(
        promotion_id=row["id"], version=row["version"], customer_id=customer, campaign_key="",
        request_id=f"zero-{customer}",
        rewards=[{"reward_type": "cashback", "kind": "EXTERNAL", "value": None}],
        promo_code="VIP25", now=start, customer_cap=None, customers_start=LIFETIME_START,
        charges=[GrantCharge("cashback", "DAILY", start, Decimal(0), Decimal(10))])


async def test_batched_grants_of_0_are_refused_by_a_full_budget_and_open_a_new_window(
        api: Api, pool: asyncpg.Pool) -> None:
    """promo_grant_batch calls promo_grant (0025), so 0026's rule holds for grouped grants:
    on a full daily window each 0 charge is BUDGET_CAP_REACHED, alone, and nothing is written;
    the next day's window does not exist yet and a 0 charge opens it (limits are positive)."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(reward_type="cashback",
                                                      kind=ppb.REWARD_KIND_EXTERNAL)],
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "10")])
    assert (await get_reward(api, "x", external_values={"cashback": "10"})).HasField("grant")
    row = await pool.fetchrow("SELECT id, version FROM promotions WHERE code = 'VIP25'")
    today = datetime(2026, 11, 22, tzinfo=UTC)
    async with pool.acquire() as conn:
        outcomes = await repo.grant_many(conn, [_zero_grant(row, c, today) for c in "abc"])
    assert [(o.outcome, o.denied_scope) for o in outcomes] == [
        ("BUDGET_CAP_REACHED", "cashback")] * 3
    assert await pool.fetchval("SELECT count(*) FROM grants") == 1
    tomorrow = today + timedelta(days=1)
    async with pool.acquire() as conn:
        outcomes = await repo.grant_many(conn, [_zero_grant(row, c, tomorrow) for c in "de"])
    assert [o.outcome for o in outcomes] == ["GRANTED", "GRANTED"]
    assert await pool.fetchval(
        "SELECT used FROM cap_usage WHERE scope = 'cashback' AND period_start = $1",
        tomorrow) == 0


# --- retention: the batch-record purge ----------------------------------------------------------


def _rows_read(node: dict[str, Any], table: str) -> int:
    own = (node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
           if node.get("Relation Name") == table else 0)
    return own + sum(_rows_read(child, table) for child in node.get("Plans", []))


async def test_the_batch_record_purge_does_not_read_every_bonus_result(
        pool: asyncpg.Pool) -> None:
    """31 days of 5-minute windows of two definitions, 200,000 results of the last 30 days
    (the older ones already purged): the hourly purge of the first day's batch records must
    look up their results, not read every result (storage/retention.py says "the purge never
    writes to, nor waits on, a result row"; its cost must not grow with the results kept)."""
    from storage.retention import _BONUS_BATCHES_SQL
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")  # no definitions needed
        await conn.execute(
            """INSERT INTO bonus_batches (id, definition_pk, window_start, window_end,
                                          finish_time)
               SELECT row_number() OVER (ORDER BY w, d), d, w, w + interval '5 min',
                      w + interval '6 min'
                 FROM generate_series(timestamptz '2026-10-01',
                                      timestamptz '2026-10-31 23:55', interval '5 min') w,
                      generate_series(1, 2) d""")
        batches = await conn.fetchval("SELECT count(*) FROM bonus_batches")
        first_day = 2 * 288
        await conn.execute(
            """INSERT INTO bonus_results (bonus_id, request_pk, definition_pk, batch_pk,
                                          customer_id, status, result_type,
                                          definition_revision, calculate_time)
               SELECT gen_random_uuid(), i, 1, $1 + 1 + i % ($2 - $1), 'c' || i, 'ISSUED',
                      'AMOUNT', 1, timestamptz '2026-10-02' + i * interval '10 seconds'
                 FROM generate_series(1, 200000) i""", first_day, batches)
        await conn.execute("RESET session_replication_role")
        await conn.execute("ANALYZE bonus_batches")
        await conn.execute("ANALYZE bonus_results")
        trial = conn.transaction()
        await trial.start()
        try:
            raw = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + _BONUS_BATCHES_SQL,
                datetime(2026, 10, 2, 0, 30, tzinfo=UTC), 5000)
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
        finally:
            await trial.rollback()
    read = _rows_read(plan["Plan"], "bonus_results")
    assert read < 20_000, (read, plan["Execution Time"])


# --- WorkerRunner ----------------------------------------------------------------------------


async def test_a_worker_whose_database_is_down_at_its_first_start_fails_at_once(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """docs/operations.md: only a worker that lost Redis after starting is started again; a
    worker that cannot start fails with the error (as `promo worker` did before)."""
    from workers.main import WorkerRunner

    broken = settings.model_copy(update={
        "database_url": "postgresql://postgres@127.0.0.1:1/postgres", "db_pool_min_size": 1})
    runner = WorkerRunner(broken)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="promo.worker")
    task = asyncio.create_task(runner.run(stop))
    done, _ = await asyncio.wait({task}, timeout=5)
    stop.set()
    error: BaseException | None = None
    try:
        await asyncio.wait_for(task, 10)
    except Exception as exc:  # the database error, when it fails at once
        error = exc
    lost_redis = [r for r in caplog.records if "worker lost Redis" in r.getMessage()]
    assert (task in done, lost_redis) == (True, []), (error, len(lost_redis))
    assert isinstance(error, OSError)


# --- the grant batcher ---------------------------------------------------------------------


async def test_a_cancelled_lone_grant_leaves_no_waiter_hanging(api: Api, pool: asyncpg.Pool,
                                                               clock: FixedClock) -> None:
    """server/grant_batcher.py now cancels the futures of a sender that was cancelled. The lone
    sender's own call is cancelled (its deadline) while the database holds it on a locked
    counter; grants queued behind it meanwhile must still be answered once the lock goes."""
    from server.grant_batcher import GrantBatcher

    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1000")])
    assert (await get_reward(api, "seed")).HasField("grant")  # the counter row exists
    row = await pool.fetchrow("SELECT id, version FROM promotions WHERE code = 'VIP25'")
    batcher = GrantBatcher(pool, max_batch=8, max_in_flight=1)

    def request(customer: str) -> GrantRequest:
        return GrantRequest(
            promotion_id=row["id"], version=row["version"], customer_id=customer,
            campaign_key="", request_id=f"lone-{customer}-{uuid.uuid4().hex[:6]}",
            rewards=[{"reward_type": "cashback", "kind": "SINGLE", "value": "15"}],
            promo_code="VIP25", now=clock.now(), customer_cap=None,
            customers_start=LIFETIME_START,
            charges=[GrantCharge("cashback", "LIFETIME", LIFETIME_START, Decimal(15),
                                 Decimal(1000))])

    async with pool.acquire() as holder:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM cap_usage WHERE promotion_id = $1 FOR UPDATE",
                             row["id"])
        lone = asyncio.create_task(batcher.grant(request("lone")))
        await asyncio.sleep(0.3)
        queued = [asyncio.create_task(batcher.grant(request(c))) for c in ("q1", "q2")]
        await asyncio.sleep(0.1)
        lone.cancel()
        await asyncio.sleep(0.2)
        await lock.rollback()
    answers = await asyncio.wait_for(asyncio.gather(*queued), 10)
    assert [a.outcome for a in answers] == ["GRANTED", "GRANTED"]
    with pytest.raises(asyncio.CancelledError):
        await lone
