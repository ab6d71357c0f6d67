"""Property tests: the parser only ever raises InvalidArgument, the batch (many customers) and
single-customer aggregations agree, and the stored form round-trips to identical decisions."""

from __future__ import annotations

import functools
import json
import random
from datetime import timedelta
from decimal import Decimal, localcontext
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InvalidArgument
from core.formula import (
    CompiledFormula,
    EventRecord,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
    aggregate_in_memory,
    aggregate_in_memory_by_customer,
    compile_formula,
)
from core.formula.evaluator import EVAL_CONTEXT
from core.rounding import RoundingMode
from tests.unit.formula_helpers import T0

D = Decimal
VARIABLES: dict[str, Any] = {"rate": D("0.1"), "cap_eur": {"EUR": D(50)}, "tpl": "Spins"}

# --- 1. the parser never raises anything but InvalidArgument --------------------------------

FRAGMENTS = [
    "sum(", "avg(", "min(", "max(", "first(", "last(", "count(", "cap(", "floor(", "abs(",
    "round(", "template(", "bet.amount", "deposit.amount", "win", "bet", ".", "where", "game",
    "amount", "currency", "=", "==", "!=", "<", ">", "<=", ">=", "in", "not", "(", ")", ",",
    "[", "]", "1", "0", "5%", "0.5", "-", "+", "*", "/", "if", "then", "elif", "else", "and",
    "or", "true", "false", "skip", "customer", "customer.tier", 'customer["Logins count ever"]',
    '"Gold"', '"x\\"y"', '"', "'", "%", "x", "y", "x =", "y =", "rate", "cap_eur", "tpl", "\n",
    ";", "# note\n", "\\", "@", "\t", "\u00a0", "é",
]  # fmt: skip

fragment_text = st.lists(
    st.tuples(st.sampled_from(FRAGMENTS), st.sampled_from([" ", "", "\n", " "])), max_size=30
).map(lambda parts: "".join(f + sep for f, sep in parts))


def _compile_or_invalid(text: str) -> CompiledFormula | None:
    try:
        return compile_formula(text, variables=VARIABLES)
    except InvalidArgument as exc:
        assert exc.reason in ("FORMULA_SYNTAX", "FORMULA_INVALID")
        assert "line" in exc.metadata and "column" in exc.metadata
        assert exc.message.startswith(f"line {exc.metadata['line']}, column ")
        return None


@settings(max_examples=250, deadline=None, database=None)
@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_invalid_argument(text: str) -> None:
    _compile_or_invalid(text)


AGGREGATES = [
    "sum(bet.amount)", "count(deposit)", "last(deposit.amount)", "avg(win.amount)",
    'sum(bet.amount where game_category != "Roulette")', "min(bet.amount where amount > 5)",
    'max(deposit.level where currency in ("EUR", "USD"))', "first(bet.amount)",
]  # fmt: skip
ATOMS = [*AGGREGATES, "1", "0", "2.5", "10%", "rate", "cap_eur", "customer.level",
         'customer["Logins count ever"]', "skip"]  # fmt: skip


def _numeric(children: Any) -> Any:
    binary = st.tuples(children, st.sampled_from(["+", "-", "*", "/"]), children).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    )
    calls = st.tuples(st.sampled_from(["cap", "min", "max"]), children, children).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})"
    )
    unary = st.tuples(st.sampled_from(["floor", "abs", "-", "round"]), children).map(
        lambda t: f"round({t[1]}, 2)" if t[0] == "round" else f"{t[0]}({t[1]})"
    )
    condition = st.tuples(children, st.sampled_from(["<", ">", "==", "!=", ">="]), children).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    )
    conditional = st.tuples(condition, children, children, st.booleans()).map(
        lambda t: f"(if {t[0]} then {t[1]}" + (f" else {t[2]})" if t[3] else ")")
    )
    return binary | calls | unary | conditional | children.map(lambda c: f"({c})")


numeric_text = st.recursive(st.sampled_from(ATOMS), _numeric, max_leaves=8)


