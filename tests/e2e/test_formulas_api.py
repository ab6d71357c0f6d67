"""FormulaService: validation with positions, and a dry run that explains itself (seed 004)."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from core.clock import FixedClock
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import promotions_pb2 as ppb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts

NET_LOSS = """# 5% of net loss, excluding Roulette (seed 004)
bets = sum(bet.amount where game_category != "Roulette")
wins = sum(win.amount where game_category != "Roulette")
(bets - wins) * 5%"""


async def _player(api: Api, clock: FixedClock) -> None:
    stub = cpb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(cpb.UpsertCustomersRequest(request_id="u", customers=[
        cpb.Customer(customer_id="p1", currency="EUR", time_zone="Europe/Berlin")]),
        metadata=api.key())
    rows = [("bet", "100", "Slots"), ("bet", "50", "Roulette"), ("win", "30", "Slots"),
            ("win", "40", "Roulette"), ("bet", "20.50", "Slots")]
    await stub.RecordEvents(cpb.RecordEventsRequest(request_id="e", events=[
        cpb.Event(external_id=f"x{i}", customer_id="p1", kind=kind, amount=amount,
                  currency="EUR", occurred_at=ts(clock.now() - timedelta(hours=i + 1)),
                  attributes={"game_category": category})
        for i, (kind, amount, category) in enumerate(rows)]), metadata=api.key())


async def test_validate_describes_the_formula(api: Api) -> None:
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub.ValidateFormula(fpb.ValidateFormulaRequest(source=NET_LOSS),
                                       metadata=api.key())
    assert reply.language_version == 1 and not reply.returns_template
    assert [a.description for a in reply.aggregates] == [
        'sum(bet.amount where game_category != "Roulette")',
        'sum(win.amount where game_category != "Roulette")']


@pytest.mark.parametrize(("source", "position"), [
    ("sum(bet.amount) *", ("1", "18")),
    ("x = 1\ny = x +\n", ("2", "8")),
    ("if sum(bet.amount) > 5 then 1 elif", ("1", "35")),
])
async def test_validate_errors_point_at_line_and_column(api: Api, source: str,
                                                        position: tuple[str, str]) -> None:
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.ValidateFormula(fpb.ValidateFormulaRequest(source=source), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "FORMULA_SYNTAX"
    from server.errors import error_info_of

    info = error_info_of(err.value)
    assert info is not None
    assert (info.metadata["line"], info.metadata["column"]) == position
    assert f"line {position[0]}, column {position[1]}" in (err.value.details() or "")


async def test_dry_run_net_loss_with_explanation(api: Api, clock: FixedClock) -> None:
    await _player(api, clock)
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source=NET_LOSS, customer_id="p1", rounding=ppb.ROUNDING_MODE_ROUND, decimals=2,
        period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=1, unit=fpb.TIME_UNIT_DAYS))), metadata=api.key())
    # (100 + 20.50 - 30) * 5% = 4.525 -> 4.53; Roulette bets and wins do not count.
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert (reply.raw_value, reply.amount) == ("4.525", "4.53")
    assert [(a.value, a.count) for a in reply.aggregates] == [("120.500000", 2), ("30.000000", 1)]
    assert (reply.window_end.ToDatetime() - reply.window_start.ToDatetime()) == timedelta(days=1)
    assert "4.53" in reply.explanation


async def test_dry_run_skips_say_why(api: Api, clock: FixedClock) -> None:
    await _player(api, clock)
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    capped = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source="sum(bet.amount) * 10", customer_id="p1", cap_amount="200", min_allowed="5",
        period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=1, unit=fpb.TIME_UNIT_DAYS))), metadata=api.key())
    assert (capped.raw_value, capped.amount) == ("1705", "200")  # cap 200 on 1705
    nothing = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source="sum(deposit.amount) * 10%", customer_id="p1",
        period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_WEEKEND))), metadata=api.key())
    assert nothing.outcome == fpb.DRY_RUN_OUTCOME_SKIPPED
    assert nothing.skip_reason == "NO_MATCHING_TRANSACTIONS"
    with pytest.raises(grpc.RpcError) as err:
        await stub.DryRunFormula(fpb.DryRunFormulaRequest(
            source="sum(bet.amount)", customer_id="p1",
            period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                amount=40, unit=fpb.TIME_UNIT_DAYS))), metadata=api.key())
    assert rpc_error_reason(err.value) == "PERIOD_TOO_LONG"
    with pytest.raises(grpc.RpcError) as err:
        await stub.DryRunFormula(fpb.DryRunFormulaRequest(source="1", customer_id="ghost"),
                                 metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
