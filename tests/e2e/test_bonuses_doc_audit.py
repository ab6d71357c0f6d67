"""docs/bonuses.md, statement by statement, through the real API with a pinned clock: the
statements the other bonus tests leave untested (events and messages, recalculation, list
order, limits, variables, periods, the events behind a result, rules)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import promotions_pb2 as ppb
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    ledger,
    request,
    results,
    rule,
    run_due_batches,
    stub,
)

ALL_PLACEHOLDERS = ("{{event.reason}}|{{event.bonus_amount}}|{{event.currency}}|"
                    "{{event.bonus_template}}|{{event.status}}|{{event.customer_id}}|"
                    "{{event.formula_id}}|{{event.result_type}}|{{event.bonus_id}}")


async def event_data(pool: asyncpg.Pool, event_type: int) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT body FROM webhook_events WHERE event_type = $1 ORDER BY id", event_type)
    return [json.loads(r["body"])["data"] for r in rows]


async def update(api: Api, request_id: str, message: pb.BonusDefinition,
                 *paths: str) -> pb.BonusDefinition:
    response = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id=request_id, definition=message, update_mask={"paths": list(paths)}),
        metadata=api.key())
    return response.definition


async def deposit_and_compute(api: Api, pool: asyncpg.Pool, settings: Settings,
                              clock: FixedClock, definition_id: str,
                              *rows: tuple[str, str]) -> dict[str, pb.BonusResult]:
    """EUR customers in UTC, one deposit each an hour ago, one request, the batch run."""
    await customers(api, *((c, "EUR", "UTC") for c, _ in rows))
    deposits = [(c, "deposit", amount, clock.now() - timedelta(hours=1), {})
                for c, amount in rows if amount]
    if deposits:
        await events(api, f"dep-{definition_id}", *deposits)
    await request(api, definition_id, [c for c, _ in rows], f"req-{definition_id}")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    return {r.customer_id: r for r in await results(api, definition_id=definition_id)}


# --- events and messages ---------------------------------------------------------------------


async def test_a_skipped_event_has_no_amount_and_its_message_renders_missing_values_empty(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Skipped events carry no amount and no currency; {{event.bonus_amount}} and
    {{event.currency}} in skipped_message are empty; the reason is the result's skip_reason."""
    await create(api, definition("skip-msg", "sum(deposit.amount) * 10%",
                                 skipped_message=ALL_PLACEHOLDERS))
    found = await deposit_and_compute(api, pool, settings, clock, "skip-msg", ("s1", ""))
    result = found["s1"]
    assert (result.status, result.skip_reason) == (pb.BONUS_STATUS_SKIPPED,
                                                    "NO_MATCHING_TRANSACTIONS")
    [data] = await event_data(pool, 110)
    assert "amount" not in data and "currency" not in data
    assert data["reason"] == "NO_MATCHING_TRANSACTIONS" and data["status"] == "SKIPPED"
    assert data["detail"]
    assert data["message"] == (f"NO_MATCHING_TRANSACTIONS||||SKIPPED|s1|skip-msg|AMOUNT|"
                               f"{result.bonus_id}")


