"""`promo formulas`: validate a formula, dry-run it against a customer (FormulaService)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    fail,
    parse_pairs,
    print_json,
    read_text_file,
)
from cli.options import JsonOpt
from cli.output import console, show_message, show_rows
from promo.v1 import formulas_pb2 as pb
from promo.v1 import formulas_pb2_grpc as pb_grpc
from promo.v1 import promotions_pb2 as ppb

app = typer.Typer(help="Formulas: validate, dry-run against a customer.",
                  no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.FormulaServiceStub

SourceOpt = Annotated[str | None, typer.Option(help="The formula text.")]
FileOpt = Annotated[Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False,
                                              help="Read the formula from a file.")]
VarOpt = Annotated[list[str] | None, typer.Option(
    "--var", help="Variable NAME=VALUE, or per currency NAME=EUR:200,USD:250 (repeat).")]
PER_CURRENCY = re.compile(r"[A-Za-z]{3}:")


def _source(source: str | None, file: Path | None) -> str:
    if (source is None) == (file is None):
        fail("give the formula with --source or --file")
    return source if source is not None else read_text_file(file)  # type: ignore[arg-type]


def _per_currency(name: str, text: str) -> dict[str, str]:
    amounts: dict[str, str] = {}
    for piece in text.split(","):
        code, sep, amount = piece.strip().partition(":")
        if not sep or not code or not amount:
            fail(f"--var {name}: expected CODE:AMOUNT pairs like EUR:200,USD:250, "
                 f"got {piece!r}")
        amounts[code] = amount
    return amounts


def variables_from_flags(values: list[str] | None) -> list[pb.FormulaVariable]:
    """``--var NAME=VALUE`` / ``--var NAME=EUR:200,USD:250`` options as FormulaVariable
    messages (also the bonus definitions' --var)."""
    return [pb.FormulaVariable(name=k, per_currency=_per_currency(k, v))
            if PER_CURRENCY.match(v) else pb.FormulaVariable(name=k, value=v)
            for k, v in parse_pairs(values, "--var").items()]


@app.command()
def validate(ctx: typer.Context, source: SourceOpt = None, file: FileOpt = None,
             var: VarOpt = None, as_json: JsonOpt = False) -> None:
    """Check a formula; errors name the line and column."""
    response = call(ctx, STUB, "ValidateFormula", pb.ValidateFormulaRequest(
        source=_source(source, file), variables=variables_from_flags(var)))
    if as_json:
        print_json(response)
        return
    console().print("formula is valid")
    show_message(response)


def period_from_flags(days: int | None, hours: int | None, relative: str | None,
            time_zone: str) -> pb.TransactionPeriod | None:
    given = [p for p in (days, hours, relative) if p is not None]
    if len(given) > 1:
        fail("give at most one of --days, --hours, --relative")
    if days is not None:
        return pb.TransactionPeriod(time_back=pb.TransactionPeriod.TimeBack(
            amount=days, unit=pb.TIME_UNIT_DAYS))
    if hours is not None:
        return pb.TransactionPeriod(time_back=pb.TransactionPeriod.TimeBack(
            amount=hours, unit=pb.TIME_UNIT_HOURS))
    if relative is not None:
        kind = enum_value(pb.RelativeKind, "RELATIVE_KIND_", relative, "--relative")
        return pb.TransactionPeriod(relative=pb.TransactionPeriod.Relative(
            kind=kind, time_zone=time_zone))  # type: ignore[arg-type]
    return None


@app.command("dry-run")
def dry_run(
    ctx: typer.Context,
    customer: Annotated[str, typer.Option(help="Customer id to evaluate for.")],
    source: SourceOpt = None,
    file: FileOpt = None,
    var: VarOpt = None,
    days: Annotated[int | None, typer.Option(help="Transactions of the last N days.")] = None,
    hours: Annotated[int | None, typer.Option(help="Transactions of the last N hours.")] = None,
    relative: Annotated[str | None, typer.Option(
        help="last_full_day, last_full_week, last_full_month, last_weekend, today_so_far.")]
        = None,
    time_zone: Annotated[str, typer.Option(help="Zone of --relative.")] = "UTC",
    rounding: Annotated[str, typer.Option(
        help="none, round, round_up, round_down or mround.")] = "none",
    decimals: Annotated[int, typer.Option()] = 0,
    rounding_factor: Annotated[str, typer.Option(help="Factor of mround.")] = "",
    cap_amount: Annotated[str, typer.Option("--cap", help="Largest amount.")] = "",
    min_allowed: Annotated[str, typer.Option("--min", help="Smallest amount granted.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a formula for one customer, with the aggregates it read and why."""
    request = pb.DryRunFormulaRequest(
        source=_source(source, file), variables=variables_from_flags(var), customer_id=customer,
        rounding=enum_value(ppb.RoundingMode, "ROUNDING_MODE_", rounding, "--rounding"),  # type: ignore[arg-type]
        decimals=decimals, rounding_factor=rounding_factor, cap_amount=cap_amount,
        min_allowed=min_allowed)
    period = period_from_flags(days, hours, relative, time_zone)
    if period is not None:
        request.period.CopyFrom(period)
    response = call(ctx, STUB, "DryRunFormula", request)
    if as_json:
        print_json(response)
        return
    out = console()
    outcome = enum_name(pb.DryRunOutcome, "DRY_RUN_OUTCOME_", response.outcome).lower()
    if response.outcome == pb.DRY_RUN_OUTCOME_AMOUNT:
        out.print(f"amount: {response.amount}")
    elif response.outcome == pb.DRY_RUN_OUTCOME_TEMPLATE:
        out.print(f"template: {response.template}")
    else:
        out.print(f"{outcome}: {response.skip_reason} {response.skip_detail}".rstrip())
    if response.aggregates:
        show_rows("Aggregates", ["key", "description", "value", "count"],
                  ([a.key, a.description, a.value, a.count] for a in response.aggregates))
    if response.explanation:
        out.print(response.explanation)
