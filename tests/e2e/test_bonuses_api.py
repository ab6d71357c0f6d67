"""BonusService end to end with a pinned clock (seed 004): definitions, requests in batching
windows, the batch job run through the outbox runner, the approval queue, recalculation after a
formula edit, the ledger, and the Issued event reaching a real HTTP listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from arq import create_pool as create_arq_pool
from arq.connections import RedisSettings
from grpc import aio

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import bonuses_pb2_grpc as pb_grpc
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from server.app import Dependencies, start_server
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.webhook_listener import SECRET, WebhookListener
from workers.bonuses import run_due_schedules
from workers.main import build_worker
from workers.outbox import run_outbox_job

LAST_DEPOSIT_50 = "last(deposit.amount) * 50%"


def stub(api: Api) -> pb_grpc.BonusServiceStub:
    return pb_grpc.BonusServiceStub(api.channel)


def definition(definition_id: str, formula: str, **kw: Any) -> pb.BonusDefinition:
    fields: dict[str, Any] = dict(
        definition_id=definition_id, display_name=definition_id.title(), formula=formula,
        result_type=pb.BONUS_RESULT_TYPE_AMOUNT,
        data_mode=pb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES,
        period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=1, unit=fpb.TIME_UNIT_DAYS)),
        approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    fields.update(kw)
    return pb.BonusDefinition(**fields)


async def create(api: Api, message: pb.BonusDefinition) -> pb.BonusDefinition:
    response = await stub(api).CreateBonusDefinition(pb.CreateBonusDefinitionRequest(
        request_id=f"create-{message.definition_id}", definition=message), metadata=api.key())
    return response.definition


async def customers(api: Api, *rows: tuple[str, str, str]) -> None:
    """(customer_id, currency, time_zone) rows."""
    await cpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(cpb.UpsertCustomersRequest(
        request_id=f"customers-{rows[0][0]}", customers=[
            cpb.Customer(customer_id=c, currency=cur, time_zone=tz) for c, cur, tz in rows]),
        metadata=api.key())


async def events(api: Api, request_id: str,
                 *rows: tuple[str, str, str, datetime, dict[str, str]]) -> None:
    """(customer_id, kind, amount, occurred_at, attributes) rows."""
    await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(cpb.RecordEventsRequest(
        request_id=request_id, events=[
            cpb.Event(external_id=f"{request_id}-{i}", customer_id=c, kind=kind, amount=amount,
                      currency="EUR", occurred_at=ts(when), attributes=attributes)
            for i, (c, kind, amount, when, attributes) in enumerate(rows)]), metadata=api.key())


async def request(api: Api, definition_id: str, customer_ids: list[str], request_id: str,
                  role: str = "runtime", **kw: Any) -> pb.RequestBonusCalculationResponse:
    return await stub(api).RequestBonusCalculation(pb.RequestBonusCalculationRequest(
        request_id=request_id, definition_id=definition_id, customer_ids=customer_ids, **kw),
        metadata=api.key(role))


async def run_due_batches(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> int:
    """What a worker does when the batch jobs fall due: the outbox runner, job by job."""
    ctx = {"pool": pool, "clock": clock, "settings": settings}
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch' AND status = 'pending'"
            " AND due_at <= $1 ORDER BY id", clock.now())]
    for job_id in ids:
        assert await run_outbox_job(ctx, job_id) == "done"
    return len(ids)


async def results(api: Api, **filters: Any) -> list[pb.BonusResult]:
    response = await stub(api).ListBonusResults(pb.ListBonusResultsRequest(**filters),
                                                metadata=api.key())
    return list(response.results)


async def ledger(api: Api, customer_id: str) -> list[pb.LedgerEntry]:
    response = await stub(api).ListCustomerBonusLedger(pb.ListCustomerBonusLedgerRequest(
        customer_id=customer_id), metadata=api.key())
    return list(response.entries)


# --- definitions ------------------------------------------------------------------------------


async def test_create_get_list_update_definitions(api: Api) -> None:
    created = await create(api, definition(
        "deposit-50", LAST_DEPOSIT_50, rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=2,
        cap_amount="200", min_allowed="5", batch_window_seconds=60,
        issued_message="Your bonus of {{event.bonus_amount}} {{ event.currency }} is here"))
    assert created.revision == 1 and created.formula_language_version == 1
    assert created.cap_amount == "200" and created.min_allowed == "5"
    assert created.period.time_back.amount == 1
    again = await create(api, definition(  # same request id, same request: the first answer
        "deposit-50", LAST_DEPOSIT_50, rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=2,
        cap_amount="200", min_allowed="5", batch_window_seconds=60,
        issued_message="Your bonus of {{event.bonus_amount}} {{ event.currency }} is here"))
    assert again == created
    await create(api, definition(
        "logins", 'customer["Logins count ever"] * 2', result_type=pb.BONUS_RESULT_TYPE_POINTS,
        points_target=pb.POINTS_TARGET_LEADERBOARD,
        data_mode=pb.BONUS_DATA_MODE_PROPERTIES_ONLY, period=None))
    got = await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(
        definition_id="logins"), metadata=api.key())
    assert got.definition.points_target == pb.POINTS_TARGET_LEADERBOARD
    assert not got.definition.HasField("period")

    page = await stub(api).ListBonusDefinitions(pb.ListBonusDefinitionsRequest(page_size=1),
                                                metadata=api.key())
    assert [d.definition_id for d in page.definitions] == ["deposit-50"]
    page2 = await stub(api).ListBonusDefinitions(pb.ListBonusDefinitionsRequest(
        page_size=1, page_token=page.next_page_token), metadata=api.key())
    assert [d.definition_id for d in page2.definitions] == ["logins"]
    assert page2.next_page_token == ""

    updated = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="u1", definition=pb.BonusDefinition(definition_id="deposit-50",
                                                       approval_mode=pb.APPROVAL_MODE_MANUAL),
        update_mask={"paths": ["approval_mode"]}), metadata=api.key())
    assert updated.definition.approval_mode == pb.APPROVAL_MODE_MANUAL
    assert updated.definition.revision == 1  # approval does not change calculations
    assert updated.definition.cap_amount == "200"
    updated = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="u2", definition=pb.BonusDefinition(definition_id="deposit-50",
                                                       formula="last(deposit.amount) * 60%"),
        update_mask={"paths": ["formula"]}), metadata=api.key())
    assert updated.definition.revision == 2
    assert updated.definition.formula == "last(deposit.amount) * 60%"
    with pytest.raises(grpc.RpcError) as caught:  # a bad edit changes nothing
        await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
            request_id="u3", definition=pb.BonusDefinition(
                definition_id="deposit-50", formula="x = 1\nlast(deposit.amount) * "),
            update_mask={"paths": ["formula"]}), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "FORMULA_SYNTAX"
    assert (info.metadata["field"], info.metadata["line"]) == ("formula", "2")
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
            request_id="u4", definition=pb.BonusDefinition(definition_id="deposit-50"),
            update_mask={"paths": ["definition_id"]}), metadata=api.key())
    assert rpc_error_reason(caught.value) == "INVALID_UPDATE_MASK"
    got = await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(
        definition_id="deposit-50"), metadata=api.key())
    assert got.definition == updated.definition
    # Properties only: no period, and requests cannot give one.
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
            request_id="u5", definition=pb.BonusDefinition(
                definition_id="logins",
                period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                    amount=1, unit=fpb.TIME_UNIT_DAYS))),
            update_mask={"paths": ["period"]}), metadata=api.key())
    assert rpc_error_reason(caught.value) == "INVALID_BONUS_DEFINITION"
    await customers(api, ("l1", "EUR", "UTC"))
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "logins", ["l1"], "l-1", period_start=ts(datetime(2026, 11, 1,
                                                                              tzinfo=UTC)),
                      period_end=ts(datetime(2026, 11, 2, tzinfo=UTC)))
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"


@pytest.mark.parametrize(("message", "reason", "field", "text"), [
    (definition("bad", "sum(deposit.amount) *\n  * 2"), "FORMULA_SYNTAX", "formula",
     "formula: line 2"),
    (definition("bad", "sum(deposit.amount) * bonus_rate"), "FORMULA_INVALID", "formula",
     "bonus_rate"),
    (definition("bad", 'if sum(deposit.amount) > 100 then template("10 Free Spins")'),
     "FORMULA_INVALID", "formula", "BONUS_TEMPLATE"),
    (definition("bad", "sum(deposit.amount)", result_type=pb.BONUS_RESULT_TYPE_POINTS),
     "MISSING_FIELD", "points_target", "points_target"),
    (definition("bad", "sum(deposit.amount)", period=None), "INVALID_PERIOD", "period",
     "period"),
    (definition("bad", "sum(deposit.amount)", data_mode=pb.BONUS_DATA_MODE_PROPERTIES_ONLY,
                period=None), "FORMULA_INVALID", "formula", "properties only"),
    (definition("bad", "sum(deposit.amount)", period=fpb.TransactionPeriod(
        time_back=fpb.TransactionPeriod.TimeBack(amount=32, unit=fpb.TIME_UNIT_DAYS))),
     "PERIOD_TOO_LONG", "", "31 days"),
    (definition("bad", "sum(deposit.amount)", issued_message="Hi {{event.bonus_amont}}"),
     "INVALID_MESSAGE_TEMPLATE", "issued_message", "{{event.bonus_amont}}"),
    (definition("bad", "sum(deposit.amount)", min_allowed="300", cap_amount="200"),
     "INVALID_BONUS_DEFINITION", "min_allowed", "above cap_amount"),
    (definition("Bad Id", "sum(deposit.amount)"), "INVALID_ID", "definition_id",
     "definition_id"),
    (definition("bad", "sum(deposit.amount)", approval_mode=0), "MISSING_FIELD",
     "approval_mode", "approval_mode"),
])
async def test_bad_definitions_are_invalid_argument(api: Api, message: pb.BonusDefinition,
                                                    reason: str, field: str,
                                                    text: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == reason
    assert text in (caught.value.details() or "")
    info = error_info_of(caught.value)
    assert info is not None
    if field:
        assert info.metadata["field"] == field
    if reason == "FORMULA_SYNTAX":
        assert info.metadata["line"] == "2" and info.metadata["column"] == "3"


async def test_definition_id_taken_and_unknown(api: Api) -> None:
    await create(api, definition("d1", LAST_DEPOSIT_50))
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).CreateBonusDefinition(pb.CreateBonusDefinitionRequest(
            request_id="other", definition=definition("d1", LAST_DEPOSIT_50)),
            metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(definition_id="nope"),
                                           metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(caught.value) == "BONUS_DEFINITION_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as caught:  # runtime may request, not define
        await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(definition_id="d1"),
                                           metadata=api.key("runtime"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- seed 004: 50% of each deposit, issued automatically ------------------------------------


async def test_fifty_percent_of_each_deposit_is_issued_automatically(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("deposit-50", LAST_DEPOSIT_50,
                                 rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=2,
                                 issued_message="Your bonus of {{event.bonus_amount}} EUR"))
    await customers(api, ("p1", "EUR", "Europe/Malta"), ("p2", "EUR", "Europe/Malta"),
                    ("p3", "EUR", "Europe/Malta"))
    now = clock.now()  # 2026-11-22 10:00 UTC
    await events(api, "dep", ("p1", "deposit", "100", now - timedelta(minutes=3), {}),
                 ("p2", "deposit", "24.51", now - timedelta(minutes=2), {}),
                 ("p2", "bet", "500", now - timedelta(minutes=1), {}))
    clock.advance(timedelta(minutes=1, seconds=30))  # 10:01:30, in the 10:00-10:05 window
    first = await request(api, "deposit-50", ["p1", "p2", "p3"], "deposits-1")
    assert first.window_start.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert first.due_time.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 5, tzinfo=UTC)
    assert first.accepted_count == 3
    retry = await request(api, "deposit-50", ["p1", "p2", "p3"], "deposits-1")
    assert retry == first
    assert await results(api) == []  # nothing computed before the window closes

    clock.advance(timedelta(minutes=2))  # 10:03:30: still the same window
    await request(api, "deposit-50", ["p1"], "deposits-2")  # p1's second request
    assert await run_due_batches(pool, settings, clock) == 0
    clock.set(datetime(2026, 11, 22, 10, 5, tzinfo=UTC))
    assert await run_due_batches(pool, settings, clock) == 1  # one job for the window

    found = await results(api, definition_id="deposit-50")
    by_customer = sorted((r.customer_id, r.status, r.amount, r.skip_reason) for r in found)
    assert by_customer == [
        ("p1", pb.BONUS_STATUS_ISSUED, "50", ""), ("p1", pb.BONUS_STATUS_ISSUED, "50", ""),
        ("p2", pb.BONUS_STATUS_ISSUED, "12.25", ""),  # 12.255 rounded down (seed 000)
        ("p3", pb.BONUS_STATUS_SKIPPED, "", "NO_MATCHING_TRANSACTIONS")]
    p2 = next(r for r in found if r.customer_id == "p2")
    assert p2.raw_value == "12.255" and p2.currency == "EUR" and p2.decided_by == "automatic"
    assert p2.source == "api"
    assert [(a.description, a.value, a.count) for a in p2.aggregates] == [
        ("last(deposit.amount)", "24.510000", 1)]
    detail = await stub(api).GetBonusResult(pb.GetBonusResultRequest(bonus_id=p2.bonus_id),
                                            metadata=api.key())
    assert "Result: give 12.25." in detail.result.explanation
    # The events behind it: the deposits of the period (the formula reads no bets).
    assert [(e.kind, e.amount) for e in detail.events] == [("deposit", "24.510000")]
    assert [(e.amount, e.source, e.result_type) for e in await ledger(api, "p2")] == [
        ("12.25", "DYNAMIC_FORMULA", pb.BONUS_RESULT_TYPE_AMOUNT)]
    assert len(await ledger(api, "p1")) == 2 and await ledger(api, "p3") == []

    batches = await stub(api).ListBonusBatches(pb.ListBonusBatchesRequest(
        definition_id="deposit-50"), metadata=api.key())
    [batch] = batches.batches
    assert (batch.request_count, batch.customer_count, batch.events_read) == (4, 3, 3)
    assert batch.finish_time.ToDatetime(UTC) == clock.now()

    async with pool.acquire() as conn:
        emitted = await conn.fetch("SELECT event_type, body FROM webhook_events ORDER BY id")
    kinds = [r["event_type"] for r in emitted]
    assert kinds.count(110) == 1 and kinds.count(111) == 3 and kinds.count(112) == 3
    issued = [json.loads(r["body"])["data"] for r in emitted if r["event_type"] == 112]
    # Messages write the amount with the definition's 2 decimals; the API above says "50".
    assert sorted(d["message"] for d in issued) == [
        "Your bonus of 12.25 EUR", "Your bonus of 50.00 EUR", "Your bonus of 50.00 EUR"]
    assert await run_due_batches(pool, settings, clock) == 0  # the job is done


async def test_request_errors(api: Api, clock: FixedClock) -> None:
    await create(api, definition("d1", LAST_DEPOSIT_50))
    await customers(api, ("p1", "EUR", "UTC"))
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "d1", ["p1", "ghost"], "r1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(caught.value) == "CUSTOMER_NOT_FOUND"
    assert "'ghost'" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "d1", [], "r2")
    assert rpc_error_reason(caught.value) == "MISSING_FIELD"
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "d1", ["p1"], "r3", period_start=ts(clock.now()))
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "d1", ["p1"], "r4", period_start=ts(clock.now() - timedelta(days=40)),
                      period_end=ts(clock.now()))
    assert rpc_error_reason(caught.value) == "PERIOD_TOO_LONG"
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "nope", ["p1"], "r5")
    assert rpc_error_reason(caught.value) == "BONUS_DEFINITION_NOT_FOUND"


# --- seed 004: 10% of weekend deposits, on Monday, in each customer's time zone -----------------


async def test_ten_percent_of_weekend_deposits_in_each_customers_zone(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition(
        "weekend-10", "sum(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND,
        decimals=2, period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_WEEKEND))))
    # Auckland is UTC+13 in November, New York UTC-5: their weekends are 18 hours apart.
    await customers(api, ("akl", "EUR", "Pacific/Auckland"), ("nyc", "EUR", "America/New_York"))
    at = datetime.fromisoformat
    clock.set(at("2026-11-23T06:00:00+00:00"))  # Monday: 19:00 in Auckland, 01:00 in New York
    await events(
        api, "weekend",
        # Friday 11:30 UTC = Saturday 00:30 in Auckland, Friday 06:30 in New York.
        ("akl", "deposit", "100", at("2026-11-20T11:30:00+00:00"), {}),
        ("nyc", "deposit", "100", at("2026-11-20T11:30:00+00:00"), {}),
        # Saturday 20:00 UTC: the weekend in both zones.
        ("akl", "deposit", "33.35", at("2026-11-21T20:00:00+00:00"), {}),
        ("nyc", "deposit", "33.35", at("2026-11-21T20:00:00+00:00"), {}),
        # Monday 02:00 UTC = Monday 15:00 in Auckland, Sunday 21:00 in New York.
        ("akl", "deposit", "50", at("2026-11-23T02:00:00+00:00"), {}),
        ("nyc", "deposit", "50", at("2026-11-23T02:00:00+00:00"), {}))
    await request(api, "weekend-10", ["akl", "nyc"], "monday")
    clock.set(at("2026-11-23T06:05:00+00:00"))
    assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: r for r in await results(api)}
    assert found["akl"].amount == "13.34"  # (100 + 33.35) * 10% = 13.335 -> 13.34
    assert found["nyc"].amount == "8.34"  # (33.35 + 50) * 10% = 8.335 -> 8.34
    assert found["akl"].period_start.ToDatetime(UTC) == at("2026-11-20T11:00:00+00:00")
    assert found["akl"].period_end.ToDatetime(UTC) == at("2026-11-22T11:00:00+00:00")
    assert found["nyc"].period_start.ToDatetime(UTC) == at("2026-11-21T05:00:00+00:00")
    assert found["nyc"].period_end.ToDatetime(UTC) == at("2026-11-23T05:00:00+00:00")


# --- the manual approval queue -------------------------------------------------------------------


async def _manual_setup(api: Api, clock: FixedClock, pool: asyncpg.Pool,
                        settings: Settings) -> dict[str, pb.BonusResult]:
    await create(api, definition(
        "manual-10", "sum(deposit.amount) * 10%", approval_mode=pb.APPROVAL_MODE_MANUAL,
        rounding=ppb.ROUNDING_MODE_ROUND, decimals=2, min_allowed="1",
        calculated_message="A bonus of {{event.bonus_amount}} awaits approval",
        issued_message="Your bonus of {{event.bonus_amount}} is here"))
    await customers(api, ("m1", "EUR", "UTC"), ("m2", "EUR", "UTC"), ("m3", "EUR", "UTC"))
    now = clock.now()
    await events(api, "manual", ("m1", "deposit", "250", now - timedelta(hours=2), {}),
                 ("m2", "deposit", "80.10", now - timedelta(hours=3), {}),
                 ("m3", "deposit", "5", now - timedelta(hours=3), {}))
    await request(api, "manual-10", ["m1", "m2", "m3"], "manual-1", role="admin")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    return {r.customer_id: r for r in await results(api, definition_id="manual-10")}


async def test_manual_results_wait_get_recalculated_and_are_issued_on_approval(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    first = await _manual_setup(api, clock, pool, settings)
    assert {c: (r.status, r.amount, r.skip_reason) for c, r in first.items()} == {
        "m1": (pb.BONUS_STATUS_CALCULATED, "25", ""),
        "m2": (pb.BONUS_STATUS_CALCULATED, "8.01", ""),
        "m3": (pb.BONUS_STATUS_SKIPPED, "", "BELOW_MINIMUM")}  # 0.50 < 1
    assert await ledger(api, "m1") == []
    queue = await results(api, statuses=[pb.BONUS_STATUS_CALCULATED], page_size=1)
    assert len(queue) == 1

    # The operator edits the formula and recalculates everything not yet issued.
    clock.advance(timedelta(minutes=1))
    await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="edit", definition=pb.BonusDefinition(
            definition_id="manual-10", formula="sum(deposit.amount) * 20%",
            approval_mode=pb.APPROVAL_MODE_AUTOMATIC),
        update_mask={"paths": ["formula", "approval_mode"]}), metadata=api.key())
    recalculated = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc-1", definition_id="manual-10"), metadata=api.key())
    assert (recalculated.recalculated_count, recalculated.calculated_count,
            recalculated.skipped_count) == (3, 3, 0)
    after = {r.customer_id: r for r in await results(api, definition_id="manual-10")}
    # Switched to automatic: the earlier results stay in the queue (only new ones are issued).
    assert {c: (r.status, r.amount) for c, r in after.items()} == {
        "m1": (pb.BONUS_STATUS_CALCULATED, "50"), "m2": (pb.BONUS_STATUS_CALCULATED, "16.02"),
        "m3": (pb.BONUS_STATUS_CALCULATED, "1")}
    assert all(after[c].bonus_id == first[c].bonus_id for c in after)
    assert after["m1"].definition_revision == 2
    assert after["m1"].calculate_time.ToDatetime(UTC) == clock.now()

    approved = await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="approve-1", bonus_ids=[after["m1"].bonus_id, after["m2"].bonus_id]),
        metadata=api.key())
    assert [r.status for r in approved.results] == [pb.BONUS_STATUS_ISSUED] * 2
    assert approved.results[0].decided_by == "test-admin"
    rejected = await stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
        request_id="reject-1", bonus_ids=[after["m3"].bonus_id], reason="bonus abuse"),
        metadata=api.key())
    assert rejected.results[0].status == pb.BONUS_STATUS_REJECTED
    assert rejected.results[0].reject_reason == "bonus abuse"
    assert [e.amount for e in await ledger(api, "m1")] == ["50"]
    assert await ledger(api, "m3") == []

    # Approving again, or approving a rejected one, changes nothing.
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="approve-2", bonus_ids=[after["m3"].bonus_id]), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(caught.value) == "BONUS_NOT_AWAITING_APPROVAL"
    retry = await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="approve-1", bonus_ids=[after["m1"].bonus_id, after["m2"].bonus_id]),
        metadata=api.key())
    assert retry == approved
    assert [e.amount for e in await ledger(api, "m1")] == ["50"]

    # Recalculation now has nothing left to do; new requests are issued automatically.
    nothing = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc-2", definition_id="manual-10"), metadata=api.key())
    assert nothing.recalculated_count == 0
    await request(api, "manual-10", ["m1"], "manual-2")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [newest] = await results(api, customer_id="m1", page_size=1)
    assert newest.status == pb.BONUS_STATUS_ISSUED and newest.amount == "50"
    assert [e.amount for e in await ledger(api, "m1")] == ["50", "50"]


async def test_queue_filters_and_pages(api: Api, pool: asyncpg.Pool, settings: Settings,
                                       clock: FixedClock) -> None:
    first = await _manual_setup(api, clock, pool, settings)
    skipped = await results(api, statuses=[pb.BONUS_STATUS_SKIPPED])
    assert [r.customer_id for r in skipped] == ["m3"]
    assert [r.customer_id for r in await results(api, customer_id="m2")] == ["m2"]
    calculated_at = first["m1"].calculate_time
    assert len(await results(api, calculated_after=calculated_at)) == 3
    assert await results(api, calculated_before=calculated_at) == []
    seen: list[str] = []
    token = ""
    while True:
        page = await stub(api).ListBonusResults(pb.ListBonusResultsRequest(
            page_size=2, page_token=token, definition_id="manual-10"), metadata=api.key())
        seen += [r.customer_id for r in page.results]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == ["m1", "m2", "m3"] and len(seen) == 3
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).GetBonusResult(pb.GetBonusResultRequest(bonus_id="nope"),
                                       metadata=api.key())
    assert rpc_error_reason(caught.value) == "INVALID_ID"
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).GetBonusResult(pb.GetBonusResultRequest(), metadata=api.key())
    assert (caught.value.code(), rpc_error_reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")


# --- the Issued event at a real listener ---------------------------------------------------------


@pytest.fixture
async def worker_api(settings: Settings, pool: asyncpg.Pool,
                     clock: FixedClock) -> AsyncIterator[Api]:
    """A server and a real arq worker sharing the pinned clock, set an hour behind real time: arq
    defers jobs by real time, so jobs due on the pinned clock run at once (arq refuses jobs due
    more than a day in the past, and would hold back jobs due in the future)."""
    assert settings.redis_url
    clock.set(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    running = await start_server(settings, Dependencies(pool=pool, clock=clock, redis=redis))
    worker = build_worker(settings, clock=clock, handle_signals=False, run_sweeper=False)
    task = asyncio.create_task(worker.async_run())
    channel = aio.insecure_channel(running.address)
    try:
        yield Api(channel=channel, address=running.address)
    finally:
        await channel.close()
        await worker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await running.stop(0)
        await redis.aclose()


async def test_approval_sends_the_issued_event_to_a_real_listener(
        worker_api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    api = worker_api
    listener = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        listeners = lpb_grpc.ListenerServiceStub(api.channel)
        for event_type in (111, 112):
            await listeners.RegisterListener(lpb.RegisterListenerRequest(
                request_id=f"listener-{event_type}", listener=lpb.Listener(
                    event_type=event_type, url=listener.url, secret=SECRET)),
                metadata=api.key())
        await create(api, definition(
            "vip", "sum(deposit.amount) * 10%", approval_mode=pb.APPROVAL_MODE_MANUAL,
            issued_message="Your bonus of {{event.bonus_amount}} {{event.currency}} is here"))
        await customers(api, ("v1", "EUR", "UTC"))
        await events(api, "vip", ("v1", "deposit", "1234.5", clock.now() - timedelta(hours=1),
                                  {}))
        due = (await request(api, "vip", ["v1"], "vip-1")).due_time.ToDatetime(UTC)
        clock.set(due)  # the window closes: the worker runs the batch job it was queued
        deadline = asyncio.get_running_loop().time() + 15
        while not await results(api):
            assert asyncio.get_running_loop().time() < deadline, "batch not run"
            await asyncio.sleep(0.05)
        [result] = await results(api)
        assert result.status == pb.BONUS_STATUS_CALCULATED and result.amount == "123.45"
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="ok", bonus_ids=[result.bonus_id]), metadata=api.key())

        def received(event_type: int) -> list[dict[str, Any]]:
            bodies = [json.loads(r.body) for r in listener.received
                      if r.verify_error is None and not r.duplicate]
            return [b["data"] for b in bodies if b["event_type"] == event_type]

        deadline = asyncio.get_running_loop().time() + 15
        while not (received(111) and received(112)):
            assert asyncio.get_running_loop().time() < deadline, "events not delivered"
            await asyncio.sleep(0.05)
        [calculated] = received(111)
        assert calculated["bonus_amount"] == "123.45" and calculated["requires_approval"]
        [issued] = received(112)
        assert issued["bonus_id"] == result.bonus_id and issued["customer_id"] == "v1"
        assert issued["formula_id"] == "vip" and issued["amount"] == "123.45"
        assert issued["currency"] == "EUR"
        assert issued["message"] == "Your bonus of 123.45 EUR is here"
        assert Decimal(issued["bonus_amount"]) == Decimal("123.45")
    finally:
        await listener.stop()


# --- triggers: automation rules and schedules ---------------------------------------------------


async def rule(api: Api, message: pb.BonusRule) -> pb.BonusRule:
    response = await stub(api).CreateBonusRule(pb.CreateBonusRuleRequest(
        request_id=f"rule-{message.rule_id}", rule=message), metadata=api.key())
    return response.rule


async def test_five_percent_of_net_loss_every_100_bets_on_gold_quest(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004's first example: an automation rule with accumulation fires every 100 bets on
    Gold Quest; the formula takes 5% of the net loss outside Roulette over those bets."""
    await create(api, definition("net-loss-5", (
        'bets = sum(bet.amount where game_category != "Roulette")\n'
        'wins = sum(win.amount where game_category != "Roulette")\n'
        "(bets - wins) * 5%"), rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    created = await rule(api, pb.BonusRule(
        rule_id="gold-quest-100", definition_id="net-loss-5", event_kind="bet",
        filter='game = "Gold Quest"', every=100,
        period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    assert created.filter == 'game = "Gold Quest"' and created.every == 100
    await customers(api, ("g1", "EUR", "UTC"))
    start = clock.now() - timedelta(hours=2)
    gold = {"game": "Gold Quest", "game_category": "Slots"}
    roulette = {"game": "Lightning", "game_category": "Roulette"}
    rows: list[tuple[str, str, str, datetime, dict[str, str]]] = []
    for i in range(1, 251):
        at = start + timedelta(seconds=10 * i)
        rows.append(("g1", "bet", str(1 + i % 4), at, gold))
        if i % 7 == 0:
            rows.append(("g1", "win", str(i % 5), at + timedelta(seconds=1), gold))
        if i % 25 == 0:
            rows.append(("g1", "bet", "50", at + timedelta(seconds=2), roulette))
            rows.append(("g1", "win", "80", at + timedelta(seconds=3), roulette))
    first_call = [r for r in rows if r[3] < start + timedelta(seconds=1505)]  # bets 1..150
    await events(api, "bets-1", *first_call)
    await events(api, "bets-2", *[r for r in rows if r not in first_call])
    # The same events again under a new request id: stored once, counted once.
    await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(cpb.RecordEventsRequest(
        request_id="bets-2-again", events=[
            cpb.Event(external_id=f"bets-2-{i}", customer_id=c, kind=kind, amount=amount,
                      currency="EUR", occurred_at=ts(when), attributes=attributes)
            for i, (c, kind, amount, when, attributes) in enumerate(
                [r for r in rows if r not in first_call])]), metadata=api.key())
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    found = sorted(await results(api, definition_id="net-loss-5"),
                   key=lambda r: r.period_start.ToDatetime(UTC))
    assert len(found) == 2  # 250 bets: fired at the 100th and the 200th
    for number, result in enumerate(found):
        first_bet = start + timedelta(seconds=10 * (100 * number + 1))
        last_bet = start + timedelta(seconds=10 * (100 * number + 100))
        assert result.period_start.ToDatetime(UTC) == first_bet
        assert result.period_end.ToDatetime(UTC) == last_bet + timedelta(microseconds=1)
        in_period = [r for r in rows if first_bet <= r[3] <= last_bet
                     and r[4]["game_category"] != "Roulette"]
        loss = (sum(Decimal(r[2]) for r in in_period if r[1] == "bet")
                - sum(Decimal(r[2]) for r in in_period if r[1] == "win"))
        expected = (loss * Decimal("0.05")).quantize(Decimal("0.01"))
        assert Decimal(result.amount) == expected
        assert result.status == pb.BONUS_STATUS_ISSUED
        assert result.source == "rule:gold-quest-100"
    async with pool.acquire() as conn:
        state = await conn.fetchrow("SELECT accumulated, fired FROM bonus_rule_states")
    assert tuple(state) == (50, 2)


async def test_qualification_allows_three_executions_then_needs_a_new_deposit(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(
        rule_id="qualified", definition_id="bets-10", event_kind="bet", every=2,
        qualification_kind="deposit", qualification_min_amount="100", max_executions=3,
        period_mode=pb.RULE_PERIOD_MODE_QUALIFICATION_TO_LAST))
    await customers(api, ("q1", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    sequence = [("bet", "5"), ("bet", "5"),  # before any qualification: not counted
                ("deposit", "99.99"),  # below 100 EUR: does not qualify
                ("deposit", "100"),  # qualifies
                *[("bet", str(n)) for n in range(1, 9)],  # fires after bets 2, 4, 6; then stops
                ("deposit", "150"),  # qualifies again
                ("bet", "20"), ("bet", "30")]  # fires a fourth time
    await events(api, "q", *[("q1", kind, amount, t + timedelta(minutes=i), {})
                             for i, (kind, amount) in enumerate(sequence)])
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    found = sorted(await results(api), key=lambda r: r.period_end.ToDatetime(UTC))
    qualified_at = t + timedelta(minutes=3)
    assert [(r.period_start.ToDatetime(UTC), r.amount) for r in found] == [
        (qualified_at, "0.3"),  # bets 1 + 2 since the qualification
        (qualified_at, "1"),  # bets 1..4
        (qualified_at, "2.1"),  # bets 1..6
        (t + timedelta(minutes=12), "5")]  # after the new deposit: 20 + 30
    with pytest.raises(grpc.RpcError) as caught:
        await rule(api, pb.BonusRule(rule_id="bad", definition_id="bets-10", event_kind="bet",
                                     every=2, max_executions=3))
    assert rpc_error_reason(caught.value) == "INVALID_BONUS_RULE"
    assert "max_executions" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        await rule(api, pb.BonusRule(rule_id="bad2", definition_id="bets-10",
                                     event_kind="bet", every=2, filter="game = Gold"))
    assert rpc_error_reason(caught.value) == "FORMULA_SYNTAX"
    assert (caught.value.details() or "").startswith("filter: column 8: ")


async def test_a_rule_window_over_31_days_is_skipped(api: Api, pool: asyncpg.Pool,
                                                    settings: Settings,
                                                    clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(
        rule_id="to-new-year", definition_id="bets-10", event_kind="bet", every=1,
        period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_FIXED_END,
        period_end=ts(datetime(2027, 1, 1, tzinfo=UTC))))
    await customers(api, ("y1", "EUR", "UTC"))
    await events(api, "y", ("y1", "bet", "10", clock.now() - timedelta(minutes=1), {}))
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [result] = await results(api)
    assert result.status == pb.BONUS_STATUS_SKIPPED
    assert result.skip_reason == "INVALID_PERIOD"
    assert "more than the 31 days allowed" in result.skip_detail


async def test_every_monday_ten_percent_of_last_weekends_deposits(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004: "every Monday, 10% of all deposits made during the weekend", as a schedule for
    a set of customers, each customer's weekend in their own time zone."""
    await create(api, definition(
        "weekend-10", "sum(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND,
        decimals=2, period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_WEEKEND))))
    await customers(api, ("akl", "EUR", "Pacific/Auckland"), ("nyc", "EUR", "America/New_York"))
    at = datetime.fromisoformat
    schedule = (await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="monday", schedule=pb.BonusSchedule(
            schedule_id="monday", definition_id="weekend-10", customer_ids=["akl", "nyc"],
            weekday=1, local_time="12:00", time_zone="UTC")), metadata=api.key())).schedule
    assert schedule.next_run_time.ToDatetime(UTC) == at("2026-11-23T12:00:00+00:00")
    clock.set(at("2026-11-23T11:00:00+00:00"))
    await events(api, "weekend",
                 ("akl", "deposit", "100", at("2026-11-20T11:30:00+00:00"), {}),
                 ("nyc", "deposit", "100", at("2026-11-20T11:30:00+00:00"), {}),
                 ("akl", "deposit", "33.35", at("2026-11-21T20:00:00+00:00"), {}),
                 ("nyc", "deposit", "33.35", at("2026-11-21T20:00:00+00:00"), {}),
                 ("akl", "deposit", "50", at("2026-11-23T02:00:00+00:00"), {}),
                 ("nyc", "deposit", "50", at("2026-11-23T02:00:00+00:00"), {}))
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    await run_due_schedules(sweep)  # 11:00: not due
    assert await results(api) == []
    clock.set(at("2026-11-23T12:00:30+00:00"))
    await run_due_schedules(sweep)
    await run_due_schedules(sweep)  # the run happens once
    clock.set(at("2026-11-23T12:05:00+00:00"))
    assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: r.amount for r in await results(api)}
    assert found == {"akl": "13.34", "nyc": "8.34"}
    assert {r.source for r in await results(api)} == {"schedule:monday"}
    listed = await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                metadata=api.key())
    [after] = listed.schedules
    assert after.last_run_time.ToDatetime(UTC) == at("2026-11-23T12:00:00+00:00")
    assert after.next_run_time.ToDatetime(UTC) == at("2026-11-30T12:00:00+00:00")


async def test_rules_and_schedules_can_be_paused_and_resumed(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    created = await rule(api, pb.BonusRule(rule_id="each-bet", definition_id="bets-10",
                                           event_kind="bet", every=1))
    assert created.active
    await customers(api, ("z1", "EUR", "UTC"))

    async def update_rule(request_id: str, active: bool) -> pb.BonusRule:
        return (await stub(api).UpdateBonusRule(pb.UpdateBonusRuleRequest(
            request_id=request_id, rule=pb.BonusRule(rule_id="each-bet", active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())).rule

    assert not (await update_rule("pause", False)).active
    await events(api, "paused", ("z1", "bet", "10", clock.now() - timedelta(minutes=2), {}))
    assert (await update_rule("resume", True)).active
    await events(api, "resumed", ("z1", "bet", "20", clock.now() - timedelta(minutes=1), {}))
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [result] = await results(api)  # only the bet recorded while the rule was active fired
    assert result.amount == "3"  # the definition's own period (1 day back) reads both bets
    with pytest.raises(grpc.RpcError) as caught:  # other edits: test_bonus_trigger_edits.py
        await stub(api).UpdateBonusRule(pb.UpdateBonusRuleRequest(
            request_id="x", rule=pb.BonusRule(rule_id="other-id", active=True),
            update_mask={"paths": ["rule_id"]}), metadata=api.key())
    assert rpc_error_reason(caught.value) == "INVALID_UPDATE_MASK"

    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="daily", schedule=pb.BonusSchedule(
            schedule_id="daily", definition_id="bets-10", customer_ids=["z1"],
            local_time="06:00", time_zone="Europe/Berlin")), metadata=api.key())
    paused = await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
        request_id="pause-daily", schedule=pb.BonusSchedule(schedule_id="daily", active=False),
        update_mask={"paths": ["active"]}), metadata=api.key())
    assert not paused.schedule.active
    clock.advance(timedelta(days=3))
    await run_due_schedules(
        {"pool": pool, "clock": clock, "settings": settings})
    assert len(await results(api)) == 1  # a paused schedule does not run
    resumed = await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
        request_id="resume-daily", schedule=pb.BonusSchedule(schedule_id="daily", active=True),
        update_mask={"paths": ["active"]}), metadata=api.key())
    assert resumed.schedule.active
    assert resumed.schedule.next_run_time.ToDatetime(UTC) > clock.now()  # no catching up
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
            request_id="ghost", schedule=pb.BonusSchedule(schedule_id="ghost", active=True),
            update_mask={"paths": ["active"]}), metadata=api.key())
    assert rpc_error_reason(caught.value) == "BONUS_SCHEDULE_NOT_FOUND"


