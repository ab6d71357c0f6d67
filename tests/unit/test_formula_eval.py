"""Formula evaluation semantics: values, the result pipeline, filters, aggregates, stored form."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from core.errors import InvalidArgument
from core.formula import (
    FORMULA_LANGUAGE_VERSION,
    AggregateSpec,
    AggregateValue,
    CompiledFormula,
    EventRecord,
    Filter,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
    aggregate_in_memory,
    aggregate_in_memory_by_customer,
    average,
    compile_formula,
    empty_aggregates,
    filter_matches,
    inputs_from_events,
)
from core.rounding import RoundingMode
from tests.unit.formula_helpers import T0, deposits, ev, run

D = Decimal


def value_of(source: str, **kwargs: Any) -> Decimal | None:
    evaluation = run(source, **kwargs)
    assert evaluation.outcome is Outcome.AMOUNT, evaluation.explain()
    return evaluation.raw_value


def skip_of(source: str, *args: Any, **kwargs: Any) -> tuple[SkipReason | None, str | None]:
    evaluation = run(source, *args, **kwargs)
    assert evaluation.outcome is Outcome.SKIPPED, evaluation
    return evaluation.skip_reason, evaluation.skip_detail


# --- expressions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("10 - 4 - 3", "3"),
        ("100 / 4 / 5", "5"),
        ("-2 * -3", "6"),
        ("-(2 - 5)", "3"),
        ("200 * 5%", "10"),
        ("12.5% * 8", "1"),
        ("1 / 3 * 3", "0.9999999999999999999999999999999999"),
        ("min(5, 3, 4)", "3"),
        ("max(5, 3, 4)", "5"),
        ("cap(1000, 200)", "200"),
        ("cap(150, 200)", "150"),
        ("floor(7.9)", "7"),
        ("abs(0 - 7.5)", "7.5"),
        ("round(2.735, 2)", "2.74"),
        ("round(2.5)", "3"),
        ("if 1 > 2 or 2 > 1 then 1 else 2", "1"),
        ("if not (1 > 2) and 2 >= 2 and 2 <= 2 and 1 != 2 and 1 == 1 then 1 else 2", "1"),
        ('if "a" == "a" and "a" != "b" and true == true then 1 else 2', "1"),
        ("if false then 1 elif true then 2 else 3", "2"),
        ("a = 2; b = a * 3; a + b", "8"),
        ("if 1 > 0 then (if 2 > 3 then 1 else 4) else 5", "4"),
        ("if 1 > 2 then 1 else if 2 > 1 then 6 else 7", "6"),
    ],
)
def test_expressions(source: str, expected: str) -> None:
    assert value_of(source) == D(expected)


def test_arithmetic_is_decimal_and_exact() -> None:
    value = value_of("0.1 + 0.2")
    assert isinstance(value, Decimal) and str(value) == "0.3"


def test_division_by_zero_is_a_skip() -> None:
    reason, detail = skip_of("x = 0\n10 / x")
    assert reason is SkipReason.DIVISION_BY_ZERO
    assert detail == "line 2, column 6: division by zero"


def test_division_by_zero_from_missing_data_is_no_matching_transactions() -> None:
    # sum / count over no events: the root cause is the missing data, not the division
    reason, _ = skip_of("sum(deposit.amount) / count(deposit)", [ev("bet", 10)])
    assert reason is SkipReason.NO_MATCHING_TRANSACTIONS


def test_if_without_else_means_skip() -> None:
    evaluation = run("if count(deposit) > 1 then 10", deposits("5"))
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP
    assert evaluation.branch == "no branch matched (skip)"
    assert evaluation.skip_detail == "no condition matched and there is no else (line 1, column 1)"
    assert run("if count(deposit) > 1 then 10", deposits("5", "6")).amount == D(10)


def test_skip_propagates_through_calculations() -> None:
    source = "base = if count(deposit) > 2 then sum(deposit.amount) else skip\ncap(base * 10%, 50)"
    assert run(source, deposits("100", "200", "300")).amount == D(50)
    evaluation = run(source, deposits("100"))
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP
    assert evaluation.branch == "else"


def test_explicit_skip_wins_over_no_matching_transactions() -> None:
    evaluation = run("if sum(bet.amount) > 100 then 5 else skip")
    assert evaluation.skip_reason is SkipReason.EXPLICIT_SKIP
    assert evaluation.aggregates_used == {"a0": AggregateValue(D(0), 0)}


def test_a_template_is_given_even_without_matching_transactions() -> None:
    evaluation = run('if count(deposit) == 0 then template("Welcome") else 5')
    assert evaluation.outcome is Outcome.TEMPLATE and evaluation.template == "Welcome"


def test_no_matching_transactions_needs_all_read_aggregates_empty() -> None:
    assert run("sum(bet.amount) + sum(win.amount) + 1", [ev("win", 1)]).amount == D(2)
    reason, detail = skip_of("count(bet) + 1", [ev("win", 1)])
    assert reason is SkipReason.NO_MATCHING_TRANSACTIONS
    assert detail == "no events matched count(bet)"


def test_a_formula_reading_no_aggregate_on_its_path_is_not_no_matching() -> None:
    source = 'if customer.tier == "Gold" then 10 else sum(bet.amount)'
    assert run(source, properties={"tier": "Gold"}).amount == D(10)
    assert run(source, properties={"tier": "Silver"}).skip_reason is (
        SkipReason.NO_MATCHING_TRANSACTIONS
    )


@pytest.mark.parametrize("func", ["avg", "min", "max", "first", "last"])
def test_empty_value_aggregates_are_no_matching_transactions(func: str) -> None:
    reason, detail = skip_of(f"if count(bet) > 1 then 1 else {func}(deposit.amount) + 1", [
        ev("bet", 5)
    ])  # fmt: skip
    assert reason is SkipReason.NO_MATCHING_TRANSACTIONS
    assert detail == f"{func}(deposit.amount) has no matching events"


def test_only_the_branch_taken_reads_its_aggregates() -> None:
    source = "if count(bet) > 1 then sum(bet.amount) else sum(win.amount) * 2"
    evaluation = run(source, [ev("bet", 5), ev("win", 7)])
    assert evaluation.amount == D(14)
    assert set(evaluation.aggregates_used) == {"a0", "a2"}


def test_zero_or_negative_and_rounding_to_zero() -> None:
    assert skip_of("5 - 5")[0] is SkipReason.ZERO_OR_NEGATIVE
    assert skip_of("0 - 1")[0] is SkipReason.ZERO_OR_NEGATIVE
    options = ResultOptions(rounding=RoundingMode.ROUND_DOWN, decimals=2)
    evaluation = run("0.009", options=options)
    assert evaluation.skip_reason is SkipReason.ZERO_OR_NEGATIVE
    assert evaluation.raw_value == D("0.009") and evaluation.value_after_rounding == D("0.00")


def test_pipeline_order_round_then_cap_then_minimum() -> None:
    options = ResultOptions(
        rounding=RoundingMode.ROUND_UP, decimals=0, cap_amount=D("99.5"), min_allowed=D(10)
    )
    evaluation = run("120.2", options=options)
    assert (evaluation.raw_value, evaluation.value_after_rounding, evaluation.value_after_cap) == (
        D("120.2"),
        D(121),
        D("99.5"),
    )
    assert evaluation.amount == D("99.5")
    # the minimum judges the rounded value: 9.2 rounds up to 10, which is allowed
    assert run("9.2", options=options).amount == D(10)
    below = run("8.2", options=options)
    assert below.skip_reason is SkipReason.BELOW_MINIMUM and below.value_after_cap == D(9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"decimals": 9}, "decimals"),
        ({"rounding": RoundingMode.MROUND}, "factor"),
        ({"cap_amount": D(0)}, "cap_amount"),
        ({"cap_amount": D(-5)}, "cap_amount"),
        ({"min_allowed": D(-1)}, "min_allowed"),
        ({"min_allowed": 5.0}, "min_allowed"),
    ],
)
def test_result_options_are_validated(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ResultOptions(**kwargs)
    assert info.value.metadata["field"] == field


# --- properties and variables --------------------------------------------------------------


def test_property_types() -> None:
    int_value = {"level": 3}  # callers may pass plain ints for numbers
    assert run("customer.level * 2", properties=int_value).amount == D(6)  # type: ignore[arg-type]
    assert run("if customer.vip == true then 5 else 1", properties={"vip": True}).amount == D(5)
    evaluation = run("customer.level * 2", properties={"level": "three"})
    assert evaluation.skip_reason is SkipReason.TYPE_ERROR
    assert evaluation.skip_detail == (
        "line 1, column 1: '*' needs a number, got the text \"three\""
    )
    float_value = run("customer.level * 2", properties={"level": 1.5})  # type: ignore[dict-item]
    assert float_value.skip_reason is SkipReason.TYPE_ERROR


def test_missing_property_equality_is_null_safe_and_otherwise_missing() -> None:
    source = "if customer.vip == true then 20 elif customer.vip != true then 10 else 0"
    assert run(source, properties={}).amount == D(10)
    assert run(source, properties={"vip": None}).amount == D(10)
    assert skip_of("customer.level + 1")[0] is SkipReason.MISSING_PROPERTY
    assert skip_of("if customer.level > 1 then 1 else 2")[0] is SkipReason.MISSING_PROPERTY


def test_equality_between_different_runtime_types_is_a_type_error() -> None:
    reason, detail = skip_of('if customer.level == "3" then 1 else 2', properties={"level": 3})
    assert reason is SkipReason.TYPE_ERROR
    assert detail == "line 1, column 4: '==' compares the number 3 with the text \"3\""


def test_a_text_result_is_a_type_error() -> None:
    reason, _ = skip_of("customer.tier", properties={"tier": "Gold"})
    assert reason is SkipReason.TYPE_ERROR


def test_text_variable_as_template_name() -> None:
    evaluation = run("template(welcome)", variables={"welcome": "Welcome pack"})
    assert evaluation.template == "Welcome pack"


def test_missing_aggregate_input_is_a_programming_error() -> None:
    formula = compile_formula("sum(bet.amount)")
    with pytest.raises(InvalidArgument) as info:
        formula.evaluate(FormulaInputs(aggregates={}, properties={}, currency="EUR"))
    assert info.value.reason == "FORMULA_INPUT_MISSING"


# --- explanations --------------------------------------------------------------------------


def test_explain_walks_through_the_decision() -> None:
    source = (
        'net_loss = sum(bet.amount where game_category != "Roulette") - sum(win.amount)\n'
        "bonus = if net_loss > 500 then net_loss * 5% else net_loss * 1%\n"
        "cap(bonus, 20)"
    )
    options = ResultOptions(rounding=RoundingMode.ROUND, decimals=2, min_allowed=D(1))
    evaluation = run(source, [ev("bet", "900"), ev("win", "100.10")], options=options)
    assert evaluation.branch == "if #1 (net_loss > 500)"
    assert evaluation.explain() == (
        "Result: give 20.00.\n"
        "Branch taken: if #1 (net_loss > 500).\n"
        "Aggregates read:\n"
        '  sum(bet.amount where game_category != "Roulette") = 900 (1 event)\n'
        "  sum(win.amount) = 100.10 (1 event)\n"
        "Calculated value: 20.\n"
        "After rounding (ROUND, 2 decimals): 20.00.\n"
        "Minimum allowed 1: reached."
    )


def test_explain_a_skip() -> None:
    text = run("sum(deposit.amount) * 10%").explain()
    assert text.startswith(
        "Result: skipped (NO_MATCHING_TRANSACTIONS): no events matched sum(deposit.amount)."
    )
    assert "sum(deposit.amount) = 0 (0 events)" in text


def test_explain_a_cap() -> None:
    text = run("1000", options=ResultOptions(cap_amount=D(200))).explain()
    assert "Capped at 200: 200." in text and "No rounding." in text


# --- filters -------------------------------------------------------------------------------

EVENT = ev("bet", "50", currency="EUR", game="Gold Quest", level=D(3), label="3", live=True)


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Filter("game", "=", ("Gold Quest",)), True),
        (Filter("game", "=", ("gold quest",)), False),  # case-sensitive, as in SQL
        (Filter("game", "!=", ("Gold Quest",)), False),
        (Filter("game", "in", ("A", "Gold Quest")), True),
        (Filter("game", "not in", ("A", "Gold Quest")), False),
        # a missing attribute never matches =, in or orderings; always != and not in
        (Filter("missing", "=", ("x",)), False),
        (Filter("missing", "in", ("x",)), False),
        (Filter("missing", "<", (D(1),)), False),
        (Filter("missing", ">=", (D(1),)), False),
        (Filter("missing", "!=", ("x",)), True),
        (Filter("missing", "not in", ("x",)), True),
        # numbers compare numerically, text never equals a number
        (Filter("level", "=", (D("3.00"),)), True),
        (Filter("level", "=", ("3",)), False),
        (Filter("label", "=", (D(3),)), False),
        (Filter("label", "!=", (D(3),)), True),
        (Filter("level", "<", (D(4),)), True),
        (Filter("level", ">", (D(3),)), False),
        (Filter("level", "<=", (D(3),)), True),
        (Filter("level", ">=", (D("3.01"),)), False),
        # a non-numeric value never matches an ordering; neither does true/false
        (Filter("label", "<", (D(10),)), False),
        (Filter("live", ">", (D(0),)), False),
        (Filter("live", "=", (D(1),)), False),
        # pseudo-attributes
        (Filter("amount", ">=", (D(50),)), True),
        (Filter("amount", "=", (D("50.0"),)), True),
        (Filter("currency", "=", ("EUR",)), True),
        (Filter("currency", "in", ("USD", "GBP")), False),
    ],
)
def test_filter_semantics(flt: Filter, expected: bool) -> None:
    assert filter_matches(flt, EVENT) is expected


def test_pseudo_attributes_win_over_attributes_of_the_same_name() -> None:
    event = EventRecord(1, "bet", D(10), "USD", T0, {"amount": D(99), "currency": "EUR"})
    assert filter_matches(Filter("amount", "=", (D(10),)), event)
    assert filter_matches(Filter("currency", "=", ("USD",)), event)


# --- in-memory aggregation -----------------------------------------------------------------


def spec(func: str, field: str | None = "amount", *filters: Filter, kind: str = "bet") -> Any:
    return AggregateSpec("k", func, kind, field, tuple(filters))


BETS = [
    ev("bet", "10", minute=5, event_id=101, level=D(2)),
    ev("bet", "30", minute=1, event_id=102, level="high"),
    ev("bet", "20", minute=5, event_id=100),
    ev("win", "1000", minute=0, event_id=103),
]


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        (spec("sum"), AggregateValue(D(60), 3)),
        (spec("count", None), AggregateValue(D(3), 3)),
        (spec("avg"), AggregateValue(D(20), 3)),
        (spec("min"), AggregateValue(D(10), 3)),
        (spec("max"), AggregateValue(D(30), 3)),
        (spec("first"), AggregateValue(D(30), 3)),
        (spec("last"), AggregateValue(D(10), 3)),  # minute 5 tie: larger event id is last
        # a numeric attribute as the field: only numeric values count
        (spec("sum", "level"), AggregateValue(D(2), 1)),
        (spec("count", None, Filter("level", ">", (D(1),))), AggregateValue(D(1), 1)),
        # nothing matched
        (spec("sum", kind="deposit"), AggregateValue(D(0), 0)),
        (spec("count", None, kind="deposit"), AggregateValue(D(0), 0)),
        (spec("avg", kind="deposit"), AggregateValue(None, 0)),
        (spec("first", kind="deposit"), AggregateValue(None, 0)),
    ],
)
def test_aggregate_semantics(aggregate: AggregateSpec, expected: AggregateValue) -> None:
    assert aggregate_in_memory([aggregate], BETS) == {"k": expected}


def test_average_is_shared_and_precise() -> None:
    assert average(D(1), 3) == D("0.3333333333333333333333333333333333")
    assert average(D(0), 0) is None


def test_aggregate_by_customer_includes_requested_customers_without_events() -> None:
    specs = [
        AggregateSpec("a0", "sum", "bet", "amount"),
        AggregateSpec("a1", "last", "bet", "amount"),
    ]
    result = aggregate_in_memory_by_customer(
        specs, [(1, ev("bet", 5)), (2, ev("bet", 7)), (1, ev("bet", 1, minute=9))], customer_ids=[3]
    )
    assert result == {
        1: {"a0": AggregateValue(D(6), 2), "a1": AggregateValue(D(1), 2)},
        2: {"a0": AggregateValue(D(7), 1), "a1": AggregateValue(D(7), 1)},
        3: empty_aggregates(specs),
    }
    assert empty_aggregates(specs) == {"a0": AggregateValue(D(0), 0), "a1": AggregateValue(None, 0)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": "", "func": "sum", "kind": "bet", "field": "amount"},
        {"key": "k", "func": "median", "kind": "bet", "field": "amount"},
        {"key": "k", "func": "count", "kind": "bet", "field": "amount"},
        {"key": "k", "func": "sum", "kind": "bet", "field": None},
        {"key": "k", "func": "sum", "kind": "no such", "field": "amount"},
    ],
)
def test_aggregate_specs_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        AggregateSpec(**kwargs)


@pytest.mark.parametrize(
    ("attribute", "op", "values"),
    [("game", "~", ("x",)), ("game", "=", ()), ("game", "=", ("a", "b")), ("level", "<", ("x",)),
     ("game", "=", (1.5,)), ("bad name", "=", ("x",))],
)  # fmt: skip
def test_filters_are_validated(attribute: str, op: str, values: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidArgument):
        Filter(attribute, op, values)


# --- stored form ---------------------------------------------------------------------------

STORED_SOURCE = """
net = sum(deposit.amount where currency in ("EUR", "USD") and amount >= 10) -
      sum(withdrawal.amount)
