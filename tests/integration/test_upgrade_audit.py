"""Upgrade audit: a deployment of an older version, with real data, upgraded to this code.

Each test builds a scratch database migrated only up to the migration before the one under
test (the SQL files applied in order and recorded in schema_migrations exactly as
storage/migrate.py records them, so the real ``migrate_dsn`` then sees them as applied), writes
rows the way that older version wrote them (its own SQL functions where it had them: the
15-argument promo_grant of 0002/0007/0010, the 0002 promo_revoke), runs the real migration to
head, and checks that the data is still there, still read by the current storage code, the
gRPC API and the worker handlers, and that the invariants the new migrations introduce hold
for the old rows.

Found and fixed (each test was a strict xfail first): customer-cap counters that pre-0020
revokes had moved below the live customers were never repaired (migration 0028 recounts them);
0027 did not withdraw the announcements of campaigns cancelled before it (it does now); a clear
listener secret starting with "enc:" stored before encryption existed was read as a damaged
sealed value (only "enc:v<N>:" marks a sealed one now); a migration waiting for a table lock
behind a long transaction made the service queue behind it (1 s lock timeout, retried with
backoff, a clear error after 5 minutes). Servers older than 0012 cannot grant during a rolling
upgrade to head (their grant call was dropped by 0012): documented in docs/operations.md; the
test checks the calls of every version since.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import ApiKeyConfig, Settings
from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    ResultType,
    validate_definition,
)
from core.campaigns import clearance_dedup_key
from core.caps import LIFETIME_START, period_window
from core.catalogue.promotions import CapPeriod
from core.clock import FixedClock, SystemClock
from core.errors import FailedPrecondition
from core.events import EventType
from core.periods import TimeBackPeriod
from core.rounding import RoundingMode
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as pb
from promo.v1 import rewards_pb2_grpc as pb_grpc
from server.convert import request_fingerprint, timestamp
from storage import bonus_triggers as triggers_repo
from storage import bonuses as bonuses_repo
from storage import promotions as promotions_repo
from storage import webhooks as webhooks_repo
from storage.bonuses import _definition_values
from storage.db import _init_connection, create_pool
from storage.migrate import APPLICATION_NAME, load_migrations, migrate_dsn
from tests.conftest import ADMIN_KEY, LISTENER_KEY, RUNTIME_KEY, Services, serving_api
from tests.webhook_listener import WebhookListener
from workers import bonuses as _bonus_jobs  # noqa: F401  registers the bonus.batch handler
from workers import campaigns as _campaign_jobs  # noqa: F401  registers campaign.* handlers
from workers import webhooks
from workers.outbox import run_outbox_job

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
SECOND_ADMIN_KEY = "test-second-admin-key-0123456789"
KEYS = [
    ApiKeyConfig(name="test-admin", key=ADMIN_KEY, roles=["admin"]),
    ApiKeyConfig(name="test-runtime", key=RUNTIME_KEY, roles=["runtime"]),
    ApiKeyConfig(name="test-listener", key=LISTENER_KEY, roles=["listener"]),
    ApiKeyConfig(name="second-admin", key=SECOND_ADMIN_KEY, roles=["admin"]),
]
ADMIN = (("x-api-key", ADMIN_KEY),)
SECOND_ADMIN = (("x-api-key", SECOND_ADMIN_KEY),)
RUNTIME = (("x-api-key", RUNTIME_KEY),)

# The grant call of the servers before migration 0010 (storage/promotions.py at c6a519a^),
# which every server before 0012 made with these 15 arguments.
OLD_GRANT_15 = ("SELECT * FROM promo_grant($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10,"
                " $11, $12, $13, $14, $15)")
# The grant call of the servers from 0012 to 0024 (17 arguments, the code pool's two).
OLD_GRANT_17 = ("SELECT * FROM promo_grant($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10,"
                " $11, $12, $13, $14, $15, $16, $17)")


# --- scratch databases at an old version -----------------------------------------------------


async def upgrade(url: str, from_version: int) -> None:
    """The real upgrade (PROMO_MIGRATE_ON_START): two processes starting at once over the old
    data apply every later migration once between them, in order; another run applies
    nothing."""
    first, second = await asyncio.gather(migrate_dsn(url), migrate_dsn(url))
    pending = [m.version for m in load_migrations() if m.version > from_version]
    assert sorted(first + second) == pending and (first == pending or second == pending)
    assert await migrate_dsn(url) == []


def settings_for(url: str, services: Services, queue_name: str) -> Settings:
    return Settings(database_url=url, redis_url=services.redis_url, grpc_port=0,
                    api_keys=KEYS, queue_name=queue_name, migrate_on_start=False,
                    db_pool_min_size=1, db_pool_max_size=5, shutdown_grace_seconds=1,
                    sweeper_interval_seconds=1, job_retry_base_seconds=0.05,
                    job_retry_max_seconds=0.5, webhook_retry_max_seconds=0.5,
                    log_format="text")


@contextlib.asynccontextmanager
async def api_on(url: str, services: Services, queue_name: str,
                 clock: FixedClock) -> AsyncIterator[grpc.aio.Channel]:
    settings = settings_for(url, services, queue_name)
    pool = await create_pool(url, min_size=1, max_size=5)
    try:
        async with serving_api(settings, pool, clock) as api:
            yield api.channel
    finally:
        await pool.close()


# --- old rows, as the old versions wrote them ------------------------------------------------


async def add_reward_type(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(
        "INSERT INTO reward_types (name, display_name, category) VALUES ($1, $2, 'AMOUNT')",
        name, name.title())


async def add_old_promotion(conn: asyncpg.Connection, code: str, *,
                            rewards: list[dict[str, Any]], customer_cap: int | None = None,
                            budget_caps: list[dict[str, Any]] | None = None) -> int:
    """A promotion row as the servers before 0011 stored it (no formulas, no code columns)."""
    return int(await conn.fetchval(
        """INSERT INTO promotions (code, name, description, properties, status, time_zone,
                                   customer_cap, rewards, budget_caps, reward_kinds)
           VALUES ($1, $2, $3, '{"channel": "web"}'::jsonb, 'ACTIVE', 'UTC', $4,
                   $5::text::jsonb, $6::text::jsonb, $7) RETURNING id""",
        code, f"Old {code}", "d" * 2000, customer_cap, json.dumps(rewards),
        json.dumps(budget_caps or []), sorted({r["kind"] for r in rewards})))


def reward(reward_type: str, kind: str, value: str | None = None, **extra: Any) -> dict[str, Any]:
    """A promotion reward as storage.promotions.reward_to_json has written it since the start."""
    return {"reward_type": reward_type, "kind": kind, "value": value, "tiers": [],
            "formula": "", "rounding": "NONE", "decimals": 2, "rounding_factor": None,
            "lookback_days": 30, "min_value": None, "max_value": None, **extra}


async def old_grant_15(conn: asyncpg.Connection, promotion_id: int, code: str, customer: str,
                       request_id: str, values: list[dict[str, Any]], *,
                       customer_cap: int | None,
                       charges: list[tuple[str, CapPeriod, Decimal, Decimal]],
                       version: int = 1, when: datetime = NOW - timedelta(hours=1)
                       ) -> asyncpg.Record:
    """A GetReward grant by a server before 0012: its 15-argument promo_grant."""
    starts = [period_window(period, when, "UTC")[0] for _, period, _, _ in charges]
    row = await conn.fetchrow(
        OLD_GRANT_15, promotion_id, version, customer, "", request_id, json.dumps(values), code,
        when, customer_cap, LIFETIME_START, [c[0] for c in charges],
        [c[1].value for c in charges], starts, [c[2] for c in charges], [c[3] for c in charges])
    assert row is not None and row["outcome"] == "GRANTED", row
    return row


# --- 0011 / 0012 / 0026: promotions and grants made before, used after -----------------------


async def test_grants_made_before_0011_survive_and_caps_continue_from_them(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """Version 0010 data (15-argument promo_grant, promotions without formulas or code
    columns): after the upgrade a retry gets its old grant back, new grants count on the old
    counters (customer cap, daily budget), a revoke of an old grant gives back exactly what it
    took, a full budget stays closed even to a charge of 0 (0026), and a CALCULATED reward
    saved before 0011 is compiled from its source."""
    url = await database_at(10)
    conn = await asyncpg.connect(url)
    long_customer = "c" * 128  # the longest customer id GetReward accepts
    try:
        for name in ("cash", "ext", "cashback"):
            await add_reward_type(conn, name)
        single = await add_old_promotion(
            conn, "OLD-SINGLE", rewards=[reward("cash", "SINGLE", "10")], customer_cap=3,
            budget_caps=[{"reward_type": "cash", "period": "DAILY", "limit": "30"}])
        cash = [{"reward_type": "cash", "kind": "SINGLE", "value": "10"}]
        daily = [("cash", CapPeriod.DAILY, Decimal(10), Decimal(30))]
        first = await old_grant_15(conn, single, "OLD-SINGLE", "c1", "r-c1", cash,
                                   customer_cap=3, charges=daily)
        await old_grant_15(conn, single, "OLD-SINGLE", long_customer, "r-long", cash,
                           customer_cap=3, charges=daily)
        external = await add_old_promotion(
            conn, "OLD-EXT", rewards=[reward("ext", "EXTERNAL")],
            budget_caps=[{"reward_type": "ext", "period": "LIFETIME", "limit": "20"}])
        await old_grant_15(conn, external, "OLD-EXT", "e1", "r-e1",
                           [{"reward_type": "ext", "kind": "EXTERNAL", "value": "20"}],
                           customer_cap=None,
                           charges=[("ext", CapPeriod.LIFETIME, Decimal(20), Decimal(20))])
        await add_old_promotion(conn, "OLD-CALC", rewards=[reward(
            "cashback", "CALCULATED", formula="last(deposit.amount) * 10%", lookback_days=7)])
        await conn.execute("INSERT INTO customers (customer_id, time_zone, currency) "
                           "VALUES ('f1', 'UTC', 'EUR')")
        await conn.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency,
                                   occurred_at)
               VALUES ('dep-1', 'f1', 'deposit', 50, 'EUR', $1)""", NOW - timedelta(days=1))
    finally:
        await conn.close()

    await upgrade(url, 10)

    conn = await asyncpg.connect(url)
    await _init_connection(conn)  # jsonb as Python objects, as the service's pool has it
    try:
        formulas = await conn.fetchval("SELECT formulas::text FROM promotions WHERE id = $1",
                                       single)
        assert formulas == "{}"
        stored = await promotions_repo.get(conn, "OLD-SINGLE")
        assert stored.promotion.customer_cap == 3 and stored.promotion.description == "d" * 2000
        assert stored.promotion.code_type.value == "PROMOTION_CODE"
        assert stored.promotion.fallback_code == "" and stored.promotion.code_alerts == ()
    finally:
        await conn.close()

    async with api_on(url, services, queue_name, FixedClock(NOW)) as channel:
        rewards = pb_grpc.RewardServiceStub(channel)

        async def get(code: str, customer: str, request_id: str,
                      **external: str) -> pb.GetRewardResponse:
            return await rewards.GetReward(pb.GetRewardRequest(
                promotion_code=code, customer_id=customer, request_id=request_id,
                external_values=external), metadata=RUNTIME)

        retry = await get("OLD-SINGLE", "c1", "r-c1")
        assert retry.existing and retry.grant.grant_id == str(first["grant_id"])
        assert [(r.reward_type, r.value) for r in retry.grant.rewards] == [("cash", "10")]
        assert retry.grant.granted_at == timestamp(NOW - timedelta(hours=1))
        again = await get("OLD-SINGLE", long_customer, "r-long-2")  # the customer holds one
        assert again.existing and again.grant.customer_id == long_customer

        third = await get("OLD-SINGLE", "c3", "r-c3")
        assert third.HasField("grant") and not third.existing
        fourth = await get("OLD-SINGLE", "c4", "r-c4")  # 3 customers, 30 of 30 spent
        assert fourth.denial_reason in (pb.DENIAL_REASON_CUSTOMER_CAP_REACHED,
                                        pb.DENIAL_REASON_BUDGET_CAP_REACHED)

        revoked = await rewards.RevokeGrant(pb.RevokeGrantRequest(
            request_id="rv-c1", grant_id=str(first["grant_id"]), reason="upgrade audit"),
            metadata=RUNTIME)
        assert revoked.revoked
        fourth = await get("OLD-SINGLE", "c4", "r-c4b")
        assert fourth.HasField("grant"), fourth

        # 0026: the old lifetime budget is full (20 of 20): a value of 0 gets nothing either.
        zero = await get("OLD-EXT", "e2", "r-e2", ext="0")
        assert zero.denial_reason == pb.DENIAL_REASON_BUDGET_CAP_REACHED

        calculated = await get("OLD-CALC", "f1", "r-f1")
        assert [(r.reward_type, r.value) for r in calculated.grant.rewards] == [("cashback", "5")]

    conn = await asyncpg.connect(url)
    try:
        counters = {(r["scope"], r["period"]): (r["used"], r["grants"]) for r in await conn.fetch(
            "SELECT scope, period, used, grants FROM cap_usage WHERE promotion_id = $1", single)}
        assert counters == {("#customers", "LIFETIME"): (3, 3),
                            ("cash", "DAILY"): (Decimal(30), 3)}
        live = await conn.fetchval("SELECT count(*) FROM promotion_customers "
                                   "WHERE promotion_id = $1 AND live_grants > 0", single)
        assert live == 3
    finally:
        await conn.close()


