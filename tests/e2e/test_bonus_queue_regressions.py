"""Dynamic bonuses against the real stack (server, PostgreSQL, the outbox runner) with a pinned
clock: amounts the results table cannot hold, the decimals a definition may round to, message
templates and how they show amounts, the approval queue's all-or-none decisions, and the events
GetBonusResult shows behind a result.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import promotions_pb2 as ppb
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    ledger,
    request,
    results,
    run_due_batches,
    stub,
)
from workers.outbox import run_outbox_job


async def bonus_events(pool: asyncpg.Pool, event_type: int) -> list[dict[str, Any]]:
    """The ``data`` of every recorded event of the type, oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT body FROM webhook_events WHERE event_type = $1 ORDER BY occurred_at, dedup_key",
            event_type)
    return [json.loads(r["body"])["data"] for r in rows]


async def run_batch_jobs(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    """Each due batch job's outcome ("done", "retry ..."), without asserting it."""
    ctx = {"pool": pool, "clock": clock, "settings": settings}
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch' AND status = 'pending'"
            " AND due_at <= $1 ORDER BY id", clock.now())]
    return [await run_outbox_job(ctx, job_id) for job_id in ids]


async def one_deposit_each(api: Api, clock: FixedClock, *rows: tuple[str, str]) -> None:
    """EUR customers in UTC, each with one deposit (customer_id, amount) an hour ago."""
    await customers(api, *((c, "EUR", "UTC") for c, _ in rows))
    await events(api, f"dep-{rows[0][0]}", *(
        (c, "deposit", amount, clock.now() - timedelta(hours=1), {}) for c, amount in rows))


# --- amounts the results table cannot hold -------------------------------------------------------


async def test_one_customers_huge_amount_does_not_stall_everyone_elses_batch(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Results and the ledger hold amounts up to 14 integer digits (numeric(20,6)). A customer
    whose finished amount is larger is SKIPPED with AMOUNT_TOO_LARGE (and a Skipped event);
    the batch completes at the first attempt and everyone else is computed and issued."""
    await create(api, definition("multiplier", "sum(deposit.amount) * 1000000000"))
    await one_deposit_each(api, clock, ("small", "10"), ("huge", "1000000"))
    await request(api, "multiplier", ["small", "huge"], "r1")
    clock.advance(timedelta(minutes=5))
    outcomes = await run_batch_jobs(pool, settings, clock)
    async with pool.acquire() as conn:
        errors = [r["last_error"] for r in await conn.fetch(
            "SELECT last_error FROM outbox_jobs WHERE kind = 'bonus.batch'")]
    by_customer = {r.customer_id: r for r in await results(api, definition_id="multiplier")}
    assert (outcomes, errors, sorted(by_customer)) == (["done"], [None], ["huge", "small"])
    assert by_customer["small"].status == pb.BONUS_STATUS_ISSUED
    assert by_customer["small"].amount == "10000000000"
    huge = by_customer["huge"]
    assert (huge.status, huge.amount, huge.skip_reason, huge.skip_detail) == (
        pb.BONUS_STATUS_SKIPPED, "", "AMOUNT_TOO_LARGE",
        "1000000000000000 is more than 99999999999999.999999, the largest amount a result "
        "can hold")
    assert [e.amount for e in await ledger(api, "small")] == ["10000000000"]
    assert await ledger(api, "huge") == []
    [skipped] = await bonus_events(pool, 110)
    assert (skipped["customer_id"], skipped["reason"]) == ("huge", "AMOUNT_TOO_LARGE")


async def test_a_recalculation_to_an_amount_too_large_skips_the_result(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Recalculation decides as the batch does: a formula edited to give more than a result
    can hold turns the waiting result into SKIPPED AMOUNT_TOO_LARGE (told by a Skipped event);
    the call succeeds and the other results are recalculated as usual."""
    await create(api, definition("grow", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await one_deposit_each(api, clock, ("g1", "250"), ("g2", "0.001"))
    await request(api, "grow", ["g1", "g2"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="bigger", definition=pb.BonusDefinition(
            definition_id="grow", formula="sum(deposit.amount) * 1000000000000"),
        update_mask={"paths": ["formula"]}), metadata=api.key())
    done = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="again", definition_id="grow"), metadata=api.key())
    assert (done.recalculated_count, done.calculated_count, done.skipped_count) == (2, 1, 1)
    by_customer = {r.customer_id: r for r in await results(api, definition_id="grow")}
    assert (by_customer["g1"].status, by_customer["g1"].skip_reason) == (
        pb.BONUS_STATUS_SKIPPED, "AMOUNT_TOO_LARGE")
    assert (by_customer["g2"].status, by_customer["g2"].amount) == (
        pb.BONUS_STATUS_CALCULATED, "1000000000")
    skipped = [(e["customer_id"], e["reason"]) for e in await bonus_events(pool, 110)]
    assert skipped == [("g1", "AMOUNT_TOO_LARGE")]


@pytest.mark.parametrize("decimals", [7, 8])
async def test_a_definition_rounding_to_more_than_six_decimals_is_refused(
        api: Api, decimals: int) -> None:
    """Results and the ledger store 6 decimal places, so a definition may round to 0-6 (the
    rounding core allows 8): more would be rounded again by PostgreSQL when written, and the
    issued amount would differ from the one announced. Refused on create and on update:
    INVALID_ARGUMENT INVALID_ROUNDING naming the field decimals."""
    for call in ("create", "update"):
        with pytest.raises(grpc.RpcError) as caught:
            if call == "create":
                await create(api, definition("fine", "sum(deposit.amount) * 1.23456789",
                                             rounding=ppb.ROUNDING_MODE_ROUND_DOWN,
                                             decimals=decimals))
            else:
                await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
                    request_id=f"more-{decimals}", definition=pb.BonusDefinition(
                        definition_id="fine", decimals=decimals),
                    update_mask={"paths": ["decimals"]}), metadata=api.key())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info_of(caught.value)
        assert info is not None
        assert (info.reason, info.metadata["field"]) == ("INVALID_ROUNDING", "decimals")
        assert caught.value.details() == (
            "decimals must be between 0 and 6 for a bonus definition (amounts are stored with "
            f"6 decimal places), got {decimals}")
        if call == "create":
            await create(api, definition("fine", "sum(deposit.amount) * 1.23456789",
                                         rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=6))