@st.composite
def formula_texts(draw: st.DrawFn) -> str:
    """Mostly valid formulas (assignments + result), then perhaps damaged a little."""
    lines = [f"v{i} = {draw(numeric_text)}" for i in range(draw(st.integers(0, 2)))]
    result = draw(numeric_text)
    use_local = draw(st.booleans())
    if lines and use_local:
        result = f"{result} + v0"
    if draw(st.booleans()):
        result = f'if {result} > 3 then template("Spins") else {result}'
    text = "\n".join([*lines, result])
    damage = draw(st.sampled_from(["none", "none", "delete", "insert"]))
    if damage != "none" and text:
        at = draw(st.integers(0, len(text) - 1))
        if damage == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 4)) :]
        else:
            text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
    return text


def _evaluate_everywhere(formula: CompiledFormula) -> None:
    """A compiled formula decides for any complete inputs: it never raises."""
    event_sets = [
        (),
        (EventRecord(1, "bet", D(30), "EUR", T0, {"game_category": "Slots"}),
         EventRecord(2, "deposit", D(200), "USD", T0, {"level": D(3)}),
         EventRecord(3, "win", D("12.5"), "EUR", T0, {})),
    ]  # fmt: skip
    for events in event_sets:
        for properties in ({}, {"level": D(4), "Logins count ever": D(3)}, {"level": "x"}):
            for currency in ("EUR", "GBP", None):
                inputs = FormulaInputs(
                    aggregate_in_memory(formula.aggregates, events), properties, currency
                )
                evaluation = formula.evaluate(inputs, ResultOptions(rounding=RoundingMode.ROUND))
                assert evaluation.outcome in Outcome
                assert evaluation.explain()


@settings(max_examples=300, deadline=None, database=None)
@given(fragment_text)
def test_grammar_fragments_compile_or_fail_cleanly(text: str) -> None:
    formula = _compile_or_invalid(text)
    if formula is not None:
        _evaluate_everywhere(formula)


@settings(max_examples=200, deadline=None, database=None)
@given(formula_texts())
def test_generated_formulas_compile_or_fail_cleanly_and_evaluate(text: str) -> None:
    formula = _compile_or_invalid(text)
    if formula is not None:
        _evaluate_everywhere(formula)


# --- 2. per-customer slices of a batch equal single-customer aggregation --------------------

FORMULAS = [
    'sum(bet.amount where game_category != "Roulette") - sum(win.amount where game_category '
    '!= "Roulette")',
    "last(deposit.amount) * 10% + first(deposit.amount) - count(deposit)",
    'avg(bet.amount) + min(bet.amount) + max(bet.amount where currency = "EUR")',
    "sum(bet.level) + count(bet where level >= 2) + max(deposit.level where level < 5)",
    "n = count(deposit where amount > 10)\ntotal = sum(deposit.amount)\n"
    "if n > 2 then cap(total * 10%, 500) elif n > 0 then total * 5% else skip",
    "net = sum(deposit.amount) - sum(withdrawal.amount)\n"
    'if net > 100 then template("Free Spins") elif net > 0 then net else skip',
    'count(bet where game_category in ("Slots", "Roulette") and level not in (1, "x")) + '
    'sum(win.amount where game_category not in ("Slots") and currency != "USD")',
    "cap(sum(deposit.amount) * rate, cap_eur) + avg(withdrawal.amount where amount <= 50) / "
    "count(withdrawal)",
]


@functools.cache
def compiled(source: str) -> CompiledFormula:
    return compile_formula(source, variables=VARIABLES)


def make_event(
    kind: str, cents: int, currency: str, minute: int, category: str | None, level: Any
) -> EventRecord:
    attributes: dict[str, Any] = {}
    if category is not None:
        attributes["game_category"] = category
    if level is not None:
        attributes["level"] = level
    return EventRecord(
        event_id=0,
        kind=kind,
        amount=D(cents).scaleb(-2),
        currency=currency,
        occurred_at=T0 + timedelta(minutes=minute),
        attributes=attributes,
    )


events_strategy = st.builds(
    make_event,
    kind=st.sampled_from(["bet", "win", "deposit", "withdrawal", "login"]),
    cents=st.integers(-1_000, 100_000),
    currency=st.sampled_from(["EUR", "USD"]),
    minute=st.integers(0, 4),  # few instants, so first/last ties happen often
    category=st.sampled_from([None, "Slots", "Roulette"]),
    level=st.sampled_from([None, D(1), D(2), D("4.5"), D(7), "x", True]),
)

