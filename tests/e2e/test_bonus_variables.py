"""Variables in dynamic bonus definitions (seed 004, "Using variables with fixed values and
multi-currency support"): a per-currency cap resolved with each customer's currency in the
batch, an edit of a variable followed by a recalculation, and bad variables refused."""

from __future__ import annotations

from datetime import timedelta
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
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    request,
    results,
    run_due_batches,
    stub,
)

CAPPED = "cap(sum(deposit.amount) * 50%, max_bonus)"


def max_bonus(**amounts: str) -> fpb.FormulaVariable:
    return fpb.FormulaVariable(name="max_bonus", per_currency=amounts)


async def deposits(api: Api, request_id: str, clock: FixedClock,
                   *rows: tuple[str, str, str]) -> None:
    """(customer_id, amount, currency) deposits made an hour ago."""
    await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(cpb.RecordEventsRequest(
        request_id=request_id, events=[
            cpb.Event(external_id=f"{request_id}-{i}", customer_id=c, kind="deposit",
                      amount=amount, currency=currency,
                      occurred_at=ts(clock.now() - timedelta(hours=1)))
            for i, (c, amount, currency) in enumerate(rows)]), metadata=api.key())


async def update(api: Api, request_id: str, message: pb.BonusDefinition,
                 *paths: str) -> pb.BonusDefinition:
    response = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id=request_id, definition=message, update_mask={"paths": list(paths)}),
        metadata=api.key())
    return response.definition


async def test_a_per_currency_cap_pays_each_customer_in_their_currency(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    created = await create(api, definition(
        "capped-50", CAPPED, variables=[max_bonus(EUR="200", usd="250"),
                                        fpb.FormulaVariable(name="unused_rate", value="0.05")]))
    assert [(v.name, v.value, dict(v.per_currency)) for v in created.variables] == [
        ("max_bonus", "", {"EUR": "200", "USD": "250"}), ("unused_rate", "0.05", {})]
    got = await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(
        definition_id="capped-50"), metadata=api.key())
    assert got.definition == created
    listed = await stub(api).ListBonusDefinitions(pb.ListBonusDefinitionsRequest(),
                                                  metadata=api.key())
    assert list(listed.definitions) == [created]

    await customers(api, ("eur-big", "EUR", "UTC"), ("usd-big", "USD", "UTC"),
                    ("eur-small", "EUR", "UTC"), ("gbp", "GBP", "UTC"))
    await deposits(api, "dep", clock, ("eur-big", "1000", "EUR"), ("usd-big", "1000", "USD"),
                   ("eur-small", "60", "EUR"), ("gbp", "1000", "GBP"))
    await request(api, "capped-50", ["eur-big", "usd-big", "eur-small", "gbp"], "capped-1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: r for r in await results(api, definition_id="capped-50")}
    assert {c: (r.status, r.amount, r.currency) for c, r in found.items()} == {
        "eur-big": (pb.BONUS_STATUS_ISSUED, "200", "EUR"),
        "usd-big": (pb.BONUS_STATUS_ISSUED, "250", "USD"),
        "eur-small": (pb.BONUS_STATUS_ISSUED, "30", "EUR"),
        "gbp": (pb.BONUS_STATUS_SKIPPED, "", "GBP")}
    assert found["gbp"].skip_reason == "MISSING_CURRENCY_VALUE"
    assert found["gbp"].skip_detail == ("the variable 'max_bonus' has no value for GBP "
                                        "(it has EUR, USD)")


async def test_editing_a_variable_then_recalculating_changes_a_calculated_result(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("capped-manual", CAPPED, approval_mode=pb.APPROVAL_MODE_MANUAL,
                                 variables=[max_bonus(EUR="200", USD="250")]))
    await customers(api, ("e1", "EUR", "UTC"))
    await deposits(api, "dep", clock, ("e1", "1000", "EUR"))
    await request(api, "capped-manual", ["e1"], "manual-1", role="admin")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [first] = await results(api, definition_id="capped-manual")
    assert (first.status, first.amount, first.definition_revision) == (
        pb.BONUS_STATUS_CALCULATED, "200", 1)

    same = await update(api, "same", pb.BonusDefinition(
        definition_id="capped-manual", variables=[max_bonus(USD="250", EUR="200.00")]),
        "variables")
    assert same.revision == 1  # the same values: not a change of the calculation
    edited = await update(api, "raise", pb.BonusDefinition(
        definition_id="capped-manual", variables=[max_bonus(EUR="300", USD="350")]),
        "variables")
    assert edited.revision == 2
    assert dict(edited.variables[0].per_currency) == {"EUR": "300", "USD": "350"}
    recalculated = await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="capped-manual"), metadata=api.key())
    assert (recalculated.recalculated_count, recalculated.calculated_count) == (1, 1)
    [after] = await results(api, definition_id="capped-manual")
    assert (after.bonus_id, after.status, after.amount, after.definition_revision) == (
        first.bonus_id, pb.BONUS_STATUS_CALCULATED, "300", 2)

    # A formula edit that needs a variable the definition does not have is refused.
    with pytest.raises(grpc.RpcError) as caught:
        await update(api, "drop", pb.BonusDefinition(definition_id="capped-manual"),
                     "variables")
    assert rpc_error_reason(caught.value) == "FORMULA_INVALID"
    assert "unknown name 'max_bonus'" in (caught.value.details() or "")