async def test_previous_release_servers_can_still_grant_during_a_rolling_upgrade(
        database_at: Callable[[int], Awaitable[str]]) -> None:
    """Servers of any version since 0012 call promo_grant with the same 17 arguments: one still
    running while the first new process migrates to head keeps granting, and reads what it
    always read (docs/operations.md "Upgrading"). Before 0012 the call was different (0012
    dropped the 15-argument function, 0010 changed its answer): an upgrade from a version that
    old needs every server stopped first, as docs/operations.md says."""
    url = await database_at(12)
    conn = await asyncpg.connect(url)
    try:
        await add_reward_type(conn, "cash")
        promotion = await add_old_promotion(conn, "ROLLING",
                                            rewards=[reward("cash", "SINGLE", "10")])
    finally:
        await conn.close()
    await upgrade(url, 12)  # the first new process starts and migrates
    conn = await asyncpg.connect(url)
    try:
        # An old server's GetReward, unchanged: the call and what it reads of the answer.
        row = await conn.fetchrow(
            OLD_GRANT_17, promotion, 1, "c1", "", "r1",
            json.dumps([{"reward_type": "cash", "kind": "SINGLE", "value": "10"}]), "ROLLING",
            NOW, None, LIFETIME_START, [], [], [], [], [], False, "")
        # What that code reads of a new grant (storage.promotions._outcome since 0010: the
        # rewards and time it sent, the id and code it gets back).
        assert row is not None and row["outcome"] == "GRANTED" and row["grant_id"] is not None
    finally:
        await conn.close()