async def test_a_schedule_for_a_campaigns_approved_target_group(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    from tests.e2e.campaign_helpers import create_campaign, set_statuses
    from tests.e2e.promo_helpers import promotion, reward_type

    await reward_type(api)
    await promotion(api)
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("k1", "EUR", "UTC"), ("k2", "EUR", "UTC"), ("k3", "EUR", "UTC"))
    await events(api, "k", *[(c, "bet", "10", clock.now() - timedelta(hours=1), {})
                             for c in ("k1", "k2", "k3")])
    await create_campaign(api, "weekend", clock.now() + timedelta(days=2),
                          customers=["k1", "k2", "k3", "not-a-customer"])
    await set_statuses(api, "weekend", {"k1": True, "k2": False, "not-a-customer": True}, "s1")
    created = await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="campaign", schedule=pb.BonusSchedule(
            schedule_id="campaign", definition_id="bets-10", campaign_id="weekend",
            local_time="10:30", time_zone="UTC")), metadata=api.key())
    assert created.schedule.campaign_id == "weekend" and not created.schedule.customer_ids
    clock.advance(timedelta(minutes=31))
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    assert [(r.customer_id, r.amount) for r in await results(api)] == [("k1", "1")]
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
            request_id="nope", schedule=pb.BonusSchedule(
                schedule_id="nope", definition_id="bets-10", campaign_id="nope",
                local_time="10:30")), metadata=api.key())
    assert rpc_error_reason(caught.value) == "CAMPAIGN_NOT_FOUND"


