"""State machines, every action from every state (DESIGN.md invariant 4: "Bad input gets a
clear error and changes nothing" -- for states: FAILED_PRECONDITION, an ErrorInfo reason, a
message naming the current state, and no row changed anywhere).

Everything runs against a real server (the ``api`` fixture) on the pinned ``clock``; time-driven
transitions are the outbox jobs the workers run (campaign.notify, campaign.execute, bonus.batch,
webhook.deliver), run here through ``workers.outbox.run_outbox_job`` when the clock makes them
due; "changes nothing" compares every row of every public table before and after (``snapshot``).

The state machines, as derived from the contract and the docs
--------------------------------------------------------------

Campaign (campaigns.proto:9-20, 37-43; core/campaigns.py:9-10; docs/webhooks.md:262-263)::

    SCHEDULED --(T - lead, campaign.notify; conditional only)--> AWAITING_CLEARANCE
    SCHEDULED | AWAITING_CLEARANCE --(T, campaign.execute)--> EXECUTED      (terminal)
    SCHEDULED | AWAITING_CLEARANCE --CancelCampaign--> CANCELLED            (terminal)
    AddCampaignTargets: only while SCHEDULED (campaigns.proto:13)        else CAMPAIGN_NOT_SCHEDULED
    UpdateCustomerPromotionStatus: while open and before T ("any number of times until
      ClearanceRequiredBy; the last status wins", campaigns.proto:29-30) else CLEARANCE_CLOSED
    CancelCampaign again / from EXECUTED                                 -> CAMPAIGN_NOT_OPEN
    GetReward with the campaign id: NOT_ELIGIBLE until EXECUTED, then only approved customers
    (the whole group without conditional execution, campaigns.proto:145).

Promotion (promotions.proto:9-22; seed 000 "lifecycle Draft / Active / Deactivated")::

    DRAFT --Activate--> ACTIVE --Deactivate--> DEACTIVATED --Activate--> ACTIVE
    UpdatePromotion: DRAFT or DEACTIVATED only (ACTIVE: PROMOTION_NOT_EDITABLE)
    anything else: INVALID_STATUS_TRANSITION; GetReward grants only while ACTIVE (NOT_ACTIVE).

Bonus result (bonuses.proto:77-83; docs/bonuses.md:104-131, 19)::

    (batch) -> SKIPPED | CALCULATED (MANUAL) | ISSUED (AUTOMATIC)
    CALCULATED --Approve--> ISSUED (ledger + BONUS_ISSUED)   CALCULATED --Reject--> REJECTED
    anything else: BONUS_NOT_AWAITING_APPROVAL (docs/bonuses.md:118)
    Recalculate: SKIPPED | CALCULATED -> SKIPPED | CALCULATED in place; ISSUED, REJECTED terminal
    Definition approval mode: MANUAL -> AUTOMATIC issues only results calculated afterwards;
    AUTOMATIC -> MANUAL: nothing is issued automatically after the switch.

Bonus rule / schedule (docs/bonuses.md:260-274): active <-> paused through Update* with mask
"active"; a paused rule does not count (counts kept), a paused schedule does not run, a resumed
schedule next runs at its first time after the resumption. A schedule on a campaign reads "the
campaign's target group at each run" (docs/bonuses.md:211).

Listener and delivery (listeners.proto:28-38, 75-88, 99-100; docs/webhooks.md:186-199)::

    listener: active <-> inactive (UpdateListener), -> unregistered (gone: NOT_FOUND after)
    delivery: PENDING -> DELIVERED | FAILED | DEAD | CANCELLED (inactive/unregistered listener
    at the attempt); RedeliverEvent: finished -> PENDING; refused while PENDING
    (DELIVERY_PENDING), listener inactive (LISTENER_INACTIVE) or unregistered
    (LISTENER_UNREGISTERED, FAILED_PRECONDITION).

Grant (rewards.proto:15-17, 112-115): GRANTED --RevokeGrant--> REVOKED (terminal; a repeat is
an idempotent revoked=false, not a refusal).

(Outbox jobs, pending -> done | dead -> RetryJob -> pending, are covered by test_jobs_api.py.)

Repeats: a retry under the same request id replays the first answer, also after later
transitions. Under a new id, lifecycle verbs refuse a repeat (CancelCampaign, Activate/
Deactivate, Approve/Reject: FAILED_PRECONDITION) while field toggles are no-ops (pausing a paused
rule or schedule, deactivating an inactive listener, adding targets already there).

Defects are ``xfail(strict=True)`` tests asserting the correct behaviour.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.promo_helpers import get_promotion, get_reward, promotion, reward_type
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers.outbox import run_outbox_job

# --- observing ----------------------------------------------------------------------------------

Snapshot = dict[str, list[str]]


async def snapshot(pool: asyncpg.Pool) -> Snapshot:
    """Every row of every table of the public schema, as sorted JSON text."""
    async with pool.acquire() as conn:
        tables = [r["relname"] for r in await conn.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                  AND NOT c.relispartition ORDER BY c.relname""")]
        shot: Snapshot = {}
        for table in tables:
            rows = await conn.fetch(f'SELECT to_jsonb(t)::text AS j FROM "{table}" t')
            shot[table] = sorted(r["j"] for r in rows)
        return shot


def diff(before: Snapshot, after: Snapshot) -> dict[str, tuple[int, int]]:
    """Tables whose rows changed: {table: (rows only before, rows only after)}."""
    out = {}
    for table in sorted(set(before) | set(after)):
        b, a = set(before.get(table, [])), set(after.get(table, []))
        if a != b:
            out[table] = (len(b - a), len(a - b))
    return out


async def refused(call: Any) -> grpc.RpcError:
    try:
        await call
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call was not refused")


def failure(exc: grpc.RpcError) -> tuple[str, str | None]:
    info = error_info_of(exc)
    return exc.code().name, info.reason if info else None


async def jobs_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
                   kinds: tuple[str, ...] = ("campaign.notify", "campaign.execute")) -> list[str]:
    """Every due outbox job of these kinds, once, through the runner (as the arq worker would)."""
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            """SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1
                 AND kind = ANY($2::text[]) ORDER BY due_at, id""", clock.now(), list(kinds))]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    return [await run_outbox_job(ctx, job_id) for job_id in ids]


async def events_of(pool: asyncpg.Pool, event_type: int) -> list[str]:
    return [r["body"] for r in await pool.fetch(
        "SELECT body FROM webhook_events WHERE event_type = $1 ORDER BY id", event_type)]


# --- campaigns ----------------------------------------------------------------------------------

CUSTOMERS = ["c1", "c2", "c3"]
LEAD = timedelta(minutes=30)  # PROMO_CLEARANCE_LEAD_SECONDS' default, which the fixture keeps