async def test_issued_amount_events_render_reason_and_template_empty(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """An automatically issued result: a Calculated event with requires_approval false and an
    Issued event; {{event.reason}} outside skipped_message and {{event.bonus_template}} for an
    amount are empty; the amount has the definition's decimals ("2.50"), the API "2.5"."""
    await create(api, definition("auto-msg", "sum(deposit.amount) * 10%",
                                 rounding=ppb.ROUNDING_MODE_ROUND, decimals=2,
                                 calculated_message=ALL_PLACEHOLDERS,
                                 issued_message=ALL_PLACEHOLDERS))
    found = await deposit_and_compute(api, pool, settings, clock, "auto-msg", ("a1", "25"))
    result = found["a1"]
    assert (result.status, result.amount) == (pb.BONUS_STATUS_ISSUED, "2.5")
    [calculated] = await event_data(pool, 111)
    [issued] = await event_data(pool, 112)
    assert calculated["requires_approval"] is False
    for data in (calculated, issued):
        assert (data["amount"], data["bonus_amount"], data["currency"]) == ("2.50", "2.50",
                                                                           "EUR")
    assert issued["status"] == "ISSUED"
    assert issued["message"] == f"|2.50|EUR||ISSUED|a1|auto-msg|AMOUNT|{result.bonus_id}"
    assert [e.amount for e in await ledger(api, "a1")] == ["2.5"]


async def test_mround_events_write_at_least_the_factors_places(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """MROUND(34.75, 0.1) is 34.8 with 0 or 1 decimals, 34.80 with 2 (events); the API writes
    the plain number."""
    for decimals in (0, 2):
        await create(api, definition(f"mround-{decimals}", "last(deposit.amount) * 50%",
                                     rounding=ppb.ROUNDING_MODE_MROUND, rounding_factor="0.1",
                                     decimals=decimals,
                                     issued_message="{{event.bonus_amount}}"))
        await customers(api, (f"r{decimals}", "EUR", "UTC"))
        await events(api, f"dep-{decimals}", (f"r{decimals}", "deposit", "69.5",
                                              clock.now() - timedelta(hours=1), {}))
        await request(api, f"mround-{decimals}", [f"r{decimals}"], f"req-{decimals}")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 2
    assert sorted(r.amount for r in await results(api)) == ["34.8", "34.8"]
    messages = {d["customer_id"]: d["message"] for d in await event_data(pool, 112)}
    assert messages == {"r0": "34.8", "r2": "34.80"}


async def test_a_result_calculated_before_decimals_were_lowered_keeps_its_places(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """"Zeros are only ever added: a result calculated before the definition's decimals were
    lowered keeps its places when approved.\""""
    await create(api, definition("lowered", "sum(deposit.amount) * 10%",
                                 rounding=ppb.ROUNDING_MODE_ROUND, decimals=3,
                                 approval_mode=pb.APPROVAL_MODE_MANUAL,
                                 issued_message="{{event.bonus_amount}}"))
    found = await deposit_and_compute(api, pool, settings, clock, "lowered", ("l1", "23.45"))
    assert found["l1"].amount == "2.345"
    await update(api, "lower", pb.BonusDefinition(definition_id="lowered", decimals=1),
                 "decimals")
    await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="approve", bonus_ids=[found["l1"].bonus_id]), metadata=api.key())
    [issued] = await event_data(pool, 112)
    assert (issued["amount"], issued["message"]) == ("2.345", "2.345")
    assert [e.amount for e in await ledger(api, "l1")] == ["2.345"]


# --- recalculation ----------------------------------------------------------------------------


async def test_recalculation_touches_only_skipped_and_calculated_and_tells_each_again(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("recalc", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL, min_allowed="1"))
    found = await deposit_and_compute(api, pool, settings, clock, "recalc",
                                      ("c1", "100"), ("c2", "100"), ("c3", "100"),
                                      ("c4", "5"))
    assert found["c4"].skip_reason == "BELOW_MINIMUM"
    await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="ok", bonus_ids=[found["c1"].bonus_id]), metadata=api.key())
    await stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
        request_id="no", bonus_ids=[found["c2"].bonus_id], reason="abuse"), metadata=api.key())
    before_calculated = len(await event_data(pool, 111))
    before_skipped = len(await event_data(pool, 110))
    clock.advance(timedelta(minutes=1))
    edited = await update(api, "edit", pb.BonusDefinition(
        definition_id="recalc", formula="sum(deposit.amount) * 30%"), "formula")
    assert edited.revision == 2
    done = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc-1", definition_id="recalc"), metadata=api.key())
    assert (done.recalculated_count, done.calculated_count, done.skipped_count) == (2, 2, 0)
    after = {r.customer_id: r for r in await results(api, definition_id="recalc")}
    assert {c: (r.status, r.amount, r.definition_revision) for c, r in after.items()} == {
        "c1": (pb.BONUS_STATUS_ISSUED, "10", 1), "c2": (pb.BONUS_STATUS_REJECTED, "10", 1),
        "c3": (pb.BONUS_STATUS_CALCULATED, "30", 2), "c4": (pb.BONUS_STATUS_CALCULATED, "1.5", 2)}
    assert all(after[c].bonus_id == found[c].bonus_id for c in after)
    calculated = await event_data(pool, 111)
    assert len(calculated) == before_calculated + 2
    assert sorted((d["customer_id"], d["amount"]) for d in calculated[before_calculated:]) == [
        ("c3", "30"), ("c4", "1.5")]
    assert len(await event_data(pool, 110)) == before_skipped
    # Edited again so that both skip: each is told again, as Skipped.
    await update(api, "edit-2", pb.BonusDefinition(
        definition_id="recalc", formula="sum(deposit.amount) * 0"), "formula")
    done = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc-2", definition_id="recalc"), metadata=api.key())
    assert (done.recalculated_count, done.calculated_count, done.skipped_count) == (2, 0, 2)
    skipped = await event_data(pool, 110)
    assert sorted(d["customer_id"] for d in skipped[before_skipped:]) == ["c3", "c4"]
    assert {d["reason"] for d in skipped[before_skipped:]} == {"ZERO_OR_NEGATIVE"}