@pytest.mark.parametrize(("variable", "index", "name", "text"), [
    (fpb.FormulaVariable(name="", value="5"), 0, "", "variables[0]: name is required"),
    (fpb.FormulaVariable(name="if", value="5"), 0, "if",
     "variables[0] ('if'): a name must be letters, digits and '_', not starting with a digit, "
     "and not a keyword or function"),
    (fpb.FormulaVariable(name="sum", value="5"), 0, "sum", "not a keyword or function"),
    (fpb.FormulaVariable(name="2fast", value="5"), 0, "2fast", "letters, digits and '_'"),
    (fpb.FormulaVariable(name="max_bonus"), 0, "max_bonus",
     "variables[0] ('max_bonus'): needs a value or per-currency values"),
    (fpb.FormulaVariable(name="max_bonus", value="a lot"), 0, "max_bonus",
     "variables[0] ('max_bonus'): value must be a decimal number, got 'a lot'"),
    (fpb.FormulaVariable(name="max_bonus", value="NaN"), 0, "max_bonus",
     "value must be a decimal number, got 'NaN'"),
    (max_bonus(EUR="200", USD="lots"), 0, "max_bonus",
     "variables[0] ('max_bonus'): the USD value must be a decimal number, got 'lots'"),
    (max_bonus(EUR="200", euro="250"), 0, "max_bonus",
     "'euro' is not a currency code (ISO 4217, e.g. 'EUR')"),
    (max_bonus(EUR="200", eur="250"), 0, "max_bonus", "currency EUR is given twice"),
    (fpb.FormulaVariable(name="max_bonus", value="5", per_currency={"EUR": "5"}), 0,
     "max_bonus", "give value or per_currency, not both"),
])
async def test_bad_variables_are_invalid_argument(api: Api, variable: fpb.FormulaVariable,
                                                  index: int, name: str, text: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("bad", "sum(deposit.amount) * 10%", variables=[variable]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_VARIABLE"
    assert text in (caught.value.details() or "")
    info = error_info_of(caught.value)
    assert info is not None
    assert (info.metadata["field"], info.metadata["variable"]) == (f"variables[{index}]", name)


async def test_a_variable_named_twice_and_an_undefined_one_are_refused(api: Api) -> None:
    twice: dict[str, Any] = {"variables": [fpb.FormulaVariable(name="rate", value="0.1"),
                                           fpb.FormulaVariable(name="rate", value="0.2")]}
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("twice", "sum(deposit.amount) * rate", **twice))
    assert caught.value.details() == "variables[1] ('rate'): the name is given twice"
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("typo", "cap(sum(deposit.amount) * 50%, max_bonuss)",
                                     variables=[max_bonus(EUR="200")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "FORMULA_INVALID"
    assert "unknown name 'max_bonuss'; did you mean 'max_bonus'?" in (
        caught.value.details() or "")
    info = error_info_of(caught.value)
    assert info is not None and info.metadata["field"] == "formula"
    # Nothing was saved by the refused calls.
    listed = await stub(api).ListBonusDefinitions(pb.ListBonusDefinitionsRequest(),
                                                  metadata=api.key())
    assert list(listed.definitions) == []