# --- 0020: the customer counter that pre-0020 revokes let drift -------------------------------


async def test_customer_counter_drifted_before_0020_does_not_let_the_cap_be_exceeded(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """Under 0019 (and the code of then): a customer cap of 2, customer A granted; the cap
    removed (UpdatePromotion), B granted and revoked (the old promo_revoke gave back a slot B
    never took: counter 0 with A live); the cap set again (the old save inserted the counter
    ON CONFLICT DO NOTHING, so it stayed 0). After the upgrade only one more customer fits."""
    url = await database_at(19)
    conn = await asyncpg.connect(url)
    cash = json.dumps([{"reward_type": "cash", "kind": "SINGLE", "value": "1"}])
    try:
        await add_reward_type(conn, "cash")
        promotion = await add_old_promotion(conn, "DRIFT",
                                            rewards=[reward("cash", "SINGLE", "1")],
                                            customer_cap=2)

        async def grant(customer: str, cap: int | None, version: int) -> int:
            row = await conn.fetchrow(
                OLD_GRANT_17, promotion, version, customer, "", f"r-{customer}", cash, "DRIFT",
                NOW - timedelta(hours=1), cap, LIFETIME_START, [], [], [], [], [], False, "")
            assert row is not None and row["outcome"] == "GRANTED", row
            return int(row["grant_id"])

        await grant("A", 2, 1)
        await conn.execute("UPDATE promotions SET customer_cap = NULL, version = 2 "
                           "WHERE id = $1", promotion)
        b = await grant("B", None, 2)
        outcome = await conn.fetchval("SELECT outcome FROM promo_revoke($1, 'test', $2)", b,
                                      NOW - timedelta(minutes=30))
        assert outcome == "REVOKED"
        await conn.execute("UPDATE promotions SET customer_cap = 2, version = 3 "
                           "WHERE id = $1", promotion)
        await conn.execute(  # storage.promotions.save before cb6d99d
            """INSERT INTO cap_usage (promotion_id, scope, period, period_start, used, grants)
               SELECT $1, '#customers', 'LIFETIME', 'epoch'::timestamptz, count(*), count(*)
                 FROM promotion_customers WHERE promotion_id = $1 AND live_grants > 0
               ON CONFLICT (promotion_id, scope, period, period_start) DO NOTHING""",
            promotion)
        assert await conn.fetchval("SELECT used FROM cap_usage WHERE promotion_id = $1",
                                   promotion) == 0  # the drift: A is live, nobody counted
    finally:
        await conn.close()

    await upgrade(url, 19)

    async with api_on(url, services, queue_name, FixedClock(NOW)) as channel:
        rewards = pb_grpc.RewardServiceStub(channel)
        answers = [await rewards.GetReward(pb.GetRewardRequest(
            promotion_code="DRIFT", customer_id=c, request_id=f"r-{c}"), metadata=RUNTIME)
            for c in ("C", "D")]
    assert answers[0].HasField("grant")
    # A and C hold the cap's two places: D must be refused (DESIGN invariant 1).
    assert answers[1].denial_reason == pb.DENIAL_REASON_CUSTOMER_CAP_REACHED, answers[1]


# --- 0023: a customer who took two codes of one pool before it ---------------------------------


async def test_customer_holding_two_pool_codes_from_before_0023_takes_no_third(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """Under 0022 a customer activated directly and through a campaign took two codes of a
    PERSONALIZED pool. After the upgrade a third activation (another campaign) gives a code the
    customer holds and allocates nothing; the pool's counter stays exact for everyone else."""
    url = await database_at(22)
    conn = await asyncpg.connect(url)
    cash = json.dumps([{"reward_type": "cash", "kind": "SINGLE", "value": "5"}])
    try:
        await add_reward_type(conn, "cash")
        promotion = await add_old_promotion(conn, "POOL",
                                            rewards=[reward("cash", "SINGLE", "5")])
        await conn.execute("UPDATE promotions SET code_type = 'PERSONALIZED' WHERE id = $1",
                           promotion)
        upload = await conn.fetchval(
            """INSERT INTO code_uploads (promotion_id, codes, bytes, first_ordinal, uploaded_at)
               VALUES ($1, 3, 30, 1, $2) RETURNING id""", promotion, NOW - timedelta(days=1))
        await conn.execute(
            """INSERT INTO promo_codes (promotion_id, ordinal, code, upload_id)
               SELECT $1, n, 'CODE-' || n, $2 FROM generate_series(1, 3) AS n""",
            promotion, upload)
        await conn.execute(
            """INSERT INTO code_pools (promotion_id, total, uploads, next_alert_at)
               VALUES ($1, 3, 1, -1)""", promotion)
        codes = []
        for campaign in ("", "camp-1"):
            row = await conn.fetchrow(
                OLD_GRANT_17, promotion, 1, "X", campaign, f"r-X{campaign}", cash, "POOL",
                NOW - timedelta(hours=1), None, LIFETIME_START, [], [], [], [], [], True, "")
            assert row is not None and row["outcome"] == "GRANTED"
            codes.append(row["promo_code"])
        assert codes == ["CODE-1", "CODE-2"]  # what 0023 stopped
    finally:
        await conn.close()

    await upgrade(url, 22)

    async with api_on(url, services, queue_name, FixedClock(NOW)) as channel:
        rewards = pb_grpc.RewardServiceStub(channel)

        async def get(customer: str, campaign: str) -> pb.GetRewardResponse:
            return await rewards.GetReward(pb.GetRewardRequest(
                promotion_code="POOL", customer_id=customer, campaign_id=campaign,
                request_id=f"new-{customer}-{campaign}"), metadata=RUNTIME)

        again = await get("X", "camp-2")
        assert again.grant.promo_code in ("CODE-1", "CODE-2")
        assert (await get("Y", "")).grant.promo_code == "CODE-3"
        assert (await get("Z", "")).denial_reason == pb.DENIAL_REASON_OUT_OF_CODES
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT allocated FROM code_pools") == 3
    finally:
        await conn.close()


# --- 0022: answers stored before the caller column --------------------------------------------


async def test_answer_stored_before_0022_is_replayed_to_any_caller(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """docs/operations.md: answers stored before migration 0022 are replayed to any caller
    retrying them, so no call in flight during the upgrade fails or runs twice."""
    url = await database_at(21)
    request = rtpb.CreateRewardTypeRequest(request_id="rt-1", reward_type=rtpb.RewardType(
        name="points", display_name="Points", category=rtpb.REWARD_CATEGORY_UNITS))
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            """INSERT INTO reward_types (name, display_name, category)
               VALUES ('points', 'Points', 'UNITS') RETURNING create_time, update_time""")
        answer = rtpb.CreateRewardTypeResponse(reward_type=rtpb.RewardType(
            name="points", display_name="Points", category=rtpb.REWARD_CATEGORY_UNITS,
            create_time=timestamp(row["create_time"]), update_time=timestamp(row["update_time"])))
        await conn.execute(
            """INSERT INTO idempotency_keys (scope, request_id, request_hash, response)
               VALUES ('CreateRewardType', 'rt-1', $1, $2)""",
            request_fingerprint(request), answer.SerializeToString())
    finally:
        await conn.close()

    await upgrade(url, 21)

    async with api_on(url, services, queue_name, FixedClock(NOW)) as channel:
        stub = rtpb_grpc.RewardTypeServiceStub(channel)
        for caller in (ADMIN, SECOND_ADMIN):
            replayed = await stub.CreateRewardType(request, metadata=caller)
            assert replayed == answer
        fresh = rtpb.CreateRewardTypeRequest(request_id="rt-2", reward_type=rtpb.RewardType(
            name="gems", display_name="Gems", category=rtpb.REWARD_CATEGORY_UNITS))
        await stub.CreateRewardType(fresh, metadata=ADMIN)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # new rows: one caller only
            await stub.CreateRewardType(fresh, metadata=SECOND_ADMIN)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    conn = await asyncpg.connect(url)
    try:
        callers = dict(await conn.fetch("SELECT request_id, caller FROM idempotency_keys"))
        assert callers == {"rt-1": "", "rt-2": "test-admin"}
    finally:
        await conn.close()


# --- 0018 / 0019 / 0021: bonus work in flight -------------------------------------------------


async def test_bonus_request_pending_before_0019_is_computed_by_the_new_worker(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """Under 0018: a definition without variables, a request pending in its window (no
    period_revision) with its bonus.batch outbox job, an automation rule without a
    qualification currency. After the upgrade the worker's handler computes the request over
    the window it stored, and the definition and rule read as before."""
    url = await database_at(17)
    d = BonusDefinition(
        definition_id="d-old", display_name="Old", formula="sum(deposit.amount) * 10%",
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=ApprovalMode.AUTOMATIC, batch_window_seconds=None)
    checked, compiled = validate_definition(d)
    window_end = NOW + timedelta(minutes=5)
    conn = await asyncpg.connect(url)
    try:
        pk = await conn.fetchval(
            """INSERT INTO bonus_definitions
                   (definition_id, display_name, formula_source, formula_stored, result_type,
                    points_target, min_allowed, cap_amount, rounding, decimals,
                    rounding_factor, data_mode, period, approval_mode, batch_window_seconds,
                    skipped_message, calculated_message, issued_message, create_time,
                    update_time)
               VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb,
                       $14, $15, $16, $17, $18, $19, $19) RETURNING id""",
            "d-old", *_definition_values(checked, compiled)[:-1], NOW - timedelta(days=3))
        await conn.execute("INSERT INTO customers (customer_id, time_zone, currency) "
                           "VALUES ('b1', 'UTC', 'EUR'), ('b2', NULL, NULL)")
        await conn.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency,
                                   occurred_at)
               VALUES ('d1', 'b1', 'deposit', 100, 'EUR', $1),
                      ('d0', 'b1', 'deposit', 1000, 'EUR', $2)""",
            NOW - timedelta(hours=1), NOW - timedelta(days=2))  # the second: outside the window
        await conn.execute(
            """INSERT INTO bonus_batches (definition_pk, window_start, window_end)
               VALUES ($1, $2, $3)""", pk, NOW, window_end)
        await conn.execute(
            """INSERT INTO bonus_requests (definition_pk, request_key, customer_id, window_start,
                                           request_time, period_start, period_end, source)
               VALUES ($1, 'k1', 'b1', $2, $2, $3, $2, 'api'),
                      ($1, 'k2', 'b2', $2, $2, $3, $2, 'api')""",
            pk, NOW, NOW - timedelta(days=1))
        job_id = await conn.fetchval(
            """INSERT INTO outbox_jobs (kind, payload, due_at, dedup_key, max_attempts)
               VALUES ('bonus.batch', $1::text::jsonb, $2, $3, 1000) RETURNING id""",
            json.dumps({"definition": pk, "window_start": NOW.isoformat(),
                        "window_end": window_end.isoformat()}),
            window_end, f"bonus-batch:{pk}:{NOW.isoformat()}")
        await conn.execute(
            """INSERT INTO bonus_rules (rule_id, definition_pk, event_kind, every_n,
                                        qualification_kind, qualification_min, period_mode,
                                        create_time)
               VALUES ('rule-old', $1, 'bet', 3, 'deposit', 100, 'DEFINITION', $2)""",
            pk, NOW - timedelta(days=3))
    finally:
        await conn.close()

    await upgrade(url, 17)

    settings = settings_for(url, services, queue_name)
    pool = await create_pool(url, min_size=1, max_size=5)
    try:
        ctx: dict[str, Any] = {"pool": pool, "clock": FixedClock(window_end),
                               "settings": settings, "redis": None}
        assert await run_outbox_job(ctx, job_id) == "done"
        async with pool.acquire() as conn:
            results = {r["customer_id"]: (r["status"], r["amount"]) for r in await conn.fetch(
                "SELECT customer_id, status, amount FROM bonus_results")}
            assert results["b1"] == ("ISSUED", Decimal(10))
            assert set(results) == {"b1", "b2"}
            assert await conn.fetchval(
                "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 0
            assert await conn.fetchval("SELECT count(*) FROM bonus_ledger") == 1
            row = await bonuses_repo.get_definition(conn, "d-old")
            assert row.definition.variables == () and row.definition.revision == 1
            rule = await triggers_repo.get_rule(conn, "rule-old")
            assert rule.rule.qualification is not None
            assert rule.rule.qualification.currency is None
            assert rule.rule.qualification.min_amount == Decimal(100)
    finally:
        await pool.close()


# --- campaigns: an execution due across the upgrade -------------------------------------------


async def test_campaign_execution_queued_under_0005_runs_after_the_upgrade(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    """A conditional campaign awaiting clearance under 0005, its approvals recorded and its
    campaign.execute outbox job pending: after the upgrade the new worker executes it with the
    old approvals, and GetReward honours them."""
    url = await database_at(5)
    execute_at = NOW - timedelta(minutes=1)
    conn = await asyncpg.connect(url)
    try:
        await add_reward_type(conn, "cash")
        promotion = await add_old_promotion(conn, "CAMP-PROMO",
                                            rewards=[reward("cash", "SINGLE", "3")])
        campaign = await conn.fetchval(
            """INSERT INTO campaigns (campaign_id, name, execute_at, conditional, status,
                                      target_count, notified_at)
               VALUES ('autumn', 'Autumn', $1, true, 'AWAITING_CLEARANCE', 3, $2)
               RETURNING id""", execute_at, execute_at - timedelta(minutes=30))
        await conn.execute("INSERT INTO campaign_promotions VALUES ($1, $2, 0)", campaign,
                           promotion)
        await conn.execute(
            """INSERT INTO campaign_targets (campaign_id, customer_id, approved, status_time)
               VALUES ($1, 't1', true, $2), ($1, 't2', false, $2), ($1, 't3', NULL, NULL)""",
            campaign, execute_at - timedelta(minutes=5))
        job_id = await conn.fetchval(
            """INSERT INTO outbox_jobs (kind, payload, due_at, dedup_key)
               VALUES ('campaign.execute', $1::text::jsonb, $2, $3) RETURNING id""",
            json.dumps({"campaign": campaign}), execute_at, f"campaign:{campaign}:execute")
    finally:
        await conn.close()

    await upgrade(url, 5)

    settings = settings_for(url, services, queue_name)
    pool = await create_pool(url, min_size=1, max_size=5)
    try:
        ctx: dict[str, Any] = {"pool": pool, "clock": FixedClock(NOW), "settings": settings,
                               "redis": None}
        outcome = await run_outbox_job(ctx, job_id)
        async with pool.acquire() as conn:
            error = await conn.fetchval("SELECT last_error FROM outbox_jobs WHERE id = $1",
                                        job_id)
            assert outcome == "done", error
            row = await conn.fetchrow(
                "SELECT status, approved_count, rejected_count FROM campaigns")
            assert tuple(row) == ("EXECUTED", 1, 2)
    finally:
        await pool.close()
    async with api_on(url, services, queue_name, FixedClock(NOW)) as channel:
        rewards = pb_grpc.RewardServiceStub(channel)
        answers = {c: await rewards.GetReward(pb.GetRewardRequest(
            promotion_code="CAMP-PROMO", customer_id=c, campaign_id="autumn",
            request_id=f"camp-{c}"), metadata=RUNTIME) for c in ("t1", "t2", "t3")}
    assert answers["t1"].grant.campaign_id == "autumn"
    assert answers["t2"].denial_reason == pb.DENIAL_REASON_NOT_ELIGIBLE
    assert answers["t3"].denial_reason == pb.DENIAL_REASON_NOT_ELIGIBLE


# --- 0006 / 0027: webhook deliveries in flight ------------------------------------------------


async def _pending_delivery_from_0005(url: str, secret: str, listener_url: str) -> int:
    """A listener registered under 0005 (no channel columns) and an event emitted to it, its
    delivery pending with its outbox job (the emit SQL only uses 0004's columns)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO webhook_listeners (event_type, url, secret, description)
               VALUES ($1, $2, $3, $4)""",
            int(EventType.SCHEDULED_CAMPAIGN), listener_url, secret, "x" * 1000)
    finally:
        await conn.close()
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            emitted = await webhooks_repo.emit_event(
                conn, event_type=EventType.SCHEDULED_CAMPAIGN, now=datetime.now(UTC),
                payload={"campaign_id": "spring", "name": "Spring"}, dedup_key="old:1")
    finally:
        await pool.close()
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids
    return job_id


async def _deliver(url: str, services: Services, queue_name: str, job_id: int) -> str:
    settings = settings_for(url, services, queue_name)
    pool = await create_pool(url, min_size=1, max_size=5)
    ctx: dict[str, Any] = {"pool": pool, "clock": SystemClock(), "settings": settings,
                           "redis": None}
    try:
        await webhooks.setup(ctx)
        try:
            return await run_outbox_job(ctx, job_id)
        finally:
            await webhooks.teardown(ctx)
    finally:
        await pool.close()


async def test_webhook_delivery_pending_before_0006_is_delivered_after_the_upgrade(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    url = await database_at(5)
    listener = await WebhookListener().start()
    try:
        job_id = await _pending_delivery_from_0005(url, listener.secrets[0], listener.url)
        await upgrade(url, 5)
        assert await _deliver(url, services, queue_name, job_id) == "done"
        [received] = listener.received
        assert received.verify_error is None
    finally:
        await listener.stop()
    conn = await asyncpg.connect(url)
    try:
        delivery = await conn.fetchrow("SELECT status, attempts FROM webhook_deliveries")
        assert (delivery["status"], delivery["attempts"]) == ("DELIVERED", 1)
        listener_row = await webhooks_repo.get_listener(conn, 1)
        assert listener_row.channel.value == "WEBHOOK" and listener_row.email_recipients == ()
        assert await conn.fetchval("SELECT withdrawn FROM webhook_events") is None
    finally:
        await conn.close()


async def test_clear_secret_starting_with_enc_stored_before_encryption_still_signs(
        database_at: Callable[[int], Awaitable[str]], services: Services,
        queue_name: str) -> None:
    url = await database_at(5)
    secret = "enc:legacy-clear-secret-01"
    listener = await WebhookListener(secrets=[secret]).start()
    try:
        job_id = await _pending_delivery_from_0005(url, secret, listener.url)
        await upgrade(url, 5)
        outcome = await _deliver(url, services, queue_name, job_id)
        assert outcome == "done"
        assert [r.verify_error for r in listener.received] == [None]
    finally:
        await listener.stop()


async def test_announcement_of_a_campaign_cancelled_before_0027_stays_withdrawn(
        database_at: Callable[[int], Awaitable[str]]) -> None:
    url = await database_at(26)
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            campaign = await conn.fetchval(
                """INSERT INTO campaigns (campaign_id, name, execute_at, conditional, status,
                                          target_count)
                   VALUES ('spring', 'Spring', $1, true, 'AWAITING_CLEARANCE', 1)
                   RETURNING id""", NOW + timedelta(minutes=30))
            await conn.execute(
                """INSERT INTO webhook_listeners (event_type, url, secret)
                   VALUES ($1, 'https://compliance.example/hooks', 'listener-secret-0123456789')""",
                int(EventType.SCHEDULED_CAMPAIGN))
            emitted = await webhooks_repo.emit_event(
                conn, event_type=EventType.SCHEDULED_CAMPAIGN, now=NOW,
                payload={"campaign_id": "spring", "name": "Spring"},
                dedup_key=clearance_dedup_key(campaign))
            assert emitted is not None
        async with pool.acquire() as conn, conn.transaction():  # CancelCampaign before 0027
            await conn.execute("UPDATE campaigns SET status = 'CANCELLED', cancelled_at = $2 "
                               "WHERE id = $1", campaign, NOW + timedelta(minutes=1))
            await conn.execute(
                """UPDATE webhook_deliveries d
                      SET status = 'CANCELLED', update_time = $2,
                          last_error = coalesce(d.last_error || ' / ', '') || $3
                     FROM webhook_events e
                    WHERE e.dedup_key = $1 AND d.event_id = e.id AND d.status = 'PENDING'""",
                clearance_dedup_key(campaign), NOW + timedelta(minutes=1), "campaign cancelled")
    finally:
        await pool.close()

    await upgrade(url, 26)

    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            delivery = await conn.fetchval("SELECT id FROM webhook_deliveries")
            with pytest.raises(FailedPrecondition) as refused:
                await webhooks_repo.redeliver(conn, delivery, now=NOW + timedelta(hours=1))
            assert refused.value.reason == "EVENT_WITHDRAWN"
    finally:
        await pool.close()


# --- 0024 / 0027: locks and duration on big tables --------------------------------------------


async def test_big_tables_upgrade_from_0021_without_rewrite_and_with_short_stalls(
        database_at: Callable[[int], Awaitable[str]]) -> None:
    """From 0021 with 200,000 idempotency rows and 200,000 finished outbox jobs: 0022 adds
    idempotency_keys.caller NOT NULL DEFAULT '' (a constant default: no table rewrite, the old
    rows read ''), and 0024 builds outbox_jobs_dead without CONCURRENTLY (inside migrate's
    transaction it could not be): a SHARE lock on outbox_jobs for the whole build, blocking
    every insert of an outbox job meanwhile. Measured here: the whole upgrade takes tens of
    milliseconds and so does the longest outbox insert stall; both grow with the tables."""
    url = await database_at(21)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO outbox_jobs (kind, payload, status, attempts, finished_at, dedup_key)
               SELECT CASE WHEN g % 3 = 0 THEN 'bonus.batch' ELSE 'webhook.deliver' END,
                      jsonb_build_object('delivery_id', g),
                      CASE WHEN g % 4000 = 0 THEN 'dead' ELSE 'done' END, 1, now(), 'k' || g
                 FROM generate_series(1, 200000) AS g""")
        await conn.execute(
            """INSERT INTO idempotency_keys (scope, request_id, request_hash, response)
               SELECT 'GetReward', 'req-' || g, sha256(g::text::bytea), decode('0a00', 'hex')
                 FROM generate_series(1, 200000) AS g""")
        await conn.execute("ANALYZE outbox_jobs")
        await conn.execute("ANALYZE idempotency_keys")
        files = dict(await conn.fetch(
            """SELECT relname, relfilenode FROM pg_class
                WHERE relname IN ('outbox_jobs', 'idempotency_keys')"""))
    finally:
        await conn.close()

    probe = await asyncpg.connect(url)
    stalls: list[float] = []
    began = time.perf_counter()
    migrating = asyncio.create_task(migrate_dsn(url))
    try:
        while not migrating.done():
            sent = time.perf_counter()
            await probe.execute("INSERT INTO outbox_jobs (kind) VALUES ('probe')")
            stalls.append(time.perf_counter() - sent)
        assert await migrating == [m.version for m in load_migrations() if m.version > 21]
        took = time.perf_counter() - began
        valid = await probe.fetchval(
            """SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE c.relname = 'outbox_jobs_dead'""")
        assert valid is True
        assert await probe.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE status = 'dead'") == 50
        assert await probe.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE caller = ''") == 200000
        assert dict(await probe.fetch(
            """SELECT relname, relfilenode FROM pg_class
                WHERE relname IN ('outbox_jobs', 'idempotency_keys')""")) == files  # no rewrite
    finally:
        if not migrating.done():
            migrating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await migrating
        await probe.close()
    longest = max(stalls, default=0.0)
    print(f"0022..0027 over 200k idempotency rows and 200k outbox rows: {took * 1000:.0f} ms, "
          f"{len(stalls)} probe inserts, longest {longest * 1000:.1f} ms")
    assert took < 30.0


@pytest.mark.parametrize(("version", "holder_sql", "probe_sql"), [
    (24, "INSERT INTO outbox_jobs (kind) VALUES ('long-batch')",
     "INSERT INTO outbox_jobs (kind) VALUES ('probe')"),
    (27, "SELECT count(*) FROM webhook_events",
     "SELECT count(*) FROM webhook_events"),
], ids=["0024-outbox-writes", "0027-event-reads"])
async def test_a_migration_waiting_for_its_lock_does_not_stall_the_service(
        database_at: Callable[[int], Awaitable[str]], version: int, holder_sql: str,
        probe_sql: str) -> None:
    url = await database_at(version - 1)
    holder = await asyncpg.connect(url)
    probe = await asyncpg.connect(url)
    holding = holder.transaction()
    await holding.start()
    migrating: asyncio.Task[list[int]] | None = None
    try:
        await holder.execute(holder_sql)  # a long transaction (a batch, a report) is running
        migrating = asyncio.create_task(migrate_dsn(url))
        deadline = time.monotonic() + 10
        while not await probe.fetchval(
                """SELECT count(*) > 0 FROM pg_stat_activity
                    WHERE application_name = $1 AND datname = current_database()
                      AND wait_event_type = 'Lock'""", APPLICATION_NAME):
            assert time.monotonic() < deadline, "the migration never waited for its lock"
            await asyncio.sleep(0.02)
        await probe.execute("SET lock_timeout = '2500ms'")
        await probe.execute(probe_sql)  # the service's own traffic on that table
    finally:
        await holding.rollback()
        if migrating is not None:
            applied = await asyncio.wait_for(migrating, 30)
            assert applied[0] == version
        await holder.close()
        await probe.close()


async def test_a_migration_that_never_gets_its_lock_gives_up_with_a_clear_error(
        database_at: Callable[[int], Awaitable[str]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A transaction holds webhook_events for longer than the migration is willing to try
    (LOCK_RETRY_SECONDS, 2 s here): migrate fails with MigrationError naming the file and what
    to do, having logged each retry; nothing of 0027 is applied, and the next run, once the
    transaction is gone, applies it."""
    from storage import migrate as migrate_module
    monkeypatch.setattr(migrate_module, "LOCK_RETRY_SECONDS", 2.0)
    url = await database_at(26)
    holder = await asyncpg.connect(url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT count(*) FROM webhook_events")
            with caplog.at_level("WARNING", logger="promo.migrate"), \
                    pytest.raises(migrate_module.MigrationError) as caught:
                await migrate_dsn(url)
        assert "0027_withdrawn_events.sql could not take its table locks for 2 s" \
            in str(caught.value)
        assert "waits for a lock a long transaction holds" in caplog.text
        assert await holder.fetchval(
            "SELECT max(version) FROM schema_migrations") == 26
    finally:
        await holder.close()
    assert (await migrate_dsn(url))[0] == 27