# --- list order and limits ---------------------------------------------------------------------


async def test_results_and_ledger_are_listed_newest_first(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("order", "sum(deposit.amount) * 10%"))
    await customers(api, ("o1", "EUR", "UTC"))
    await events(api, "o", ("o1", "deposit", "10", clock.now() - timedelta(hours=1), {}))
    times = []
    for n in range(3):
        await request(api, "order", ["o1"], f"o-{n}")
        clock.advance(timedelta(minutes=5))
        assert await run_due_batches(pool, settings, clock) == 1
        times.append(clock.now())
    listed = await results(api, customer_id="o1")
    assert [r.calculate_time.ToDatetime(UTC) for r in listed] == times[::-1]
    entries = await ledger(api, "o1")
    assert [e.issue_time.ToDatetime(UTC) for e in entries] == times[::-1]
    assert [e.bonus_id for e in entries] == [r.bonus_id for r in listed]
    # calculate_time in [calculated_after, calculated_before)
    middle = await results(api, calculated_after=ts(times[1]), calculated_before=ts(times[2]))
    assert [r.calculate_time.ToDatetime(UTC) for r in middle] == [times[1]]


async def test_a_decision_on_more_than_1000_results_is_refused(api: Api) -> None:
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(1001)]
    for call, message in (
            (stub(api).ApproveBonusResults,
             pb.ApproveBonusResultsRequest(request_id="too-many", bonus_ids=ids)),
            (stub(api).RejectBonusResults,
             pb.RejectBonusResultsRequest(request_id="too-many", bonus_ids=ids)),
            (stub(api).ApproveBonusResults,
             pb.ApproveBonusResultsRequest(request_id="none", bonus_ids=[]))):
        with pytest.raises(grpc.RpcError) as caught:
            await call(message, metadata=api.key())  # type: ignore[operator]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_for_more_than_10000_customers_is_refused(api: Api) -> None:
    await create(api, definition("many", "sum(deposit.amount) * 10%"))
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "many", [f"c{n}" for n in range(10_001)], "too-many")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_definitions_own_batch_window(api: Api, clock: FixedClock) -> None:
    """batch_window_seconds: this definition's window (0: the default, 300)."""
    await create(api, definition("window-60", "sum(deposit.amount) * 10%",
                                 batch_window_seconds=60))
    await create(api, definition("window-default", "sum(deposit.amount) * 10%"))
    await customers(api, ("w1", "EUR", "UTC"))
    clock.set(datetime(2026, 11, 22, 10, 2, 30, tzinfo=UTC))
    own = await request(api, "window-60", ["w1"], "w-60")
    assert own.window_start.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 2, tzinfo=UTC)
    assert own.due_time.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 3, tzinfo=UTC)
    default = await request(api, "window-default", ["w1"], "w-default")
    assert default.window_start.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert default.due_time.ToDatetime(UTC) == datetime(2026, 11, 22, 10, 5, tzinfo=UTC)


# --- definitions --------------------------------------------------------------------------------