async def test_an_amount_with_six_decimals_is_issued_as_calculated(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """With 6 decimals the stored, listed, ledgered and told amounts are all the one rounding
    gave: ROUND_DOWN of 1.23456789 is 1.234567 everywhere."""
    await create(api, definition("fine", "sum(deposit.amount) * 1.23456789",
                                 rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=6,
                                 issued_message="{{event.bonus_amount}}"))
    await one_deposit_each(api, clock, ("f1", "1"))
    await request(api, "fine", ["f1"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    [issued] = await bonus_events(pool, 112)
    [entry] = await ledger(api, "f1")
    [result] = await results(api, definition_id="fine")
    assert (issued["amount"], issued["bonus_amount"], issued["message"]) == (
        "1.234567", "1.234567", "1.234567")
    assert (result.amount, entry.amount) == ("1.234567", "1.234567")


# --- message templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    "Your bonus of {{event.bonus_amount} EUR",
    "Your bonus of {event.bonus_amount}} EUR",
    "Your bonus of {{event.bonus_amount EUR",
])
async def test_a_placeholder_with_a_missing_brace_is_refused(api: Api, template: str) -> None:
    """A placeholder missing a brace is refused when the template is saved (INVALID_MESSAGE_
    TEMPLATE naming the field and the character where the broken placeholder starts), so it
    never reaches a customer as literal braces."""
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("typo", "sum(deposit.amount) * 10%",
                                     issued_message=template))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(caught.value)
    assert info is not None
    assert (info.reason, info.metadata["field"]) == ("INVALID_MESSAGE_TEMPLATE", "issued_message")
    assert "at character 15;" in (caught.value.details() or "")