def campaigns(api: Api) -> cpb_grpc.CampaignServiceStub:
    return cpb_grpc.CampaignServiceStub(api.channel)


async def get_campaign(api: Api, campaign_id: str = "spring") -> cpb.Campaign:
    return (await campaigns(api).GetCampaign(cpb.GetCampaignRequest(campaign_id=campaign_id),
                                             metadata=api.key())).campaign


async def listen(api: Api, *event_types: int) -> None:
    """Listeners, so that events would also leave deliveries and outbox rows behind."""
    for event_type in event_types:
        await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(
            lpb.RegisterListenerRequest(request_id=f"listener-{event_type}", listener=lpb.Listener(
                event_type=event_type, url="http://127.0.0.1:9/hook",  # type: ignore[arg-type]
                secret="a-listener-secret-0123456789")), metadata=api.key())


async def campaign_in(state: str, api: Api, pool: asyncpg.Pool, settings: Settings,
                      clock: FixedClock, *, conditional: bool = True) -> cpb.Campaign:
    """A campaign "spring" (3 targets, VIP25, executing 2 h from the start) driven into
    ``state`` the way production gets there: the clearance notification and the execution are
    the outbox jobs, run when the pinned clock makes them due."""
    await reward_type(api)
    await promotion(api)
    await listen(api, lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED)
    execute_at = clock.now() + timedelta(hours=2)
    await create_campaign(api, "spring", execute_at, customers=CUSTOMERS, conditional=conditional)
    if state == "CANCELLED":
        await campaigns(api).CancelCampaign(cpb.CancelCampaignRequest(
            request_id="setup-cancel", campaign_id="spring"), metadata=api.key())
    if state in ("AWAITING_CLEARANCE", "EXECUTED"):
        clock.advance(execute_at - LEAD - clock.now())
        assert await jobs_due(pool, settings, clock) == ["done"]
        await set_statuses(api, "spring", {"c1": True, "c2": False}, "setup-statuses")
    if state == "EXECUTED":
        clock.advance(execute_at - clock.now())
        assert await jobs_due(pool, settings, clock) == ["done"]
    campaign = await get_campaign(api)
    assert cpb.CampaignStatus.Name(campaign.status) == f"CAMPAIGN_STATUS_{state}"
    return campaign


def _add_targets(api: Api, request_id: str) -> Any:
    return campaigns(api).AddCampaignTargets(cpb.AddCampaignTargetsRequest(
        request_id=request_id, campaign_id="spring", customer_ids=["c9"]), metadata=api.key())


def _cancel(api: Api, request_id: str) -> Any:
    return campaigns(api).CancelCampaign(cpb.CancelCampaignRequest(
        request_id=request_id, campaign_id="spring"), metadata=api.key())


def _approve(api: Api, request_id: str) -> Any:
    return set_statuses(api, "spring", {"c3": True}, request_id)


CAMPAIGN_ACTIONS = {"AddCampaignTargets": _add_targets, "CancelCampaign": _cancel,
                    "UpdateCustomerPromotionStatus": _approve}
# (state, action) -> None when allowed, else the ErrorInfo reason of its FAILED_PRECONDITION.
CAMPAIGN_MATRIX = {
    ("SCHEDULED", "AddCampaignTargets"): None,
    ("SCHEDULED", "CancelCampaign"): None,
    ("SCHEDULED", "UpdateCustomerPromotionStatus"): None,
    ("AWAITING_CLEARANCE", "AddCampaignTargets"): "CAMPAIGN_NOT_SCHEDULED",
    ("AWAITING_CLEARANCE", "CancelCampaign"): None,
    ("AWAITING_CLEARANCE", "UpdateCustomerPromotionStatus"): None,
    ("EXECUTED", "AddCampaignTargets"): "CAMPAIGN_NOT_SCHEDULED",
    ("EXECUTED", "CancelCampaign"): "CAMPAIGN_NOT_OPEN",
    ("EXECUTED", "UpdateCustomerPromotionStatus"): "CLEARANCE_CLOSED",
    ("CANCELLED", "AddCampaignTargets"): "CAMPAIGN_NOT_SCHEDULED",
    ("CANCELLED", "CancelCampaign"): "CAMPAIGN_NOT_OPEN",
    ("CANCELLED", "UpdateCustomerPromotionStatus"): "CLEARANCE_CLOSED",
}


@pytest.mark.parametrize(("state", "action"), list(CAMPAIGN_MATRIX),
                         ids=[f"{s}-{a}" for s, a in CAMPAIGN_MATRIX])