async def test_variables_in_another_order_are_no_new_revision(api: Api) -> None:
    """Variables are returned in name order; the same variables in another order are no change
    (no new revision); other values are."""
    variables = [fpb.FormulaVariable(name="rate", value="0.5"),
                 fpb.FormulaVariable(name="max_bonus", per_currency={"USD": "250", "EUR": "200"})]
    created = await create(api, definition("vars", "cap(sum(deposit.amount) * rate, max_bonus)",
                                           variables=variables))
    assert [v.name for v in created.variables] == ["max_bonus", "rate"]
    same = await update(api, "same", pb.BonusDefinition(definition_id="vars",
                                                        variables=variables[::-1]), "variables")
    assert same.revision == 1
    other = await update(api, "other", pb.BonusDefinition(
        definition_id="vars", variables=[variables[1], fpb.FormulaVariable(name="rate",
                                                                           value="0.6")]),
        "variables")
    assert other.revision == 2


@pytest.mark.parametrize("variables", [
    [fpb.FormulaVariable(name=f"v{n}", value="1") for n in range(51)],
    [fpb.FormulaVariable(name="rate", value="1_000")],
    [fpb.FormulaVariable(name="sum", value="1")],
    [fpb.FormulaVariable(name="rate", value="123456789012345")],
    [fpb.FormulaVariable(name="rate", value="0.1234567")],
])
async def test_bad_variables_are_invalid_variable(api: Api,
                                                  variables: list[fpb.FormulaVariable]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("bad-vars", "sum(deposit.amount) * 10%",
                                     variables=variables))
    assert rpc_error_reason(caught.value) == "INVALID_VARIABLE"


