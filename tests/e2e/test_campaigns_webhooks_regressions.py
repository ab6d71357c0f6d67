"""Regressions of conditional execution, webhook delivery, listeners and ingestion: listener
secrets that must stay usable (no clear "enc:..." secret, a new secret after a lost key signs at
once), idempotent CreateCampaign retries after the execution time, concurrent approvals that
never deadlock, text the database cannot store refused as INVALID_ARGUMENT (a campaign id to
look up: NOT_FOUND), campaign reconciliation per reward type, the approval/execution lock
order, and docs/webhooks.md kept in step with the code.

Real server, real PostgreSQL and Redis, a real HTTP listener on loopback; clocks are pinned and
moved, deliveries are driven through the outbox runner (``run_outbox_job``) as the arq worker
would, so nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from config.settings import Settings
from core.clock import FixedClock
from core.webhook_signature import HEADER_SIGNATURE
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import customers_pb2 as cust_pb
from promo.v1 import customers_pb2_grpc as cust_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from server.errors import error_info_of
from storage import campaigns as campaigns_repo
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import all_customers, set_statuses, ts
from tests.e2e.promo_helpers import get_reward, promotion, revoke, reward_type, single
from tests.e2e.test_cli import Cli
from tests.e2e.test_listener_secrets import (
    METADATA,
    NEW,
    NEW_ID,
    ROTATED_SECRET,
    deliver_due,
    emit,
    keyed,
    register,
    serving,
)
from tests.webhook_listener import SECRET, WebhookListener
from workers import campaigns as _campaigns  # noqa: F401  registers the campaign jobs
from workers.outbox import run_outbox_job

ROOT = Path(__file__).resolve().parents[2]


def _failure(exc: grpc.RpcError) -> tuple[str, str | None, str | None]:
    """(status code, ErrorInfo reason, ErrorInfo "field") of a failed call."""
    info = error_info_of(exc)
    return (exc.code().name, info.reason if info else None,
            info.metadata.get("field") if info else None)


async def _campaign_setup(api: Api, clock: FixedClock, customers: list[str]) -> None:
    await reward_type(api)
    await promotion(api)
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    await stub.CreateCampaign(cpb.CreateCampaignRequest(
        request_id="create-spring", customer_ids=customers, campaign=cpb.Campaign(
            campaign_id="spring", name="Spring", execute_at=ts(clock.now() + timedelta(hours=2)),
            conditional_execution=True, promotion_codes=["VIP25"])), metadata=api.key())


# --- Listener secrets -------------------------------------------------------------------------

async def test_a_secret_that_starts_with_enc_is_refused(
        api: Api, pool: asyncpg.Pool, listener: WebhookListener) -> None:
    """A caller-chosen secret starting with "enc:" is INVALID_SECRET at registration and at
    rotation, with a message that says why. Without PROMO_SECRET_ENCRYPTION_KEYS (the default
    for `serve`) a secret is stored in clear, and "enc:" is the prefix of a sealed secret: the
    worker would take it for one, never open it, and every delivery would end DEAD."""
    secret = "enc:my-listener-secret-0123"
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as refused:
        await stub.RegisterListener(lpb.RegisterListenerRequest(
            request_id="enc", listener=lpb.Listener(
                event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=listener.url, secret=secret)),
            metadata=api.key())
    assert _failure(refused.value) == ("INVALID_ARGUMENT", "INVALID_SECRET", "listener.secret")
    assert refused.value.details() == (
        "listener.secret must not start with 'enc:': that prefix marks an encrypted stored "
        "secret, so the worker could never sign with it")
    created = await stub.RegisterListener(lpb.RegisterListenerRequest(
        request_id="plain", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=listener.url, secret=SECRET)),
        metadata=api.key())
    with pytest.raises(grpc.RpcError) as rotated:
        await stub.UpdateListener(lpb.UpdateListenerRequest(
            request_id="enc-rotation", listener=lpb.Listener(
                listener_id=created.listener.listener_id, secret=secret),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    assert _failure(rotated.value) == ("INVALID_ARGUMENT", "INVALID_SECRET", "listener.secret")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_listeners") == 1
        assert await conn.fetchval("SELECT secret FROM webhook_listeners") == SECRET


# --- Campaigns: idempotent retries ------------------------------------------------------------

async def test_create_campaign_retried_after_its_execution_time_replays_the_first_answer(
        api: Api, clock: FixedClock) -> None:
    """A retry with the same request_id and payload returns the first answer, even after
    execute_at has passed (a client that lost the answer of a campaign due in a minute):
    EXECUTION_IN_PAST is checked only when the request runs for the first time. A new request
    for the same past time is still refused."""
    await reward_type(api)
    await promotion(api)
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    request = cpb.CreateCampaignRequest(
        request_id="create-soon", customer_ids=["c1", "c2"], campaign=cpb.Campaign(
            campaign_id="soon", name="Soon", execute_at=ts(clock.now() + timedelta(seconds=30)),
            conditional_execution=True, promotion_codes=["VIP25"]))
    first = await stub.CreateCampaign(request, metadata=api.key())
    clock.advance(timedelta(minutes=1))
    again = await stub.CreateCampaign(request, metadata=api.key())
    assert again == first
    assert again.campaign.campaign_id == "soon"
    late = cpb.CreateCampaignRequest()
    late.CopyFrom(request)
    late.request_id, late.campaign.campaign_id = "create-late", "late"
    with pytest.raises(grpc.RpcError) as refused:
        await stub.CreateCampaign(late, metadata=api.key())
    assert _failure(refused.value) == ("INVALID_ARGUMENT", "EXECUTION_IN_PAST", "execute_at")


# --- Approvals under concurrency --------------------------------------------------------------

async def test_concurrent_overlapping_approvals_in_opposite_orders_all_succeed(
        api: Api, clock: FixedClock) -> None:
    """UpdateCustomerPromotionStatus may be called any number of times, also at once (several
    compliance workers): calls over the same customers listed in opposite orders all succeed,
    because storage.campaigns.set_statuses locks the target rows in customer id order whatever
    the caller's order (in the caller's order, PostgreSQL would abort one as a deadlock and
    its approvals would be lost with INTERNAL)."""
    customers = [f"c{i:05d}" for i in range(3000)]
    await _campaign_setup(api, clock, customers)
    forward = dict.fromkeys(customers, True)
    backward = dict.fromkeys(reversed(customers), True)
    errors: list[str] = []

    async def call(statuses: dict[str, bool], request_id: str) -> None:
        try:
            await set_statuses(api, "spring", statuses, request_id)
        except grpc.RpcError as exc:
            errors.append(f"{request_id}: {exc.code().name} {exc.details()}")

    for round_ in range(3):
        await asyncio.gather(call(forward, f"r{round_}-forward"),
                             call(backward, f"r{round_}-backward"))
    assert errors == []
    listed = await all_customers(api, "spring", page_size=10_000)
    assert [c.customer_id for c in listed] == customers
    assert all(c.HasField("approved") and c.approved for c in listed)


# --- Bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["c\x00x", "c\nx"], ids=["nul", "line-break"])
async def test_campaign_customer_ids_follow_the_customers_api_rules(
        api: Api, clock: FixedClock, pool: asyncpg.Pool, bad_id: str) -> None:
    """Campaign customer ids follow the customers API's id rules (core.customers: 1-128
    characters, no control characters), so every target can match a customer. A NUL or a
    line break in one is INVALID_ARGUMENT / INVALID_CUSTOMER_ID naming the entry, in
    CreateCampaign, AddCampaignTargets and UpdateCustomerPromotionStatus alike, and nothing is
    written (a NUL would otherwise reach PostgreSQL, which cannot store it: INTERNAL)."""
    await _campaign_setup(api, clock, ["c1"])
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    calls = {
        "create": stub.CreateCampaign(cpb.CreateCampaignRequest(
            request_id="create-bad", customer_ids=["ok", bad_id], campaign=cpb.Campaign(
                campaign_id="autumn", name="Autumn",
                execute_at=ts(clock.now() + timedelta(hours=2)), conditional_execution=True,
                promotion_codes=["VIP25"])), metadata=api.key()),
        "add": stub.AddCampaignTargets(cpb.AddCampaignTargetsRequest(
            request_id="add-bad", campaign_id="spring", customer_ids=["ok", bad_id]),
            metadata=api.key()),
        "approve": set_statuses(api, "spring", {"c1": True, bad_id: True}, "approve-bad"),
    }
    seen: dict[str, object] = {}
    for name, call in calls.items():
        try:
            await call
            seen[name] = "OK"
        except grpc.RpcError as exc:
            seen[name] = (*_failure(exc), exc.details())
    message = "customer_id must not contain control characters"
    assert seen == {
        "create": ("INVALID_ARGUMENT", "INVALID_CUSTOMER_ID", "customer_ids[1]",
                   f"customer_ids[1]: {message}"),
        "add": ("INVALID_ARGUMENT", "INVALID_CUSTOMER_ID", "customer_ids[1]",
                f"customer_ids[1]: {message}"),
        "approve": ("INVALID_ARGUMENT", "INVALID_CUSTOMER_ID", "statuses[1]",
                    f"statuses[1]: {message}")}
    async with pool.acquire() as conn:  # and nothing changed
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == 1
        assert await conn.fetchval("SELECT count(*) FROM campaign_targets") == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM campaign_targets WHERE approved IS NOT NULL") == 0


async def test_nul_in_a_campaign_name_or_a_listener_description_is_invalid_argument(
        api: Api, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """Free text the database cannot store (a NUL character; PostgreSQL text cannot hold it)
    is refused by the shared check (core.text) with the field's usual reason: a campaign name
    is INVALID_NAME, a listener description INVALID_DESCRIPTION, never INTERNAL. A promotion
    code no promotion can have is INVALID_PROMOTION_CODE naming the entry."""
    await reward_type(api)
    await promotion(api)
    seen: dict[str, object] = {}
    for name, campaign_name, codes in (("name", "Spring\x00sale", ["VIP25"]),
                                       ("code", "Spring", ["VIP25", "VIP\x0025"])):
        try:
            await cpb_grpc.CampaignServiceStub(api.channel).CreateCampaign(
                cpb.CreateCampaignRequest(request_id=f"nul-{name}", campaign=cpb.Campaign(
                    campaign_id="nul", name=campaign_name,
                    execute_at=ts(clock.now() + timedelta(hours=2)), promotion_codes=codes)),
                metadata=api.key())
            seen[name] = "OK"
        except grpc.RpcError as exc:
            seen[name] = _failure(exc)
    try:
        await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(
            lpb.RegisterListenerRequest(request_id="nul-description", listener=lpb.Listener(
                event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url="https://hooks.example.com/x",
                description="compliance\x00team")), metadata=api.key())
        seen["description"] = "OK"
    except grpc.RpcError as exc:
        seen["description"] = (*_failure(exc), exc.details())
    assert seen == {
        "name": ("INVALID_ARGUMENT", "INVALID_NAME", "name"),
        "code": ("INVALID_ARGUMENT", "INVALID_PROMOTION_CODE", "promotion_codes[1]"),
        "description": ("INVALID_ARGUMENT", "INVALID_DESCRIPTION", "listener.description",
                        "listener.description must not contain the NUL character (U+0000): "
                        "it cannot be stored")}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == 0
        assert await conn.fetchval("SELECT count(*) FROM webhook_listeners") == 0


async def test_a_campaign_id_no_campaign_can_have_is_not_found(
        api: Api, clock: FixedClock) -> None:
    """Looking up a campaign by an id no campaign can have (here with a NUL character, which
    PostgreSQL cannot even take as a parameter) is NOT_FOUND / CAMPAIGN_NOT_FOUND, as for any
    unknown id, in every campaign and clearance call, never INTERNAL."""
    await _campaign_setup(api, clock, ["c1"])
    bad = "spring\x00"
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    clearance = cpb_grpc.ClearanceServiceStub(api.channel)
    calls = {
        "get": stub.GetCampaign(cpb.GetCampaignRequest(campaign_id=bad), metadata=api.key()),
        "add": stub.AddCampaignTargets(cpb.AddCampaignTargetsRequest(
            request_id="add-nul", campaign_id=bad, customer_ids=["c2"]), metadata=api.key()),
        "cancel": stub.CancelCampaign(cpb.CancelCampaignRequest(
            request_id="cancel-nul", campaign_id=bad), metadata=api.key()),
        "reconciliation": stub.GetCampaignReconciliation(
            cpb.GetCampaignReconciliationRequest(campaign_id=bad), metadata=api.key()),
        "approve": set_statuses(api, bad, {"c1": True}, "approve-nul"),
        "targets": clearance.GetProcessedCampaignCustomers(
            cpb.GetProcessedCampaignCustomersRequest(campaign_id=bad),
            metadata=api.key("listener")),
    }
    seen: dict[str, object] = {}
    for name, call in calls.items():
        try:
            await call
            seen[name] = "OK"
        except grpc.RpcError as exc:
            seen[name] = (exc.code().name, rpc_error_reason(exc), exc.details())
    expected = ("NOT_FOUND", "CAMPAIGN_NOT_FOUND", "no campaign 'spring\\x00'")
    assert seen == dict.fromkeys(calls, expected)


async def test_nul_in_event_attributes_or_customer_properties_is_invalid_argument(
        api: Api, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """A customer property value or an event attribute value with a NUL character (written as
    the JSON escape \\u0000, which jsonb refuses) makes the batch INVALID_ARGUMENT
    (INVALID_CUSTOMERS / INVALID_EVENTS) with the item's position and the property or
    attribute named, like any other problem of the batch; nothing is written."""
    stub = cust_grpc.CustomerServiceStub(api.channel)
    seen: dict[str, object] = {}
    try:
        await stub.UpsertCustomers(cust_pb.UpsertCustomersRequest(
            request_id="nul-property", customers=[cust_pb.Customer(
                customer_id="c1", properties={
                    "tier": cust_pb.PropertyValue(string_value="gold\x00")})]),
            metadata=api.key("runtime"))
        seen["property"] = "OK"
    except grpc.RpcError as exc:
        seen["property"] = (*_failure(exc), exc.details())
    try:
        await stub.RecordEvents(cust_pb.RecordEventsRequest(
            request_id="nul-attribute", create_missing_customers=True, events=[cust_pb.Event(
                external_id="e1", customer_id="c2", kind="bet", amount="10", currency="EUR",
                occurred_at=ts(clock.now()), attributes={"game": "slots\x00"})]),
            metadata=api.key("runtime"))
        seen["attribute"] = "OK"
    except grpc.RpcError as exc:
        seen["attribute"] = (*_failure(exc), exc.details())
    assert seen == {
        "property": ("INVALID_ARGUMENT", "INVALID_CUSTOMERS", "customers",
                     "1 problem in customers, nothing was written: customers[0]: property "
                     "'tier' must not contain the NUL character (U+0000): it cannot be stored"),
        "attribute": ("INVALID_ARGUMENT", "INVALID_EVENTS", "events",
                      "1 problem in events, nothing was written: events[0]: attribute 'game' "
                      "must not contain the NUL character (U+0000): it cannot be stored")}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0


# --- Reconciliation ---------------------------------------------------------------------------

async def run_due_jobs(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    """Every due outbox job, once, through the runner (as the arq worker would)."""
    async with pool.acquire() as conn:
        job_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1 ORDER BY id",
            clock.now())]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    return [await run_outbox_job(ctx, job_id) for job_id in job_ids]


async def test_campaign_reconciliation_reports_amounts_per_reward_type(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        tmp_path: Path) -> None:
    """A promotion may grant several reward types at once (15 cashback and 10 free spins).
    GetCampaignReconciliation reports the live grants' value per reward type (``amounts``,
    sorted by type), never money and spins added together (caps count them apart too); the
    deprecated single ``net_amount`` is empty then, and set only for a single reward type.
    A revoked grant leaves its types listed at 0. `promo campaigns reconciliation` shows the
    amounts per type."""
    await reward_type(api)
    await reward_type(api, "free_spins", category=2)
    await promotion(api, rewards=[single("cashback", "15"), single("free_spins", "10")])
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    execute_at = clock.now() + timedelta(hours=1)
    await stub.CreateCampaign(cpb.CreateCampaignRequest(
        request_id="create-mixed", customer_ids=["c1", "c2"], campaign=cpb.Campaign(
            campaign_id="mixed", name="Mixed", execute_at=ts(execute_at),
            conditional_execution=False, promotion_codes=["VIP25"])), metadata=api.key())
    clock.set(execute_at)
    assert await run_due_jobs(pool, settings, clock) == ["done"]
    granted = await get_reward(api, "c1", campaign_id="mixed")
    assert sorted((r.reward_type, r.value) for r in granted.grant.rewards) == [
        ("cashback", "15"), ("free_spins", "10")]
    report = await stub.GetCampaignReconciliation(
        cpb.GetCampaignReconciliationRequest(campaign_id="mixed"), metadata=api.key())
    [row] = report.promotions
    assert (row.promotion_code, row.approved, row.granted, row.revoked) == ("VIP25", 2, 1, 0)
    assert [(a.reward_type, a.amount) for a in row.amounts] == [
        ("cashback", "15"), ("free_spins", "10")]
    assert row.net_amount == ""
    cli = Cli(api, tmp_path)
    table = await cli.ok("campaigns", "reconciliation", "mixed")
    assert "live amounts" in table and "cashback 15, free_spins 10" in table
    as_json = await cli.json("campaigns", "reconciliation", "mixed")
    assert as_json["promotions"][0]["amounts"] == [
        {"reward_type": "cashback", "amount": "15"},
        {"reward_type": "free_spins", "amount": "10"}]
    await revoke(api, granted.grant.grant_id)
    report = await stub.GetCampaignReconciliation(
        cpb.GetCampaignReconciliationRequest(campaign_id="mixed"), metadata=api.key())
    [row] = report.promotions
    assert (row.granted, row.revoked, row.net_amount) == (1, 1, "")
    assert [(a.reward_type, a.amount) for a in row.amounts] == [
        ("cashback", "0"), ("free_spins", "0")]


async def test_campaign_reconciliation_of_one_reward_type_keeps_net_amount(
        api: Api, clock: FixedClock) -> None:
    """With a single reward type the deprecated net_amount still carries the live value, equal
    to the one entry of ``amounts`` ("0" before any grant)."""
    await _campaign_setup(api, clock, ["c1"])
    report = await cpb_grpc.CampaignServiceStub(api.channel).GetCampaignReconciliation(
        cpb.GetCampaignReconciliationRequest(campaign_id="spring"), metadata=api.key())
    [row] = report.promotions
    assert (row.granted, row.net_amount) == (0, "0")
    assert [(a.reward_type, a.amount) for a in row.amounts] == [("cashback", "0")]


# --- Documentation ----------------------------------------------------------------------------

def test_webhooks_doc_matches_what_the_code_does_today() -> None:
    """docs/webhooks.md describes the retention purge (storage/retention.py deletes old
    events, deliveries and attempts under PROMO_WEBHOOK_*_RETENTION_DAYS; docs/operations.md
    "Retention") and says every event type is emitted (code pools emit 101-103, dynamic
    bonuses 110-112), not the stale "nothing is purged" / "reserved" claims."""
    doc = " ".join((ROOT / "docs" / "webhooks.md").read_text().split())
    retention = (ROOT / "storage" / "retention.py").read_text()
    assert "webhook_events" in retention and "webhook_attempts" in retention
    assert "EventType.CODE_POOL_THRESHOLD" in (ROOT / "storage" / "code_pools.py").read_text()
    assert "EventType.BONUS_ISSUED" in (ROOT / "storage" / "bonuses.py").read_text()
    stale = [claim for claim in (
        "Nothing is purged yet",
        "Types 5 and 100 are emitted by the campaign workers today; the others are reserved",
    ) if claim in doc]
    assert stale == []
    for setting in ("PROMO_WEBHOOK_EVENT_RETENTION_DAYS", "PROMO_WEBHOOK_DELIVERY_RETENTION_DAYS",
                    "PROMO_WEBHOOK_ATTEMPT_RETENTION_DAYS"):
        assert setting in doc and setting in retention + (ROOT / "README.md").read_text()
    assert "Every type in the table is emitted" in doc


async def test_a_new_secret_is_the_documented_way_out_of_a_lost_key(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, listener: WebhookListener,
        caplog: pytest.LogCaptureFixture) -> None:
    """docs/webhooks.md, "Secrets at rest": after a lost key, giving the listener a new secret
    with UpdateListener gets the retries out. The next attempt is signed with the new secret
    alone, within PROMO_WEBHOOK_SECRET_GRACE_SECONDS too: only the current secret is required,
    and the unreadable previous one is left out with a warning that names the key id, never
    a secret."""
    async with serving(keyed(settings, NEW), pool, clock) as stub:
        created = await register(stub, listener.url, request_id="r1")
    await emit(pool, clock)
    no_key = keyed(settings, None)  # the key is lost: neither the server nor the worker has it
    assert await deliver_due(pool, no_key, clock) == ["pending"]
    assert listener.received == []
    async with serving(no_key, pool, clock) as stub:
        await stub.UpdateListener(lpb.UpdateListenerRequest(
            request_id="fresh-secret", listener=lpb.Listener(
                listener_id=created.listener.listener_id, secret=ROTATED_SECRET),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=METADATA)
    listener.secrets = [ROTATED_SECRET]
    async with pool.acquire() as conn:
        due = await conn.fetchval("SELECT due_at FROM outbox_jobs WHERE status = 'pending'")
    clock.set(due)
    with caplog.at_level(logging.WARNING, logger="promo.webhooks"):
        outcomes = await deliver_due(pool, no_key, clock)
    async with pool.acquire() as conn:
        delivery = await conn.fetchrow("SELECT status, last_error FROM webhook_deliveries")
    assert delivery is not None
    assert (outcomes, delivery["status"], delivery["last_error"]) == (["done"], "DELIVERED", None)
    [got] = listener.received
    assert got.verify_error is None
    assert got.headers[HEADER_SIGNATURE.lower()].count("v1=") == 1
    [warned] = [r for r in caplog.records if r.getMessage() == (
        "webhook signed without the listener's previous secret: it cannot be opened")]
    assert warned.levelno == logging.WARNING
    assert warned.__dict__["listener_id"] == created.listener.listener_id
    assert warned.__dict__["error"] == (
        f"secret sealed with key id {NEW_ID}, which is not configured "
        "(PROMO_SECRET_ENCRYPTION_KEYS is not set)")
    assert not any(secret in str(vars(r)) for r in caplog.records
                   for secret in (SECRET, ROTATED_SECRET))


async def _until_a_backend_waits_for_a_lock(pool: asyncpg.Pool) -> None:
    """Poll PostgreSQL (not the clock) until another session of this database waits on a
    lock; fail after 500 polls."""
    for _ in range(500):
        async with pool.acquire() as conn:
            if await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"):
                return
        await asyncio.sleep(0.01)
    raise AssertionError("the approval never reached the campaign row's lock")


async def test_an_approval_waiting_for_the_execution_is_refused_not_lost(
        api: Api, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """Covers the lock order the storage module promises (approvals FOR SHARE, execution FOR
    UPDATE): an approval that arrives while the execution holds the campaign row waits for it,
    then is refused with CLEARANCE_CLOSED; it never lands after the counts were taken."""
    await _campaign_setup(api, clock, ["c1", "c2"])
    await set_statuses(api, "spring", {"c1": True}, "early")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            row = await campaigns_repo.get(conn, "spring", lock="FOR UPDATE")  # as the job does
            late = asyncio.create_task(set_statuses(api, "spring", {"c2": True}, "late"))
            await _until_a_backend_waits_for_a_lock(pool)
            assert not late.done()
            counts = await campaigns_repo.execute(conn, row.id, clock.now())
        finally:
            await tx.commit()
    with pytest.raises(grpc.RpcError) as err:
        await late
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "CLEARANCE_CLOSED"
    assert counts == (1, 1)
    statuses = {c.customer_id: c.approved for c in await all_customers(api, "spring")
                if c.HasField("approved")}
    assert statuses == {"c1": True}