async def test_campaign_every_action_from_every_state(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock, state: str,
        action: str) -> None:
    """A forbidden action is FAILED_PRECONDITION with its reason, a message naming the campaign
    and its current state, and changes no row anywhere; an allowed one reads back, its retry
    replays the first answer (also after a later transition), and the same action under a new
    request id does what the contract says (adding the same targets again adds none; approving
    again is "the last status wins"; cancelling again is CAMPAIGN_NOT_OPEN)."""
    before_campaign = await campaign_in(state, api, pool, settings, clock)
    call = CAMPAIGN_ACTIONS[action]
    expected = CAMPAIGN_MATRIX[(state, action)]
    before = await snapshot(pool)
    if expected is not None:
        exc = await refused(call(api, "action-1"))
        assert failure(exc) == ("FAILED_PRECONDITION", expected)
        assert "spring" in exc.details() and state in exc.details(), exc.details()
        assert diff(before, await snapshot(pool)) == {}
        assert await get_campaign(api) == before_campaign
        return
    first = await call(api, "action-1")
    assert await call(api, "action-1") == first  # the retry replays
    after = await get_campaign(api)
    if action == "AddCampaignTargets":
        assert (first.added, first.target_count) == (1, 4)
        assert after.target_count == 4 and after.status == before_campaign.status
        again = await call(api, "action-2")
        assert (again.added, again.target_count) == (0, 4)
    elif action == "UpdateCustomerPromotionStatus":
        assert (first.updated, list(first.unknown_customer_ids)) == (1, [])
        approved = await pool.fetchval(
            "SELECT approved FROM campaign_targets WHERE customer_id = 'c3'")
        assert approved is True and after.status == before_campaign.status
        again = await call(api, "action-2")
        assert again.updated == 1
    else:
        assert first.campaign.status == cpb.CAMPAIGN_STATUS_CANCELLED == after.status
        assert after.cancelled_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()
        exc = await refused(call(api, "action-2"))
        assert failure(exc) == ("FAILED_PRECONDITION", "CAMPAIGN_NOT_OPEN")
        assert "CANCELLED" in exc.details()
        # Time passes: the notification and the execution come due and do nothing.
        clock.advance(timedelta(hours=3))
        await jobs_due(pool, settings, clock)
        assert (await get_campaign(api)).status == cpb.CAMPAIGN_STATUS_CANCELLED
        assert await events_of(pool, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED) == []
        announced = await events_of(pool, lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
        assert len(announced) == (1 if state == "AWAITING_CLEARANCE" else 0)
        assert await call(api, "action-1") == first  # replayed after the jobs too


async def test_campaign_time_driven_transitions_with_the_pinned_clock(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """SCHEDULED -> AWAITING_CLEARANCE exactly at T - lead (not a microsecond before), approvals
    open until just before T and closed at T, execution not before T (the job is retried, the
    campaign untouched) and at T EXECUTED with its counts, once: a second run of the job emits
    nothing more. GetReward follows the state: NOT_ELIGIBLE until executed, then only the
    approved customer gets the reward."""
    start = clock.now()
    execute_at = start + timedelta(hours=2)
    await campaign_in("SCHEDULED", api, pool, settings, clock)
    clock.advance(execute_at - LEAD - clock.now() - timedelta(microseconds=1))
    assert await jobs_due(pool, settings, clock) == []  # the notification is not due yet
    assert (await get_campaign(api)).status == cpb.CAMPAIGN_STATUS_SCHEDULED
    clock.advance(timedelta(microseconds=1))
    assert await jobs_due(pool, settings, clock) == ["done"]
    notified = await get_campaign(api)
    assert notified.status == cpb.CAMPAIGN_STATUS_AWAITING_CLEARANCE
    assert notified.notified_at.ToDatetime().replace(tzinfo=start.tzinfo) == clock.now()
    assert len(await events_of(pool, lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)) == 1
    for customer in CUSTOMERS:
        denied = await get_reward(api, customer, campaign_id="spring")
        assert denied.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
        assert "AWAITING_CLEARANCE" in denied.denial_message

    clock.advance(execute_at - clock.now() - timedelta(microseconds=1))
    await set_statuses(api, "spring", {"c1": True, "c2": False}, "last-moment")
    # The execution job run early (a clock behind the queue's) changes nothing.
    async with pool.acquire() as conn:
        execute_job = await conn.fetchval(
            "SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")
        await conn.execute("UPDATE outbox_jobs SET due_at = $2 WHERE id = $1", execute_job,
                           clock.now())
    assert await jobs_due(pool, settings, clock) == ["pending"]
    assert (await get_campaign(api)).status == cpb.CAMPAIGN_STATUS_AWAITING_CLEARANCE

    clock.advance(timedelta(microseconds=1))  # T: approvals close, execution is due
    exc = await refused(set_statuses(api, "spring", {"c3": True}, "at-T"))
    assert failure(exc) == ("FAILED_PRECONDITION", "CLEARANCE_CLOSED")
    assert "AWAITING_CLEARANCE" in exc.details()
    async with pool.acquire() as conn:
        await conn.execute("UPDATE outbox_jobs SET due_at = $2 WHERE id = $1", execute_job,
                           clock.now())
    assert await jobs_due(pool, settings, clock) == ["done"]
    executed = await get_campaign(api)
    assert executed.status == cpb.CAMPAIGN_STATUS_EXECUTED
    assert (executed.approved_count, executed.rejected_count) == (1, 2)
    assert executed.executed_at.ToDatetime().replace(tzinfo=start.tzinfo) == clock.now()
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    assert await run_outbox_job(ctx, execute_job) == "not due or already done"
    assert len(await events_of(pool, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED)) == 1
    granted = await get_reward(api, "c1", campaign_id="spring")
    assert granted.HasField("grant")
    for customer in ("c2", "c3"):
        denied = await get_reward(api, customer, campaign_id="spring")
        assert denied.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE


async def test_a_notification_that_comes_due_after_the_deadline_does_not_reopen_clearance(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Workers down across T - lead and T (docs/operations.md, "Backlog": the time listeners
    lose from their clearance window): when they come back both jobs are due and run in any
    order. A notification run at or after ClearanceRequiredBy can no longer be acted on
    (approvals close at T, core.campaigns.check_clearance_open; the event's deliver_by, T, has
    passed). It must not announce the campaign: no type-5 event or delivery, the campaign not
    moved to AWAITING_CLEARANCE ("Listeners were notified; approvals are open until
    execute_at", campaigns.proto), no notified_at; the execution then runs it as usual."""
    await campaign_in("SCHEDULED", api, pool, settings, clock)
    clock.advance(timedelta(hours=2, minutes=1))  # no worker ran meanwhile
    async with pool.acquire() as conn:
        notify_job = await conn.fetchval(
            "SELECT id FROM outbox_jobs WHERE kind = 'campaign.notify'")
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await run_outbox_job(ctx, notify_job)
    late = await get_campaign(api)
    deliveries = await pool.fetch("SELECT status, deliver_by FROM webhook_deliveries")
    announced = await events_of(pool, lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
    assert await jobs_due(pool, settings, clock) == ["done"]  # the execution still runs
    executed = await get_campaign(api)
    assert executed.status == cpb.CAMPAIGN_STATUS_EXECUTED
    assert (late.status, late.HasField("notified_at"), announced, deliveries) == (
        cpb.CAMPAIGN_STATUS_SCHEDULED, False, [], [])


async def test_statuses_for_a_campaign_without_conditional_execution_are_refused(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Without conditional execution "the whole target group is eligible at execution"
    (core/campaigns.py; campaigns.proto: reconciliation's approved is "the whole group when not
    conditional"). A listener's rejection there can never take effect, so accepting it
    (``updated: 1``, and GetProcessedCampaignCustomers then shows ``approved: false``) tells the
    compliance system its rejection was applied when the customer will get the reward anyway.
    Invariant 4: a state the call cannot act in is FAILED_PRECONDITION with a reason, and
    nothing is stored."""
    await campaign_in("SCHEDULED", api, pool, settings, clock, conditional=False)
    before = await snapshot(pool)
    try:
        await set_statuses(api, "spring", {"c1": False}, "reject-c1")
        outcome: tuple[str, str | None] | None = None
    except grpc.RpcError as exc:
        outcome = failure(exc)
        assert "conditional" in exc.details()
    changed = diff(before, await snapshot(pool))
    clock.advance(timedelta(hours=2))
    assert await jobs_due(pool, settings, clock) == ["done"]
    rejected_got_it = (await get_reward(api, "c1", campaign_id="spring")).HasField("grant")
    assert rejected_got_it  # the campaign is unconditional: everyone is eligible
    assert outcome is not None and outcome[0] == "FAILED_PRECONDITION" and outcome[1]
    assert changed == {}


# --- bonus results ------------------------------------------------------------------------------


async def bonus_results_in_every_state(api: Api, pool: asyncpg.Pool, settings: Settings,
                                       clock: FixedClock) -> dict[str, bpb.BonusResult]:
    """A MANUAL definition (10% of deposits, 2 decimals, minimum 1) and one result per state:
    CALCULATED (two: one to approve, one to reject), SKIPPED (BELOW_MINIMUM), ISSUED (approved)
    and REJECTED (rejected)."""
    await bonus_api.create(api, bonus_api.definition(
        "manual-10", "sum(deposit.amount) * 10%", approval_mode=bpb.APPROVAL_MODE_MANUAL,
        rounding=ppb.ROUNDING_MODE_ROUND, decimals=2, min_allowed="1"))
    names = {"b1": "CALCULATED", "b2": "ISSUED", "b3": "REJECTED", "b4": "SKIPPED",
             "b5": "CALCULATED_2"}
    await bonus_api.customers(api, *[(c, "EUR", "UTC") for c in names])
    when = clock.now() - timedelta(hours=1)
    await bonus_api.events(api, "deposits", *[
        (c, "deposit", "5" if c == "b4" else "100", when, {}) for c in names])
    await bonus_api.request(api, "manual-10", list(names), "setup-request", role="admin")
    clock.advance(timedelta(minutes=5))
    assert await bonus_api.run_due_batches(pool, settings, clock) == 1
    by_customer = {r.customer_id: r for r in await bonus_api.results(api)}
    stub = bonus_api.stub(api)
    await stub.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
        request_id="setup-approve", bonus_ids=[by_customer["b2"].bonus_id]), metadata=api.key())
    await stub.RejectBonusResults(bpb.RejectBonusResultsRequest(
        request_id="setup-reject", bonus_ids=[by_customer["b3"].bonus_id], reason="abuse"),
        metadata=api.key())
    out = {names[r.customer_id]: r for r in await bonus_api.results(api)}
    assert {s: bpb.BonusStatus.Name(r.status) for s, r in out.items()} == {
        s: f"BONUS_STATUS_{s.removesuffix('_2')}" for s in out}
    return out


def _decide(api: Api, action: str, bonus_id: str, request_id: str) -> Any:
    stub = bonus_api.stub(api)
    if action == "approve":
        return stub.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
            request_id=request_id, bonus_ids=[bonus_id]), metadata=api.key())
    return stub.RejectBonusResults(bpb.RejectBonusResultsRequest(
        request_id=request_id, bonus_ids=[bonus_id], reason="no"), metadata=api.key())


async def test_bonus_result_approve_and_reject_from_every_state(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md: Approve/Reject take CALCULATED results only; "anything else is
    FAILED_PRECONDITION BONUS_NOT_AWAITING_APPROVAL". Every (state, decision) cell: a refusal
    names the bonus and its status (message and ErrorInfo metadata) and changes no row (no
    ledger entry, no event, no delivery, no request id claimed); the allowed decision reads
    back, writes the ledger and the Issued event once, replays under its request id, and a
    second decision under a new id is refused (the result is no longer CALCULATED)."""
    await listen(api, lpb.EVENT_TYPE_BONUS_ISSUED)
    results = await bonus_results_in_every_state(api, pool, settings, clock)
    problems: list[str] = []
    for state in ("SKIPPED", "ISSUED", "REJECTED"):
        for action in ("approve", "reject"):
            bonus_id = results[state].bonus_id
            before = await snapshot(pool)
            exc = await refused(_decide(api, action, bonus_id, f"{action}-{state}"))
            info = error_info_of(exc)
            cell = f"{action} {state}"
            if failure(exc) != ("FAILED_PRECONDITION", "BONUS_NOT_AWAITING_APPROVAL"):
                problems.append(f"{cell}: {failure(exc)}")
            if state not in exc.details() or bonus_id not in exc.details():
                problems.append(f"{cell}: message {exc.details()!r}")
            if info is None or info.metadata.get("status") != state:
                problems.append(f"{cell}: metadata {info and dict(info.metadata)}")
            if changed := diff(before, await snapshot(pool)):
                problems.append(f"{cell}: changed {changed}")
    assert problems == []

    stub = bonus_api.stub(api)
    for action, state, target in (("approve", "CALCULATED", bpb.BONUS_STATUS_ISSUED),
                                  ("reject", "CALCULATED_2", bpb.BONUS_STATUS_REJECTED)):
        result = results[state]
        first = await _decide(api, action, result.bonus_id, f"{action}-1")
        assert [r.status for r in first.results] == [target]
        read = (await stub.GetBonusResult(bpb.GetBonusResultRequest(
            bonus_id=result.bonus_id), metadata=api.key())).result
        assert read.status == target and read.decided_by == "test-admin"
        assert await _decide(api, action, result.bonus_id, f"{action}-1") == first
        exc = await refused(_decide(api, action, result.bonus_id, f"{action}-2"))
        assert failure(exc) == ("FAILED_PRECONDITION", "BONUS_NOT_AWAITING_APPROVAL")
        assert bpb.BonusStatus.Name(target).removeprefix("BONUS_STATUS_") in exc.details()
    assert [e.amount for e in await bonus_api.ledger(api, "b1")] == ["10"]
    assert await bonus_api.ledger(api, "b5") == []
    issued = await events_of(pool, lpb.EVENT_TYPE_BONUS_ISSUED)
    assert len(issued) == 2  # b2 in the setup, b1 here: once each
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 2


async def test_recalculation_touches_only_skipped_and_calculated_results(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md: RecalculateBonusResults "computes every SKIPPED and CALCULATED result
    again ... in place (same bonus id, new revision); they stay in the queue". ISSUED and
    REJECTED are terminal: untouched (status, amount, revision, calculation), the ledger too.
    Its retry replays the counts without computing again."""
    results = await bonus_results_in_every_state(api, pool, settings, clock)
    stub = bonus_api.stub(api)
    await stub.UpdateBonusDefinition(bpb.UpdateBonusDefinitionRequest(
        request_id="edit", definition=bpb.BonusDefinition(
            definition_id="manual-10", formula="sum(deposit.amount) * 30%"),
        update_mask={"paths": ["formula"]}), metadata=api.key())
    clock.advance(timedelta(minutes=1))
    ledger_before = await pool.fetch("SELECT * FROM bonus_ledger ORDER BY id")
    done = await stub.RecalculateBonusResults(bpb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="manual-10"), metadata=api.key())
    assert (done.recalculated_count, done.calculated_count, done.skipped_count) == (3, 3, 0)
    after = {s: (await stub.GetBonusResult(bpb.GetBonusResultRequest(bonus_id=r.bonus_id),
                                           metadata=api.key())).result
             for s, r in results.items()}
    for state in ("ISSUED", "REJECTED"):
        assert after[state] == results[state], state
    for state in ("CALCULATED", "CALCULATED_2", "SKIPPED"):
        assert (after[state].status, after[state].definition_revision) == (
            bpb.BONUS_STATUS_CALCULATED, 2), state
        assert after[state].bonus_id == results[state].bonus_id
    assert after["SKIPPED"].amount == "1.5" and after["CALCULATED"].amount == "30"
    assert await pool.fetch("SELECT * FROM bonus_ledger ORDER BY id") == ledger_before
    counts = await pool.fetch("SELECT bonus_id, calculation_count FROM bonus_results")
    again = await stub.RecalculateBonusResults(bpb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="manual-10"), metadata=api.key())
    assert again == done
    assert await pool.fetch("SELECT bonus_id, calculation_count FROM bonus_results") == counts


async def _campaign_schedule_world(api: Api, pool: asyncpg.Pool, settings: Settings,
                                   clock: FixedClock) -> None:
    """An unconditional campaign "spring" over c1-c3 (customers with a bet each) and an
    AUTOMATIC definition paying 10% of the bets."""
    await campaign_in("SCHEDULED", api, pool, settings, clock, conditional=False)
    await bonus_api.create(api, bonus_api.definition("bets-10", "sum(bet.amount) * 10%"))
    await bonus_api.customers(api, *[(c, "EUR", "UTC") for c in CUSTOMERS])
    await bonus_api.events(api, "bets", *[(c, "bet", "10", clock.now() - timedelta(hours=1), {})
                                          for c in CUSTOMERS])


def _campaign_schedule(schedule_id: str) -> bpb.CreateBonusScheduleRequest:
    return bpb.CreateBonusScheduleRequest(request_id=schedule_id, schedule=bpb.BonusSchedule(
        schedule_id=schedule_id, definition_id="bets-10", campaign_id="spring",
        local_time="10:30", time_zone="UTC"))


async def test_a_schedule_of_a_cancelled_campaign_requests_nothing(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """CANCELLED is terminal: the campaign never runs and nobody enters it. A schedule reading
    "the campaign's target group at each run" (docs/bonuses.md, Schedules) must find nobody
    there, as a since_campaign_entrance schedule finds nobody before the campaign ran;
    instead every target is paid each day, with no way to tell from the campaign."""
    from workers.bonuses import run_due_schedules

    await _campaign_schedule_world(api, pool, settings, clock)
    await bonus_api.stub(api).CreateBonusSchedule(_campaign_schedule("daily"),
                                                  metadata=api.key())
    await _cancel(api, "cancel")
    clock.advance(timedelta(minutes=31))  # 10:31: the run is due
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    clock.advance(timedelta(minutes=5))
    await bonus_api.run_due_batches(pool, settings, clock)
    paid = [(r.customer_id, bpb.BonusStatus.Name(r.status)) for r in
            await bonus_api.results(api)]
    assert paid == []
    assert await pool.fetchval("SELECT count(*) FROM bonus_ledger") == 0


async def test_a_schedule_cannot_be_created_for_a_cancelled_campaign(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A schedule naming a campaign that can never run (CANCELLED) is a configuration mistake
    the operator should hear about (invariant 4: FAILED_PRECONDITION naming the state), not a
    schedule that silently pays the group (see the test above). Nothing is stored."""
    await _campaign_schedule_world(api, pool, settings, clock)
    await _cancel(api, "cancel")
    before = await snapshot(pool)
    try:
        await bonus_api.stub(api).CreateBonusSchedule(_campaign_schedule("late"),
                                                      metadata=api.key())
        outcome: tuple[str, str | None] | None = None
        details = ""
    except grpc.RpcError as exc:
        outcome, details = failure(exc), exc.details()
    assert diff(before, await snapshot(pool)) == {}
    assert outcome is not None and outcome[0] == "FAILED_PRECONDITION"
    assert "CANCELLED" in details


# --- promotions ---------------------------------------------------------------------------------


def promotions(api: Api) -> ppb_grpc.PromotionServiceStub:
    return ppb_grpc.PromotionServiceStub(api.channel)


async def promotion_in(state: str, api: Api, code: str) -> ppb.Promotion:
    await promotion(api, code, activate=state != "DRAFT")
    if state == "DEACTIVATED":
        await promotions(api).DeactivatePromotion(ppb.DeactivatePromotionRequest(
            request_id=f"setup-deactivate-{code}", promotion_code=code), metadata=api.key())
    found = await get_promotion(api, code)
    assert ppb.PromotionStatus.Name(found.status) == f"PROMOTION_STATUS_{state}"
    return found


def _promotion_action(api: Api, action: str, code: str, request_id: str) -> Any:
    stub = promotions(api)
    if action == "ActivatePromotion":
        return stub.ActivatePromotion(ppb.ActivatePromotionRequest(
            request_id=request_id, promotion_code=code), metadata=api.key())
    if action == "DeactivatePromotion":
        return stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
            request_id=request_id, promotion_code=code), metadata=api.key())
    return stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id=request_id, promotion=ppb.Promotion(promotion_code=code,
                                                       name=f"Renamed {request_id}"),
        update_mask={"paths": ["name"]}), metadata=api.key())


# (state, action) -> (None, the state after) when allowed, else (the refusal's reason, state).
PROMOTION_MATRIX = {
    "DRAFT": {"ActivatePromotion": (None, "ACTIVE"),
              "DeactivatePromotion": ("INVALID_STATUS_TRANSITION", "DRAFT"),
              "UpdatePromotion": (None, "DRAFT")},
    "ACTIVE": {"ActivatePromotion": ("INVALID_STATUS_TRANSITION", "ACTIVE"),
               "DeactivatePromotion": (None, "DEACTIVATED"),
               "UpdatePromotion": ("PROMOTION_NOT_EDITABLE", "ACTIVE")},
    "DEACTIVATED": {"ActivatePromotion": (None, "ACTIVE"),
                    "DeactivatePromotion": ("INVALID_STATUS_TRANSITION", "DEACTIVATED"),
                    "UpdatePromotion": (None, "DEACTIVATED")},
}


@pytest.mark.parametrize("state", list(PROMOTION_MATRIX))
async def test_promotion_every_action_from_every_state(api: Api, pool: asyncpg.Pool,
                                                       state: str) -> None:
    """promotions.proto: DRAFT -> ACTIVE -> DEACTIVATED (-> ACTIVE); UpdatePromotion edits a
    DRAFT or DEACTIVATED promotion. From each state, each call on a promotion of its own: a
    refusal is FAILED_PRECONDITION naming the current state, changes no row (the version
    neither); an allowed call reads back (status, version + 1), replays under its request id,
    and repeating a transition under a new id is refused (it is no longer allowed from the new
    state) while an edit under a new id is a new edit. GetReward grants only while ACTIVE."""
    await reward_type(api)
    for index, (action, (reason, after_state)) in enumerate(PROMOTION_MATRIX[state].items()):
        code = f"P{index}"
        before_promotion = await promotion_in(state, api, code)
        before = await snapshot(pool)
        if reason is not None:
            exc = await refused(_promotion_action(api, action, code, "act-1"))
            assert failure(exc) == ("FAILED_PRECONDITION", reason), action
            assert state in exc.details(), exc.details()
            assert diff(before, await snapshot(pool)) == {}, action
            assert await get_promotion(api, code) == before_promotion
            continue
        first = await _promotion_action(api, action, code, "act-1")
        assert ppb.PromotionStatus.Name(first.promotion.status).endswith(after_state)
        read = await get_promotion(api, code)
        assert (read.status, read.version) == (first.promotion.status,
                                               before_promotion.version + 1)
        assert await _promotion_action(api, action, code, "act-1") == first
        if action == "UpdatePromotion":
            again = await _promotion_action(api, action, code, "act-2")
            assert again.promotion.version == read.version + 1
        else:
            exc = await refused(_promotion_action(api, action, code, "act-2"))
            assert failure(exc) == ("FAILED_PRECONDITION", "INVALID_STATUS_TRANSITION")
            assert after_state in exc.details()
    # GetReward from the state itself (a promotion of its own, never transitioned).
    await promotion_in(state, api, "PR")
    before = await snapshot(pool)
    reward = await get_reward(api, "someone", "PR")
    if state == "ACTIVE":
        assert reward.HasField("grant")
    else:
        assert reward.denial_reason == rpb.DENIAL_REASON_NOT_ACTIVE
        assert state in reward.denial_message or "not active" in reward.denial_message.lower()
        assert set(diff(before, await snapshot(pool))) <= {"idempotency_keys"}
        assert await pool.fetchval("SELECT count(*) FROM grants") == 0


# --- triggers: active / paused ------------------------------------------------------------------


async def test_schedule_pause_and_resume_from_each_state(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md (Editing): "active" pauses or resumes; a paused schedule does not run; a
    resumed one next runs at its first time after the resumption. Pausing a paused schedule and
    resuming an active one are harmless no-ops under a new request id: above all a resume of an
    ACTIVE schedule must not move its next run (that would drop a run that is due). A retry
    replays the first answer."""
    from workers.bonuses import run_due_schedules

    await bonus_api.create(api, bonus_api.definition("bets-10", "sum(bet.amount) * 10%"))
    await bonus_api.customers(api, ("z1", "EUR", "UTC"))
    await bonus_api.events(api, "bets", ("z1", "bet", "10", clock.now() - timedelta(hours=1), {}))
    stub = bonus_api.stub(api)
    created = (await stub.CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id="create", schedule=bpb.BonusSchedule(
            schedule_id="daily", definition_id="bets-10", customer_ids=["z1"],
            local_time="10:30", time_zone="UTC")), metadata=api.key())).schedule
    assert created.active
    today = created.next_run_time

    async def set_active(request_id: str, active: bool) -> bpb.BonusSchedule:
        return (await stub.UpdateBonusSchedule(bpb.UpdateBonusScheduleRequest(
            request_id=request_id, schedule=bpb.BonusSchedule(schedule_id="daily",
                                                              active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())).schedule

    clock.advance(timedelta(minutes=31))  # 10:31: today's run is due, no sweep yet
    still = await set_active("resume-active", True)  # ACTIVE -> resume: no-op
    assert (still.active, still.next_run_time) == (True, today)
    paused = await set_active("pause", False)  # ACTIVE -> PAUSED
    assert (paused.active, paused.next_run_time) == (False, today)
    assert await set_active("pause-again", False) == paused  # PAUSED -> pause: no-op
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 0  # paused: no run
    resumed = await set_active("resume", True)  # PAUSED -> ACTIVE: next run after now
    assert resumed.active and resumed.next_run_time.ToDatetime() > today.ToDatetime()
    assert resumed.next_run_time.seconds - today.seconds == 24 * 3600
    assert await set_active("pause", False) == paused  # an old retry replays, changes nothing
    listed = (await stub.ListBonusSchedules(bpb.ListBonusSchedulesRequest(),
                                            metadata=api.key())).schedules
    assert [(s.active, s.next_run_time) for s in listed] == [(True, resumed.next_run_time)]
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 0  # missed: not made up
    clock.advance(timedelta(days=1))
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 1


async def test_rule_pause_and_resume_from_each_state(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A paused rule does not count events; its counts are kept; pausing a paused rule or
    resuming an active one is a no-op (counts untouched, not a "new counting condition")."""
    await bonus_api.create(api, bonus_api.definition("bets-10", "sum(bet.amount) * 10%"))
    await bonus_api.customers(api, ("z1", "EUR", "UTC"))
    stub = bonus_api.stub(api)
    await stub.CreateBonusRule(bpb.CreateBonusRuleRequest(request_id="rule", rule=bpb.BonusRule(
        rule_id="every-2", definition_id="bets-10", event_kind="bet", every=2)),
        metadata=api.key())

    async def set_active(request_id: str, active: bool) -> bpb.BonusRule:
        return (await stub.UpdateBonusRule(bpb.UpdateBonusRuleRequest(
            request_id=request_id, rule=bpb.BonusRule(rule_id="every-2", active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())).rule

    async def counted() -> list[int]:
        return [r["accumulated"] for r in await pool.fetch(
            "SELECT accumulated FROM bonus_rule_states")]

    bet = iter(range(100))

    async def record() -> None:
        n = next(bet)
        await bonus_api.events(api, f"bet-{n}",
                               ("z1", "bet", "10", clock.now() - timedelta(minutes=60 - n), {}))

    await record()
    assert await counted() == [1]
    assert (await set_active("resume-active", True)).active  # ACTIVE -> resume: no-op
    assert await counted() == [1]
    paused = await set_active("pause", False)
    assert not paused.active
    await record()  # not counted while paused
    assert await set_active("pause-again", False) == paused
    assert await counted() == [1]
    assert (await set_active("resume", True)).active
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 0
    await record()  # the 2nd counted bet fires
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 1


# --- listeners and deliveries -------------------------------------------------------------------


async def test_listener_and_delivery_lifecycle(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: Any) -> None:
    """docs/webhooks.md: an inactive listener gets no new deliveries and its pending ones are
    CANCELLED at their next attempt, without a request; RedeliverEvent starts a new run of a
    finished delivery, refused while PENDING (DELIVERY_PENDING), for an inactive listener
    (LISTENER_INACTIVE) or an unregistered one (LISTENER_UNREGISTERED), each refusal changing
    nothing; deactivating an inactive listener is a harmless edit; an unregistered listener is
    gone: updating or unregistering it again is NOT_FOUND, while a retry of the unregistration
    replays its answer."""
    from tests.webhook_listener import SECRET
    from workers import webhooks

    lstub = lpb_grpc.ListenerServiceStub(api.channel)
    registered = (await lstub.RegisterListener(lpb.RegisterListenerRequest(
        request_id="reg", listener=lpb.Listener(event_type=lpb.EVENT_TYPE_CAMPAIGN_EXECUTED,
                                                url=listener.url, secret=SECRET)),
        metadata=api.key())).listener
    lid = registered.listener_id

    async def set_active(request_id: str, active: bool) -> lpb.Listener:
        return (await lstub.UpdateListener(lpb.UpdateListenerRequest(
            request_id=request_id, listener=lpb.Listener(listener_id=lid, active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())).listener

    async def deliver_due() -> list[str]:
        async with pool.acquire() as conn:
            ids = [r["id"] for r in await conn.fetch(
                "SELECT id FROM outbox_jobs WHERE kind = 'webhook.deliver' AND status = "
                "'pending' AND due_at <= $1 ORDER BY id", clock.now())]
        ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings,
                               "redis": None}
        await webhooks.setup(ctx)
        try:
            return [await run_outbox_job(ctx, i) for i in ids]
        finally:
            await webhooks.teardown(ctx)

    async def delivery_statuses() -> list[str]:
        return [r["status"] for r in await pool.fetch(
            "SELECT status FROM webhook_deliveries ORDER BY id")]

    def redeliver(request_id: str, delivery_id: int) -> Any:
        return lstub.RedeliverEvent(lpb.RedeliverEventRequest(
            request_id=request_id, delivery_id=delivery_id), metadata=api.key())

    await reward_type(api)
    await promotion(api)
    for name, hours in (("first", 1), ("second", 2)):
        await create_campaign(api, name, clock.now() + timedelta(hours=hours),
                              customers=["c1"], conditional=False)

    assert not (await set_active("off", False)).active
    assert not (await set_active("off-again", False)).active  # INACTIVE -> inactive: fine
    clock.advance(timedelta(hours=1))
    await jobs_due(pool, settings, clock)
    assert len(await events_of(pool, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED)) == 1
    assert await delivery_statuses() == []  # no delivery for an inactive listener

    assert (await set_active("on", True)).active
    clock.advance(timedelta(hours=1))
    await jobs_due(pool, settings, clock)
    assert await delivery_statuses() == ["PENDING"]
    delivery_id = await pool.fetchval("SELECT id FROM webhook_deliveries")
    before = await snapshot(pool)
    exc = await refused(redeliver("too-early", delivery_id))
    assert failure(exc) == ("FAILED_PRECONDITION", "DELIVERY_PENDING")
    assert diff(before, await snapshot(pool)) == {}
    await set_active("off-2", False)
    await deliver_due()
    assert await delivery_statuses() == ["CANCELLED"] and listener.received == []

    before = await snapshot(pool)
    exc = await refused(redeliver("while-inactive", delivery_id))
    assert failure(exc) == ("FAILED_PRECONDITION", "LISTENER_INACTIVE")
    assert diff(before, await snapshot(pool)) == {}
    await set_active("on-2", True)
    first = await redeliver("again", delivery_id)
    assert first.delivery.status == lpb.DELIVERY_STATUS_PENDING
    await deliver_due()
    assert await delivery_statuses() == ["DELIVERED"] and len(listener.received) == 1
    assert await redeliver("again", delivery_id) == first  # the retry replays

    gone = await lstub.UnregisterListener(lpb.UnregisterListenerRequest(
        request_id="bye", listener_id=lid), metadata=api.key())
    assert await lstub.UnregisterListener(lpb.UnregisterListenerRequest(
        request_id="bye", listener_id=lid), metadata=api.key()) == gone
    before = await snapshot(pool)
    expected = [("NOT_FOUND", "LISTENER_NOT_FOUND"), ("NOT_FOUND", "LISTENER_NOT_FOUND"),
                # docs/webhooks.md: a redelivery is "refused" (FAILED_PRECONDITION) when its
                # listener is unregistered, with the reason NOT_FOUND carries elsewhere.
                ("FAILED_PRECONDITION", "LISTENER_UNREGISTERED")]
    for want, call in zip(expected, (lstub.UnregisterListener(lpb.UnregisterListenerRequest(
                     request_id="bye-again", listener_id=lid), metadata=api.key()),
                 lstub.UpdateListener(lpb.UpdateListenerRequest(
                     request_id="edit-gone", listener=lpb.Listener(listener_id=lid,
                                                                   active=True),
                     update_mask={"paths": ["active"]}), metadata=api.key()),
                 redeliver("gone", delivery_id)), strict=True):
        exc = await refused(call)
        assert failure(exc) == want
        assert "unregistered" in exc.details() or str(lid) in exc.details()
    assert diff(before, await snapshot(pool)) == {}


# --- time-driven edges --------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
async def test_an_overdue_campaign_still_open_after_its_execution_time(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        conditional: bool) -> None:
    """Workers down (or the execution job dead, proto JobService: "a dead campaign execution
    leaves its campaign unexecuted"): past ClearanceRequiredBy the campaign is still SCHEDULED
    (or AWAITING_CLEARANCE). Approvals go by the clock (CLEARANCE_CLOSED at T whatever the
    status), while cancelling and adding targets go by the status alone, as documented
    ("Cancels a SCHEDULED or AWAITING_CLEARANCE campaign"; targets "while SCHEDULED"): a late
    cancel wins over the overdue execution, and targets added late are executed with the rest
    (unconditional: they get the reward)."""
    await campaign_in("SCHEDULED", api, pool, settings, clock, conditional=conditional)
    clock.advance(timedelta(hours=3))  # an hour past T, nothing ran
    exc = await refused(_approve(api, "late-approval"))
    assert failure(exc) == ("FAILED_PRECONDITION", "CLEARANCE_CLOSED" if conditional
                            else "CAMPAIGN_NOT_CONDITIONAL")
    assert ("SCHEDULED" if conditional else "no conditional execution") in exc.details()
    added = await _add_targets(api, "late-targets")
    assert (added.added, added.target_count) == (1, 4)
    if conditional:
        cancelled = await _cancel(api, "late-cancel")
        assert cancelled.campaign.status == cpb.CAMPAIGN_STATUS_CANCELLED
        await jobs_due(pool, settings, clock)
        assert (await get_campaign(api)).status == cpb.CAMPAIGN_STATUS_CANCELLED
        assert await events_of(pool, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED) == []
    else:
        await jobs_due(pool, settings, clock)
        executed = await get_campaign(api)
        assert (executed.status, executed.approved_count) == (cpb.CAMPAIGN_STATUS_EXECUTED, 4)
        assert (await get_reward(api, "c9", campaign_id="spring")).HasField("grant")


async def test_approval_mode_switches_decide_only_results_calculated_afterwards(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md: AUTOMATIC issues at once, MANUAL waits as CALCULATED; "none is issued
    automatically after the operator switched to manual approval" (a request made under
    AUTOMATIC and computed after the switch waits); switching back to AUTOMATIC issues only
    results calculated afterwards (the waiting one stays CALCULATED, also after a
    recalculation)."""
    await bonus_api.create(api, bonus_api.definition("auto-10", "sum(deposit.amount) * 10%"))
    await bonus_api.customers(api, ("a1", "EUR", "UTC"), ("a2", "EUR", "UTC"))
    await bonus_api.events(api, "deposits", *[
        (c, "deposit", "100", clock.now() - timedelta(hours=1), {}) for c in ("a1", "a2")])
    stub = bonus_api.stub(api)

    async def switch(request_id: str, mode: int) -> None:
        await stub.UpdateBonusDefinition(bpb.UpdateBonusDefinitionRequest(
            request_id=request_id, definition=bpb.BonusDefinition(definition_id="auto-10",
                                                                  approval_mode=mode),
            update_mask={"paths": ["approval_mode"]}), metadata=api.key())

    await bonus_api.request(api, "auto-10", ["a1"], "under-automatic")
    await switch("to-manual", bpb.APPROVAL_MODE_MANUAL)
    clock.advance(timedelta(minutes=5))
    await bonus_api.run_due_batches(pool, settings, clock)
    [waiting] = await bonus_api.results(api)
    assert waiting.status == bpb.BONUS_STATUS_CALCULATED
    assert await bonus_api.ledger(api, "a1") == []
    await switch("to-automatic", bpb.APPROVAL_MODE_AUTOMATIC)
    await stub.RecalculateBonusResults(bpb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="auto-10"), metadata=api.key())
    await bonus_api.request(api, "auto-10", ["a2"], "under-automatic-again")
    clock.advance(timedelta(minutes=5))
    await bonus_api.run_due_batches(pool, settings, clock)
    statuses = {r.customer_id: r.status for r in await bonus_api.results(api)}
    assert statuses == {"a1": bpb.BONUS_STATUS_CALCULATED, "a2": bpb.BONUS_STATUS_ISSUED}
    assert await bonus_api.ledger(api, "a1") == []
    assert [e.amount for e in await bonus_api.ledger(api, "a2")] == ["10"]


# --- grants -------------------------------------------------------------------------------------


async def test_grant_revocation_from_each_state(api: Api, pool: asyncpg.Pool) -> None:
    """rewards.proto:15-17, 112-115: GRANTED --RevokeGrant--> REVOKED (terminal), "idempotent":
    a retry replays revoked=true; a new request id on a REVOKED grant answers revoked=false and
    changes nothing but the stored answer (unlike the lifecycle verbs, which refuse a repeat
    with FAILED_PRECONDITION). A grant of a promotion deactivated since is still revocable (the
    promotion system could not credit it), and its budget comes back."""
    from tests.e2e.promo_helpers import cap

    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100")])
    grant = (await get_reward(api, "c1")).grant
    await promotions(api).DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="deactivate", promotion_code="VIP25"), metadata=api.key())

    async def revoke(request_id: str) -> rpb.RevokeGrantResponse:
        return await rpb_grpc.RewardServiceStub(api.channel).RevokeGrant(rpb.RevokeGrantRequest(
            request_id=request_id, grant_id=grant.grant_id, reason="credit failed"),
            metadata=api.key("runtime"))

    first = await revoke("revoke-1")
    assert first.revoked
    assert await revoke("revoke-1") == first
    used = [(u.scope, u.used) for u in (await get_promotion(api)).cap_usage]
    assert used == [("cashback", "0")]
    before = await snapshot(pool)
    again = await revoke("revoke-2")
    assert not again.revoked
    assert set(diff(before, await snapshot(pool))) <= {"idempotency_keys"}
    assert await pool.fetchval("SELECT status FROM grants") == "REVOKED"


# --- mends after the audit ----------------------------------------------------------------------


async def test_cancelling_a_campaign_awaiting_clearance_cancels_its_pending_announcement(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """The type-5 announcement not yet delivered (a listener down and retried) would ask the
    listener to clear a campaign that will never run: CancelCampaign cancels it, with the
    reason in its last error; a delivered one would stay as it was. A retry of the cancel
    replays its answer and cancels nothing more."""
    await campaign_in("AWAITING_CLEARANCE", api, pool, settings, clock)
    announcement = await pool.fetchrow(
        """SELECT d.id, d.status FROM webhook_deliveries d JOIN webhook_events e
             ON e.id = d.event_id WHERE e.event_type = $1""",
        lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
    assert announcement["status"] == "PENDING"
    first = await _cancel(api, "cancel-awaiting")
    again = await _cancel(api, "cancel-awaiting")
    assert first == again and first.campaign.status == cpb.CAMPAIGN_STATUS_CANCELLED
    after = await pool.fetchrow(
        "SELECT status, last_error FROM webhook_deliveries WHERE id = $1", announcement["id"])
    assert (after["status"], after["last_error"]) == ("CANCELLED", "campaign cancelled")
    assert await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE status = 'PENDING'") == 0


@pytest.mark.parametrize("state", ["EXECUTED", "CANCELLED"])
async def test_campaign_refusals_carry_the_status_in_their_error_info(
        state: str, api: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """As BONUS_NOT_AWAITING_APPROVAL, INVALID_STATUS_TRANSITION and JOB_NOT_DEAD do: a client
    can switch on ErrorInfo's ``status`` without parsing the message."""
    await campaign_in(state, api, pool, settings, clock)
    for action, reason in (("AddCampaignTargets", "CAMPAIGN_NOT_SCHEDULED"),
                           ("CancelCampaign", "CAMPAIGN_NOT_OPEN"),
                           ("UpdateCustomerPromotionStatus", "CLEARANCE_CLOSED")):
        exc = await refused(CAMPAIGN_ACTIONS[action](api, f"late-{action}"))
        info = error_info_of(exc)
        assert info is not None and info.reason == reason
        assert dict(info.metadata) == {"campaign_id": "spring", "status": state}