async def test_a_fixed_month_across_dst_in_its_zone_is_31_days(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Fixed dates with a time_zone are measured in that zone's wall-clock time: October 2026
    in Berlin (31 days and 1 hour of UTC) is accepted and computed."""
    berlin = fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
        start=ts(datetime(2026, 9, 30, 22, tzinfo=UTC)),  # 2026-10-01 00:00 Berlin
        end=ts(datetime(2026, 10, 31, 23, tzinfo=UTC)),  # 2026-11-01 00:00 Berlin
        time_zone="Europe/Berlin"))
    await create(api, definition("october", "sum(deposit.amount) * 10%", period=berlin))
    await customers(api, ("b1", "EUR", "UTC"))
    await events(api, "oct", ("b1", "deposit", "100", datetime(2026, 10, 15, tzinfo=UTC), {}))
    await request(api, "october", ["b1"], "oct-1")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [result] = await results(api)
    assert (result.status, result.amount, result.skip_reason) == (pb.BONUS_STATUS_ISSUED, "10",
                                                                  "")
    utc_month = fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
        start=ts(datetime(2026, 9, 30, 22, tzinfo=UTC)),
        end=ts(datetime(2026, 10, 31, 23, tzinfo=UTC))))
    with pytest.raises(grpc.RpcError) as caught:  # without a zone: UTC, over 31 days
        await create(api, definition("october-utc", "sum(deposit.amount) * 10%",
                                     period=utc_month))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_without_rounding_amounts_keep_six_places_half_up(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Without rounding, amounts keep 6 decimal places, rounded half up; 0 at 6 places is
    ZERO_OR_NEGATIVE. A create without rounding and decimals stores 2."""
    created = await create(api, definition("tiny", "last(deposit.amount) * 0.0000001"))
    assert created.decimals == 2
    found = await deposit_and_compute(api, pool, settings, clock, "tiny",
                                      ("z1", "1"), ("z2", "5"), ("z3", "123.45"))
    assert (found["z1"].status, found["z1"].skip_reason) == (pb.BONUS_STATUS_SKIPPED,
                                                              "ZERO_OR_NEGATIVE")
    assert (found["z2"].status, found["z2"].amount) == (pb.BONUS_STATUS_ISSUED, "0.000001")
    assert found["z3"].amount == "0.000012"


async def test_cap_after_rounding_and_minimum(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("capped", "last(deposit.amount) * 1", cap_amount="200",
                                 min_allowed="10", rounding=ppb.ROUNDING_MODE_ROUND_UP,
                                 decimals=0))
    found = await deposit_and_compute(api, pool, settings, clock, "capped",
                                      ("k1", "1000"), ("k2", "9.01"), ("k3", "8.99"))
    assert found["k1"].amount == "200"
    assert found["k2"].amount == "10"  # rounded up to 10 before the minimum
    assert found["k3"].skip_reason == "BELOW_MINIMUM"  # 9 < 10


@pytest.mark.parametrize("definition_id", ["a" * 64, "0._-x"])
async def test_a_definition_id_is_1_to_64_of_the_documented_characters(
        api: Api, definition_id: str) -> None:
    """"`definition_id`: 1-64 of `a-z 0-9 _ . -`, starting with a letter or digit"."""
    created = await create(api, definition(definition_id, "sum(deposit.amount) * 10%"))
    assert created.definition_id == definition_id


@pytest.mark.parametrize("definition_id", ["_private", "-dash", ".dot"])
async def test_a_definition_id_starts_with_a_letter_or_digit(
        api: Api, definition_id: str) -> None:
    """The audit found the docs silent on the first character; the rule is documented now."""
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition(definition_id, "sum(deposit.amount) * 10%"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_ID"
    assert "starting with a letter or digit" in (caught.value.details() or "")


async def test_a_65_character_definition_id_is_refused(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("a" * 65, "sum(deposit.amount) * 10%"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_bad_message_template_names_its_field(api: Api) -> None:
    for field in ("skipped_message", "calculated_message", "issued_message"):
        with pytest.raises(grpc.RpcError) as caught:
            await create(api, definition("bad-msg", "sum(deposit.amount) * 10%",
                                         **{field: "Hi {{event.amount}}"}))
        info = error_info_of(caught.value)
        assert info is not None and info.reason == "INVALID_MESSAGE_TEMPLATE"
        assert info.metadata["field"] == field
        assert "4" in (caught.value.details() or "")
    # Single braces are plain text.
    created = await create(api, definition("ok-msg", "sum(deposit.amount) * 10%",
                                           issued_message="{x} {{event.status}} }"))
    assert created.issued_message == "{x} {{event.status}} }"


# --- the events behind a result ------------------------------------------------------------------


async def test_the_events_behind_a_result_follow_its_where_filters(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """With sum(bet.amount where game_category != "Roulette") a Roulette bet is not listed; a
    result of an earlier revision (not recalculated) lists the events of the kinds it read."""
    await create(api, definition("no-roulette",
                                 'sum(bet.amount where game_category != "Roulette") * 10%',
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("e1", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "bets", ("e1", "bet", "10", t, {"game_category": "Slots"}),
                 ("e1", "bet", "50", t + timedelta(minutes=1), {"game_category": "Roulette"}),
                 ("e1", "deposit", "70", t + timedelta(minutes=2), {}))
    await request(api, "no-roulette", ["e1"], "r")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [result] = await results(api)
    assert result.amount == "1"
    detail = await stub(api).GetBonusResult(pb.GetBonusResultRequest(bonus_id=result.bonus_id),
                                            metadata=api.key())
    assert [(e.kind, e.attributes["game_category"]) for e in detail.events] == [
        ("bet", "Slots")]
    await update(api, "edit", pb.BonusDefinition(
        definition_id="no-roulette", formula='sum(bet.amount where game_category = "X") * 10%'),
        "formula")
    detail = await stub(api).GetBonusResult(pb.GetBonusResultRequest(bonus_id=result.bonus_id),
                                            metadata=api.key())
    assert sorted(e.attributes["game_category"] for e in detail.events) == ["Roulette", "Slots"]


# --- rules ---------------------------------------------------------------------------------------


async def test_a_re_sent_event_is_not_counted_twice_and_unqualified_events_never_count(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="every-2", definition_id="bets-10", event_kind="bet",
                                 every=2))
    await rule(api, pb.BonusRule(rule_id="after-deposit", definition_id="bets-10",
                                 event_kind="bet", every=2, qualification_kind="deposit"))
    await customers(api, ("x1", "EUR", "UTC"))
    t = clock.now() - timedelta(minutes=30)
    one_bet = cpb.RecordEventsRequest(request_id="bet-1", events=[cpb.Event(
        external_id="bet-1", customer_id="x1", kind="bet", amount="5", currency="EUR",
        occurred_at=ts(t))])
    customers_stub = cpb_grpc.CustomerServiceStub(api.channel)
    await customers_stub.RecordEvents(one_bet, metadata=api.key())
    again = cpb.RecordEventsRequest()
    again.CopyFrom(one_bet)
    again.request_id = "bet-1-again"
    await customers_stub.RecordEvents(again, metadata=api.key())
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 0
    # The deposit qualifies; the bet before it was not counted by the qualified rule.
    await events(api, "later", ("x1", "deposit", "1", t + timedelta(minutes=1), {}),
                 ("x1", "bet", "5", t + timedelta(minutes=2), {}))
    async with pool.acquire() as conn:
        sources = sorted(r["source"] for r in await conn.fetch(
            "SELECT source FROM bonus_requests"))
    assert sources == ["rule:every-2"]


async def test_a_paused_rule_does_not_count_but_keeps_its_counts(
        api: Api, pool: asyncpg.Pool) -> None:
    """"a paused rule does not count events (counts are kept)"."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="every-2", definition_id="bets-10", event_kind="bet",
                                 every=2))
    await customers(api, ("p1", "EUR", "UTC"))

    async def set_active(request_id: str, active: bool) -> None:
        await stub(api).UpdateBonusRule(pb.UpdateBonusRuleRequest(
            request_id=request_id, rule=pb.BonusRule(rule_id="every-2", active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())

    t = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    await events(api, "one", ("p1", "bet", "1", t, {}))
    await set_active("pause", False)
    await events(api, "paused", ("p1", "bet", "1", t + timedelta(minutes=1), {}))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 0
    await set_active("resume", True)
    await events(api, "two", ("p1", "bet", "1", t + timedelta(minutes=2), {}))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 1


async def test_a_resumed_schedule_runs_at_its_first_time_after_the_resumption(
        api: Api, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("s1", "EUR", "UTC"))
    created = await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="daily", schedule=pb.BonusSchedule(
            schedule_id="daily", definition_id="bets-10", customer_ids=["s1"],
            local_time="06:00", time_zone="Europe/Berlin")), metadata=api.key())
    assert created.schedule.next_run_time.ToDatetime(UTC) == datetime(2026, 11, 23, 5,
                                                                     tzinfo=UTC)

    async def set_active(request_id: str, active: bool) -> pb.BonusSchedule:
        return (await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
            request_id=request_id, schedule=pb.BonusSchedule(schedule_id="daily",
                                                             active=active),
            update_mask={"paths": ["active"]}), metadata=api.key())).schedule

    await set_active("pause", False)
    clock.set(datetime(2026, 11, 25, 10, tzinfo=UTC))
    resumed = await set_active("resume", True)
    assert resumed.next_run_time.ToDatetime(UTC) == datetime(2026, 11, 26, 5, tzinfo=UTC)


async def test_a_template_result_renders_its_template_and_no_amount(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition(
        "spins", 'if sum(deposit.amount) >= 100 then template("10 Free Spins") else skip',
        result_type=pb.BONUS_RESULT_TYPE_BONUS_TEMPLATE,
        issued_message="{{event.bonus_template}}|{{event.bonus_amount}}|{{event.result_type}}"))
    found = await deposit_and_compute(api, pool, settings, clock, "spins", ("t1", "100"))
    assert (found["t1"].status, found["t1"].template) == (pb.BONUS_STATUS_ISSUED,
                                                          "10 Free Spins")
    [issued] = await event_data(pool, 112)
    assert (issued["template"], issued["bonus_template"]) == ("10 Free Spins", "10 Free Spins")
    assert issued["message"] == "10 Free Spins||BONUS_TEMPLATE"
    assert [(e.template, e.amount) for e in await ledger(api, "t1")] == [("10 Free Spins", "")]