batch_strategy = st.lists(st.tuples(st.integers(0, 3), events_strategy), max_size=40).map(
    # unique event ids, in an order unrelated to time
    lambda pairs: [
        (cid, EventRecord(1_000 - i, e.kind, e.amount, e.currency, e.occurred_at, e.attributes))
        for i, (cid, e) in enumerate(pairs)
    ]
)


@settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.sampled_from(FORMULAS), batch_strategy, st.randoms(use_true_random=False))
def test_batch_aggregation_matches_per_customer_aggregation(
    source: str, batch: list[tuple[int, EventRecord]], rnd: random.Random
) -> None:
    formula = compiled(source)
    specs = formula.aggregates
    by_customer = aggregate_in_memory_by_customer(specs, batch, customer_ids=range(5))
    shuffled = list(batch)
    rnd.shuffle(shuffled)
    by_customer_shuffled = aggregate_in_memory_by_customer(specs, shuffled)
    for customer in range(5):
        own = [e for cid, e in batch if cid == customer]
        single = aggregate_in_memory(specs, own)
        assert by_customer[customer] == single
        if own:  # event order never matters (first / last are by time, then id)
            assert by_customer_shuffled[customer] == single
        for currency in ("EUR", "USD"):
            alone = formula.evaluate(FormulaInputs(single, {}, currency))
            batched = formula.evaluate(FormulaInputs(by_customer[customer], {}, currency))
            assert alone == batched


# --- 3. the stored form round-trips to identical evaluations --------------------------------

options_strategy = st.builds(
    ResultOptions,
    rounding=st.sampled_from([RoundingMode.NONE, RoundingMode.ROUND, RoundingMode.ROUND_DOWN]),
    decimals=st.integers(0, 4),
    cap_amount=st.sampled_from([None, D(100), D("0.5")]),
    min_allowed=st.sampled_from([None, D(1)]),
)


@settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.sampled_from(FORMULAS),
    st.lists(events_strategy, max_size=15),
    st.sampled_from(["EUR", "USD", None]),
    options_strategy,
)
def test_stored_form_round_trips_to_identical_evaluations(
    source: str, events: list[EventRecord], currency: str | None, options: ResultOptions
) -> None:
    formula = compiled(source)
    stored = json.loads(json.dumps(formula.to_stored()))
    again = CompiledFormula.from_stored(stored)
    assert again == formula
    recompiled = CompiledFormula.from_stored({**stored, "version": 0})
    assert recompiled == formula
    events = [
        EventRecord(i, e.kind, e.amount, e.currency, e.occurred_at, e.attributes)
        for i, e in enumerate(events)
    ]
    inputs = FormulaInputs(aggregate_in_memory(formula.aggregates, events), {}, currency)
    expected = formula.evaluate(inputs, options)
    assert again.evaluate(inputs, options) == expected
    assert recompiled.evaluate(inputs, options) == expected


# --- 4. arithmetic agrees with Python's Decimal -------------------------------------------

numbers = st.integers(0, 500).map(lambda n: (str(D(n).scaleb(-1)), D(n).scaleb(-1)))


def _combine(children: Any) -> Any:
    ops = st.sampled_from(["+", "-", "*", "/"])

    def build(left: Any, op: str, right: Any) -> tuple[str, Decimal | None]:
        text = f"({left[0]} {op} {right[0]})"
        if left[1] is None or right[1] is None or (op == "/" and right[1] == 0):
            return text, None
        with localcontext(EVAL_CONTEXT):
            a, b = left[1], right[1]
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else D(0)}[op]
        return text, value

    return st.builds(build, children, ops, children)


expressions = st.recursive(numbers, _combine, max_leaves=12)


@settings(max_examples=150, deadline=None, database=None)
@given(expressions)
def test_arithmetic_matches_decimal(expression: tuple[str, Decimal | None]) -> None:
    text, expected = expression
    formula = compile_formula(text)
    evaluation = formula.evaluate(FormulaInputs({}, {}, None))
    if expected is None:
        assert evaluation.skip_reason is SkipReason.DIVISION_BY_ZERO
    elif expected <= 0:
        assert evaluation.skip_reason is SkipReason.ZERO_OR_NEGATIVE
    else:
        assert evaluation.amount == expected