@pytest.mark.parametrize(("rounding", "decimals", "factor", "deposit", "told", "listed"), [
    (ppb.ROUNDING_MODE_ROUND, 2, "", "25", "2.50", "2.5"),
    (ppb.ROUNDING_MODE_ROUND, 0, "", "25", "3", "3"),
    (ppb.ROUNDING_MODE_MROUND, 2, "5", "240", "25.00", "25"),
    (ppb.ROUNDING_MODE_MROUND, 0, "0.5", "25", "2.5", "2.5"),
    (ppb.ROUNDING_MODE_NONE, 0, "", "25", "2.5", "2.5"),
])
async def test_the_message_shows_the_amount_with_the_definitions_decimals(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock, rounding: int,
        decimals: int, factor: str, deposit: str, told: str, listed: str) -> None:
    """Events (``amount``, ``bonus_amount``) and their messages write a rounded amount with the
    definition's decimals (MROUND: at least the factor's places), as core.rounding gives it:
    10% of 25 rounded to 2 decimals is told "2.50 EUR". Without rounding the amount is told
    without trailing zeros. The API's results and ledger keep the plain number ("2.5")."""
    await create(api, definition(
        "cents", "sum(deposit.amount) * 10%", rounding=rounding, decimals=decimals,
        rounding_factor=factor,
        issued_message="Your bonus of {{event.bonus_amount}} {{event.currency}} is here"))
    await one_deposit_each(api, clock, ("c1", deposit))
    await request(api, "cents", ["c1"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    [calculated] = await bonus_events(pool, 111)
    [issued] = await bonus_events(pool, 112)
    assert (calculated["amount"], calculated["bonus_amount"]) == (told, told)
    assert (issued["amount"], issued["bonus_amount"]) == (told, told)
    assert issued["message"] == f"Your bonus of {told} EUR is here"
    [result] = await results(api, definition_id="cents")
    assert result.amount == listed
    assert [e.amount for e in await ledger(api, "c1")] == [listed]


async def test_placeholders_are_substituted_once_and_never_evaluated(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A value that itself looks like a placeholder (a template name chosen by the operator)
    is written as it is, not substituted again; values absent from an event (the amount of a
    skip, the template of an amount) become empty text."""
    await create(api, definition(
        "tpl", 'if sum(deposit.amount) > 100 then template("{{event.customer_id}} spins") '
               'else skip',
        result_type=pb.BONUS_RESULT_TYPE_BONUS_TEMPLATE,
        issued_message="[{{event.bonus_template}}|{{ event.bonus_amount }}|{{event.status}}]",
        skipped_message="[{{event.reason}}|{{event.bonus_amount}}|{{event.customer_id}}]"))
    await one_deposit_each(api, clock, ("t1", "150"), ("t2", "50"))
    await request(api, "tpl", ["t1", "t2"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    [issued] = await bonus_events(pool, 112)
    [skipped] = await bonus_events(pool, 110)
    assert issued["message"] == "[{{event.customer_id}} spins||ISSUED]"
    assert skipped["message"] == "[EXPLICIT_SKIP||t2]"


# --- approve / reject ----------------------------------------------------------------------------


async def manual_results(api: Api, pool: asyncpg.Pool, settings: Settings,
                         clock: FixedClock) -> dict[str, pb.BonusResult]:
    """manual-10 (10% of deposits, manual approval, min 1): q1 and q2 CALCULATED (25, 8),
    q3 SKIPPED (0.5 below the minimum)."""
    await create(api, definition("manual-10", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL, min_allowed="1"))
    await one_deposit_each(api, clock, ("q1", "250"), ("q2", "80"), ("q3", "5"))
    await request(api, "manual-10", ["q1", "q2", "q3"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    return {r.customer_id: r for r in await results(api, definition_id="manual-10")}


@pytest.mark.parametrize("call", ["approve", "reject"])
@pytest.mark.parametrize("spelling", [str.upper, lambda text: text.replace("-", "")])
async def test_the_same_bonus_twice_in_one_decision_is_refused(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock, call: str,
        spelling: Any) -> None:
    """bonus_ids are compared as UUIDs: one result named twice, even in another case or
    without hyphens, is INVALID_ARGUMENT DUPLICATE_ID; nothing is issued or rejected, no event
    is recorded, the result still waits. An id that is not a UUID is INVALID_ID."""
    first = await manual_results(api, pool, settings, clock)
    bonus_id = first["q1"].bonus_id
    ids = [bonus_id, spelling(bonus_id)]
    assert ids[0] != ids[1]
    decide = (stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="twice", bonus_ids=ids), metadata=api.key()) if call == "approve" else
        stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
            request_id="twice", bonus_ids=ids, reason="abuse"), metadata=api.key()))
    with pytest.raises(grpc.RpcError) as caught:
        await decide
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "DUPLICATE_ID"
    assert await ledger(api, "q1") == []
    assert await bonus_events(pool, 112) == []
    [still] = await results(api, customer_id="q1")
    assert still.status == pb.BONUS_STATUS_CALCULATED
    with pytest.raises(grpc.RpcError) as bad:
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="bad", bonus_ids=[bonus_id, "nope"]), metadata=api.key())
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(bad.value) == "INVALID_ID"
    assert bad.value.details() == "bonus_ids: 'nope' is not a bonus id (a UUID)"


async def test_an_approval_naming_one_result_not_waiting_changes_nothing(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """All or none: a SKIPPED result among CALCULATED ones refuses the whole call (naming the
    one at fault); nothing is issued, no Issued event is recorded, the others still wait. The
    same request id with another payload is refused (REQUEST_ID_REUSED)."""
    first = await manual_results(api, pool, settings, clock)
    ids = [first["q1"].bonus_id, first["q3"].bonus_id, first["q2"].bonus_id]
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="mixed", bonus_ids=ids), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(caught.value) == "BONUS_NOT_AWAITING_APPROVAL"
    assert first["q3"].bonus_id in (caught.value.details() or "")
    assert await ledger(api, "q1") == [] and await ledger(api, "q2") == []
    assert await bonus_events(pool, 112) == []
    waiting = await results(api, statuses=[pb.BONUS_STATUS_CALCULATED])
    assert sorted(r.customer_id for r in waiting) == ["q1", "q2"]

    ok = [first["q1"].bonus_id, first["q2"].bonus_id]
    approved = await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="fixed", bonus_ids=ok), metadata=api.key())
    assert [r.customer_id for r in approved.results] == ["q1", "q2"]
    with pytest.raises(grpc.RpcError) as other:
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="fixed", bonus_ids=ok[:1]), metadata=api.key())
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(other.value) == "REQUEST_ID_REUSED"
    assert [e.amount for e in await ledger(api, "q1")] == ["25"]
    assert len(await bonus_events(pool, 112)) == 2


async def test_a_reject_reason_is_kept_and_a_rejected_result_is_never_recalculated(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A rejection keeps its reason and decider; a recalculation leaves it (and the ledger)
    alone and counts only the results still open; a too long reason changes nothing."""
    first = await manual_results(api, pool, settings, clock)
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
            request_id="long", bonus_ids=[first["q1"].bonus_id], reason="x" * 501),
            metadata=api.key())
    assert rpc_error_reason(caught.value) == "INVALID_REASON"
    rejected = await stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
        request_id="no", bonus_ids=[first["q1"].bonus_id], reason="bonus abuse"),
        metadata=api.key())
    [r] = rejected.results
    assert (r.status, r.reject_reason, r.decided_by) == (
        pb.BONUS_STATUS_REJECTED, "bonus abuse", "test-admin")
    done = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="again", definition_id="manual-10"), metadata=api.key())
    assert (done.recalculated_count, done.calculated_count, done.skipped_count) == (2, 1, 1)
    [still] = await results(api, customer_id="q1")
    assert (still.status, still.reject_reason, still.amount) == (
        pb.BONUS_STATUS_REJECTED, "bonus abuse", "25")
    assert await ledger(api, "q1") == []
    # Each open result is told again, under a dedup key of its own (calculated:2 / skipped:2).
    calculated = [e["customer_id"] for e in await bonus_events(pool, 111)]
    skipped = [e["customer_id"] for e in await bonus_events(pool, 110)]
    assert sorted(calculated) == ["q1", "q2", "q2"] and skipped == ["q3", "q3"]


# --- GetBonusResult -----------------------------------------------------------------------------


async def test_the_events_behind_a_result_show_attributes_as_recorded(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """GetBonusResult lists "the details of the underlying transactions" (seed 004) with their
    attributes as recorded: numeric-looking text ("007", "1.0e3") is shown as it was sent,
    not as the number formulas compare it as."""
    await create(api, definition("attrs", "sum(deposit.amount) * 10%"))
    await customers(api, ("a1", "EUR", "UTC"))
    await events(api, "attrs", ("a1", "deposit", "100", clock.now() - timedelta(hours=1),
                                {"game_id": "007", "note": "first", "stake": "1.0e3"}))
    await request(api, "attrs", ["a1"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    [result] = await results(api, definition_id="attrs")
    shown = await stub(api).GetBonusResult(pb.GetBonusResultRequest(bonus_id=result.bonus_id),
                                           metadata=api.key())
    [event] = shown.events
    assert (event.kind, Decimal(event.amount)) == ("deposit", Decimal(100))
    assert dict(event.attributes) == {"game_id": "007", "note": "first", "stake": "1.0e3"}