async def test_from_campaign_entrance_till_now(api: Api, pool: asyncpg.Pool, settings: Settings,
                                               clock: FixedClock) -> None:
    """Seed 004's "from campaign entrance till now" period: a daily schedule on a campaign's
    approved customers reads their bets since the campaign ran."""
    from tests.e2e.campaign_helpers import create_campaign, set_statuses
    from tests.e2e.promo_helpers import promotion, reward_type

    await reward_type(api)
    await promotion(api)
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("k1", "EUR", "UTC"), ("k2", "EUR", "UTC"))
    execute_at = clock.now() + timedelta(hours=2)  # 12:00
    await create_campaign(api, "vip", execute_at, customers=["k1", "k2"])
    await set_statuses(api, "vip", {"k1": True, "k2": True}, "s1")
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="since", schedule=pb.BonusSchedule(
            schedule_id="since", definition_id="bets-10", campaign_id="vip",
            since_campaign_entrance=True, local_time="11:00", time_zone="UTC")),
        metadata=api.key())
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    await events(api, "before", ("k1", "bet", "100", clock.now() - timedelta(minutes=1), {}))
    clock.set(datetime(2026, 11, 22, 11, 0, 1, tzinfo=UTC))
    await run_due_schedules(sweep)  # the campaign has not run: nobody has entered yet
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 0
    clock.set(execute_at)
    async with pool.acquire() as conn:
        [job_id] = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")]
    assert await run_outbox_job(sweep, job_id) == "done"
    clock.set(datetime(2026, 11, 23, 11, 0, 1, tzinfo=UTC))  # the next day's run
    await events(api, "after", ("k1", "bet", "30", execute_at + timedelta(hours=1), {}),
                 ("k2", "bet", "7.5", execute_at + timedelta(hours=2), {}))
    await run_due_schedules(sweep)
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    found = {r.customer_id: r for r in await results(api)}
    assert {c: r.amount for c, r in found.items()} == {"k1": "3", "k2": "0.75"}
    assert found["k1"].period_start.ToDatetime(UTC) == execute_at
    assert found["k1"].period_end.ToDatetime(UTC) == datetime(2026, 11, 23, 11, 0,
                                                               tzinfo=UTC)