if net > 500 and customer.tier != "Bronze" then cap(min(net * 50%, 1000), max_bonus)
elif net > 100 then template(welcome)
else -(-net) / 10
"""
STORED_VARIABLES: dict[str, Any] = {"welcome": "Welcome", "max_bonus": {"EUR": D(300)}}


def test_to_stored_is_json_and_round_trips() -> None:
    formula = compile_formula(STORED_SOURCE, variables=STORED_VARIABLES)
    stored = formula.to_stored()
    assert stored["version"] == FORMULA_LANGUAGE_VERSION
    assert stored["source"] == STORED_SOURCE
    assert stored["variables"] == {
        "welcome": {"text": "Welcome"},
        "max_bonus": {"per_currency": {"EUR": "300"}},
    }
    again = CompiledFormula.from_stored(json.loads(json.dumps(stored)))
    assert again == formula
    assert again.to_stored() == stored
    events = [*deposits("800"), ev("withdrawal", "100")]
    for tier in ("Gold", "Bronze"):
        inputs_kwargs: dict[str, Any] = {"properties": {"tier": tier}}
        expected = run(STORED_SOURCE, events, variables=STORED_VARIABLES, **inputs_kwargs)
        inputs = inputs_from_events(
            again.aggregates, events, properties={"tier": tier}, currency="EUR"
        )
        assert again.evaluate(inputs) == expected


def test_from_stored_of_another_version_recompiles_the_source() -> None:
    formula = compile_formula(STORED_SOURCE, variables=STORED_VARIABLES)
    stored = formula.to_stored()
    stored["version"] = 0
    stored["program"] = "from an older language"
    assert CompiledFormula.from_stored(stored) == formula


def test_from_stored_of_another_version_with_a_broken_source() -> None:
    stored = compile_formula("1").to_stored() | {"version": 99, "source": "1 +"}
    with pytest.raises(InvalidArgument) as info:
        CompiledFormula.from_stored(stored)
    assert info.value.reason == "FORMULA_SYNTAX"


def _mutate(path: list[Any], value: Any) -> dict[str, Any]:
    stored = compile_formula(STORED_SOURCE, variables=STORED_VARIABLES).to_stored()
    target: Any = stored
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return stored


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (["program", "result", "node"], "Eval", "program.result.node"),
        (["program", "result", "branches"], [], "program.result.branches"),
        (["program", "result", "line"], -1, "program.result.line"),
        (["program", "assignments", 0, "value", "rest", 0, 0], "**",
         "program.assignments[0].value.rest[0]"),
        (["program", "assignments", 0, "name"], "max_bonus", "program.assignments[0].name"),
        (["aggregates", 0, "func"], "median", "aggregates[0].func"),
        (["aggregates", 0, "filters", 0, "values", 0], {"number": 1.5},
         "aggregates[0].filters[0].values[0].number"),
        (["aggregates", 1, "key"], "a0", "aggregates"),
        (["variables", "max_bonus"], {"float": 1}, "variables.max_bonus"),
        (["version"], "1", "version"),
        (["source"], None, "formula.source"),
    ],
)  # fmt: skip
def test_from_stored_validates_every_field(path: list[Any], value: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        CompiledFormula.from_stored(_mutate(path, value))
    assert info.value.reason == "FORMULA_INVALID"
    assert info.value.metadata["field"] == field


def test_from_stored_rejects_references_to_unknown_names() -> None:
    stored = compile_formula("a = 1\na + 1").to_stored()
    stored["program"]["assignments"] = []
    with pytest.raises(InvalidArgument) as info:
        CompiledFormula.from_stored(stored)
    assert "'a' is not assigned" in info.value.message
