"""Audit of FormulaService: bad or extreme formulas are INVALID_ARGUMENT or a clean dry run,
never INTERNAL (DESIGN: bad input is INVALID_ARGUMENT with line and column)."""

from __future__ import annotations

import grpc
import pytest

from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from tests.conftest import Api, rpc_error_reason


def _chain(n: int) -> str:
    """n assignments, each using the previous one: v0 = 1, v1 = v0 + 1, ... and the last."""
    lines = ["v0=1", *(f"v{i}=v{i - 1}+1" for i in range(1, n)), f"v{n - 1}"]
    return "\n".join(lines)


async def _customer(api: Api) -> None:
    stub = cpb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(cpb.UpsertCustomersRequest(request_id="audit", customers=[
        cpb.Customer(customer_id="p1", currency="EUR", time_zone="Europe/Berlin")]),
        metadata=api.key())


async def test_validate_refuses_a_chain_too_deep_to_evaluate(api: Api) -> None:
    """800 chained assignments (under 10,000 characters) nest 1,600 calls deep: INVALID_ARGUMENT
    naming the line, where DryRunFormula used to answer INTERNAL (RecursionError)."""
    source = _chain(800)
    assert len(source) < 10_000
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ValidateFormula(fpb.ValidateFormulaRequest(source=source), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(
        "line 151, column 1: 'v150' is computed through 301 nested steps")


async def test_dry_run_of_the_longest_chain_allowed(api: Api) -> None:
    await _customer(api)
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub.DryRunFormula(fpb.DryRunFormulaRequest(source=_chain(150),
                                                              customer_id="p1"),
                                     metadata=api.key())
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert reply.amount == "150"


async def test_dry_run_of_a_product_beyond_34_digits_is_not_internal(api: Api) -> None:
    # 10^54 is exact in the 34-digit context (1E+54); the reply must not crash formatting it.
    await _customer(api)
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source="1000000000000000000 * 1000000000000000000 * 1000000000000000000",
        customer_id="p1"), metadata=api.key())
    assert reply.raw_value == "1" + "0" * 54


async def test_dry_run_keeps_a_30_digit_negated_literal_exact(api: Api) -> None:
    await _customer(api)
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source="abs(-123456789012345678901234567891)", customer_id="p1"), metadata=api.key())
    assert reply.raw_value == "123456789012345678901234567891"


@pytest.mark.parametrize(("source", "position"), [
    ("x = 1\r\ny = x +\r\n", ("2", "8")),
    ("x = 1\n\tfoo(1)", ("2", "2")),
    ("(" * 4000 + "1 +" + ")" * 4000, ("1", "4004")),
    ("-" * 60 + "1", ("1", "51")),
    ("1e999999", ("1", "2")),
])
async def test_errors_are_invalid_argument_with_a_position(api: Api, source: str,
                                                           position: tuple[str, str]) -> None:
    from server.errors import error_info_of

    stub = fpb_grpc.FormulaServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.ValidateFormula(fpb.ValidateFormulaRequest(source=source), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(err.value)
    assert info is not None and info.reason in ("FORMULA_SYNTAX", "FORMULA_INVALID")
    assert (info.metadata["line"], info.metadata["column"]) == position


@pytest.mark.parametrize("source", [
    "x = 1\n" + "y" * 9_900,
    "x" * 9_900 + "(1)",
    'template("' + "t" * 9_900 + '")',
    "x" * 4_900 + " = 1\n" + "x" * 4_899 + "y",
])
async def test_errors_about_very_long_names_are_invalid_argument(api: Api, source: str) -> None:
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.ValidateFormula(fpb.ValidateFormulaRequest(source=source), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert rpc_error_reason(err.value) == "FORMULA_INVALID"