async def test_each_deposit_gets_its_own_fifty_percent_through_a_rule(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """50% of each deposit, exactly: a rule firing on every deposit with the period "first to
    last transaction in the rule" reads only that deposit, even when one customer makes two in
    the same batching window (the batch reads them in two passes)."""
    await create(api, definition("each-deposit-50", "sum(deposit.amount) * 50%",
                                 rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=2))
    await rule(api, pb.BonusRule(rule_id="every-deposit", definition_id="each-deposit-50",
                                 event_kind="deposit", every=1,
                                 period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    await customers(api, ("d1", "EUR", "UTC"), ("d2", "EUR", "UTC"))
    now = clock.now()
    await events(api, "deposits", ("d1", "deposit", "100", now - timedelta(minutes=3), {}),
                 ("d1", "deposit", "24.51", now - timedelta(minutes=2), {}),
                 ("d2", "deposit", "40", now - timedelta(minutes=1), {}),
                 ("d2", "bet", "40", now - timedelta(minutes=1), {}))
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    found = sorted((r.customer_id, r.amount) for r in await results(api))
    assert found == [("d1", "12.25"), ("d1", "50"), ("d2", "20")]
    assert sorted(e.amount for e in await ledger(api, "d1")) == ["12.25", "50"]
    [batch] = (await stub(api).ListBonusBatches(pb.ListBonusBatchesRequest(),
                                                metadata=api.key())).batches
    assert (batch.request_count, batch.customer_count, batch.events_read) == (3, 2, 3)
