"""Audit of the formula language: crashes, positions and exact amounts.

DESIGN: bad input is an InvalidArgument with a line and column, never another exception; money
is exact Decimal. Evaluation turns every problem of the data into a skip with a reason.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InvalidArgument
from core.formula import (
    AggregateValue,
    CompiledFormula,
    Evaluation,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
    compile_formula,
)
from core.money import plain
from core.rounding import RoundingMode
from tests.unit.formula_helpers import ev, run

D = Decimal
VARIABLES: dict[str, Any] = {"rate": D("0.1"), "cap_eur": {"EUR": D(50)}, "tpl": "Spins"}


def _error(source: str, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        compile_formula(source, **kwargs)
    return err.value


def _position(exc: InvalidArgument) -> tuple[int, int]:
    return int(exc.metadata["line"]), int(exc.metadata["column"])


def _check_invalid(source: str, exc: InvalidArgument) -> None:
    """A formula error: known reason, a line and column inside the text, said in the message."""
    assert exc.reason in ("FORMULA_SYNTAX", "FORMULA_INVALID"), exc.reason
    line, column = _position(exc)
    lines = source.split("\n")
    assert 1 <= line <= len(lines), (line, len(lines))
    assert 1 <= column <= len(lines[line - 1]) + 1, (column, lines[line - 1])
    if "limit" not in exc.metadata or exc.metadata.get("limit") != "10000":
        assert exc.message.startswith(f"line {line}, column {column}: "), exc.message


def _chain(n: int) -> str:
    lines = ["v0=1", *(f"v{i}=v{i - 1}+1" for i in range(1, n)), f"v{n - 1}"]
    return "\n".join(lines)


def _empty_inputs(formula: CompiledFormula, **kwargs: Any) -> FormulaInputs:
    return FormulaInputs(
        aggregates={a.key: AggregateValue(D(0), 0) for a in formula.aggregates}, **kwargs
    )


# --- (a) properties -----------------------------------------------------------------------

TOKENS = [
    "sum(bet.amount)", "count(deposit)", "last(deposit.amount where game = \"A\")", "x", "y",
    "x = ", "y = ", "1", "0", "2.5", "5%", "%", "(", ")", "+", "-", "*", "/", "==", "<", "if",
    "then", "elif", "else", "and", "or", "not", "true", "skip", "customer.tier",
    'customer["a b"]', '"t"', '"\\q"', "round(", "floor(", "cap(", "min(", "template(", ",",
    "where", "in", "rate", "cap_eur", "tpl", "#c", "\n", "\r\n", "\r", "\t", ";", " ", "é",
    "\U0001f600", "\u2028", "\ufeff", "\x00", "1e999999", "9" * 31, "9" * 30,
]  # fmt: skip


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=25).map("".join))
def test_any_text_compiles_or_is_invalid_argument_at_a_position_inside_the_text(
    text: str,
) -> None:
    try:
        compile_formula(text, variables=VARIABLES)
    except InvalidArgument as exc:
        _check_invalid(text, exc)


NUMBERS = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=None),
    st.sampled_from([D(0), D("-0"), D("1E+999999"), D("-9E+999999"), D("1E-999999"),
                     D("123456789012345678901234567890123456789"), D("0.000000001"),
                     D("1E+40"), D("-1E+40")]),
    st.integers(-(10**40), 10**40),
)
PROPERTY_VALUES = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=5))
ATOMS = ["sum(bet.amount)", "count(deposit)", "avg(win.amount)", "last(deposit.amount)",
         'min(bet.amount where game != "R")', "1", "0", "3.5", "10%", "rate", "cap_eur",
         "customer.a", "customer.b", "skip"]  # fmt: skip


def _extend(children: Any) -> Any:
    binary = st.tuples(children, st.sampled_from(["+", "-", "*", "/"]), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"
    )
    calls = st.tuples(st.sampled_from(["cap", "min", "max"]), children, children).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})"
    )
    unary = st.tuples(st.sampled_from(["floor", "abs", "-", "round"]), children).map(
        lambda t: f"round({t[1]}, customer.d)" if t[0] == "round" else f"{t[0]}({t[1]})"
    )
    cond = st.tuples(children, st.sampled_from(["<", ">=", "==", "!="]), children,
                     children, children).map(
        lambda t: f"(if {t[0]} {t[1]} {t[2]} then {t[3]} else {t[4]})"
    )
    return binary | calls | unary | cond


EXPRESSIONS = st.recursive(st.sampled_from(ATOMS), _extend, max_leaves=8)
OPTIONS = st.builds(
    ResultOptions,
    rounding=st.sampled_from(list(RoundingMode)),
    decimals=st.integers(0, 8),
    factor=st.sampled_from([D("0.1"), D(3), D("0.000001"), D("1E+20")]),
    cap_amount=st.sampled_from([None, D(100), D("0.01")]),
    min_allowed=st.sampled_from([None, D(1), D(0)]),
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=EXPRESSIONS,
    props=st.dictionaries(st.sampled_from(["a", "b", "d"]), PROPERTY_VALUES),
    values=st.lists(st.one_of(st.none(), NUMBERS), min_size=5, max_size=5),
    counts=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    currency=st.sampled_from([None, "EUR", "eur", "USD", ""]),
    options=OPTIONS,
)
def test_evaluation_of_generated_formulas_never_raises(
    expression: str, props: dict[str, Any], values: list[Any], counts: list[int],
    currency: str | None, options: ResultOptions,
) -> None:
    try:
        formula = compile_formula(expression, variables=VARIABLES)
    except InvalidArgument as exc:  # e.g. skip in a calculation, a static type error
        _check_invalid(expression, exc)
        return
    aggregates = {}
    for index, spec in enumerate(formula.aggregates):
        value = values[index % 5]
        value = D(value) if isinstance(value, int) else value
        aggregates[spec.key] = AggregateValue(value, counts[index % 5])
    result = formula.evaluate(
        FormulaInputs(aggregates=aggregates, properties=props, currency=currency), options
    )
    assert isinstance(result, Evaluation)
    if result.outcome is Outcome.SKIPPED:
        assert result.skip_reason is not None and result.skip_detail
    elif result.outcome is Outcome.AMOUNT:
        assert result.amount is not None and result.amount > 0
    result.explain()


# --- (b) targeted: crashes ----------------------------------------------------------------


def test_the_longest_chain_of_assignments_allowed_evaluates() -> None:
    """150 chained names (v149 = v148 + 1 ...): 300 nested steps, the documented maximum
    (MAX_EVALUATION_DEPTH); it evaluates, inside pytest's deeper stack too."""
    formula = compile_formula(_chain(150))
    result = formula.evaluate(FormulaInputs())
    assert (result.outcome, result.amount) == (Outcome.AMOUNT, D(150))


def test_a_longer_chain_is_formula_invalid_at_the_name_that_goes_too_deep() -> None:
    """800 statements fit the 10,000 characters, but evaluating them nests 1,600 calls deep:
    it used to escape as RecursionError (INTERNAL); now the compiler refuses it, naming the
    first name past the limit with its line."""
    source = _chain(800)
    assert len(source) < 10_000
    exc = _error(source)
    assert exc.reason == "FORMULA_INVALID"
    assert exc.message == (
        "line 151, column 1: 'v150' is computed through 301 nested steps, counting the steps "
        "of the names it uses (at most 300); compute it from fewer chained names")


@pytest.mark.parametrize("depth", [1_000, 4_900])
def test_redundant_parentheses_by_thousands(depth: int) -> None:
    assert run("(" * depth + "2 * 3" + ")" * depth).amount == D(6)


@pytest.mark.parametrize("source", ["-" * 9_000 + "1", "not " * 2_400 + "true",
                                    "abs(" * 1_000 + "1" + ")" * 1_000,
                                    "(-" * 3_000 + "1" + ")" * 3_000])
def test_deep_nesting_is_formula_invalid_with_a_position(source: str) -> None:
    exc = _error(source)
    assert exc.reason == "FORMULA_INVALID"
    _check_invalid(source, exc)


def test_long_flat_sum_is_fine() -> None:
    assert run("1+" * 4_999 + "1").amount == D(5_000)


@pytest.mark.parametrize("length", [10_000, 10_001, 1_000_000])
def test_source_length_limit(length: int) -> None:
    source = ("1+" * length)[:length - 1] + "1"
    if length <= 10_000:
        assert compile_formula(source)
    else:
        exc = _error(source)
        assert exc.reason == "FORMULA_INVALID" and exc.metadata["limit"] == "10000"


# --- (b) targeted: exact amounts -----------------------------------------------------------


def test_negating_a_30_digit_literal_is_exact() -> None:
    assert run("abs(-123456789012345678901234567891)").amount == D(
        "123456789012345678901234567891"
    )


def test_subtracting_a_negated_30_digit_literal_is_exact() -> None:
    assert run("0 - -123456789012345678901234567891").amount == D(
        "123456789012345678901234567891"
    )


def test_a_30_digit_percentage_is_exact() -> None:
    assert run("123456789012345678901234567891% * 100").amount == D(
        "123456789012345678901234567891"
    )


def test_a_negative_30_digit_filter_value_is_exact() -> None:
    formula = compile_formula("sum(bet.amount where amount > -123456789012345678901234567891)")
    assert formula.aggregates[0].filters[0].values == (D("-123456789012345678901234567891"),)


def test_plain_keeps_large_integers_from_formulas() -> None:
    # 10^54 is exact in the 34-digit evaluation context (the server formats raw values this way).
    raw = run("1000000000000000000 * 1000000000000000000 * 1000000000000000000").raw_value
    assert raw == D(10) ** 54
    assert plain(raw) == D(10) ** 54


def test_plain_of_an_exponent_form_integer() -> None:
    assert str(plain(D("1E+28"))) == "1" + "0" * 28


@pytest.mark.parametrize(("source", "amount"), [
    ("5% * 10%", "0.005"),
    ("200 * 5% * 10%", "1"),
    ("0.1 + 0.2", "0.3"),
    ("100 * 0.1 * 0.1", "1"),
    ("12.34 - 2.34", "10"),
    ("round(2.735, 2)", "2.74"),
    ("round(2.734, 2)", "2.73"),
    ("round(2.5)", "3"),
    ("floor(5.789)", "5"),
    ("cap(1000, 200)", "200"),
    ("max(1, 2, 3)", "3"),
    ("abs(-2.5)", "2.5"),
    ("999999999999999999999999999999 + 1", "1000000000000000000000000000000"),
    ("999999999999999999999999999999 * 999", "998999999999999999999999999999001"),
])
def test_exact_amounts(source: str, amount: str) -> None:
    result = run(source)
    assert result.outcome is Outcome.AMOUNT
    assert result.amount == D(amount)


@pytest.mark.parametrize("source", ["1 / 0", "10 / (1 - 1)", "x = 0\n5 / x", "1 / 0.0",
                                    "1 / -0", "sum(bet.amount) / (count(bet) - 1)"])
def test_division_by_zero_is_a_skip(source: str) -> None:
    result = run(source, [ev("bet", "0")])
    assert result.outcome is Outcome.SKIPPED
    assert result.skip_reason is SkipReason.DIVISION_BY_ZERO


def test_overflow_of_a_huge_property_is_a_skip_not_an_exception() -> None:
    result = run("customer.x * 10", properties={"x": D("9E+999999")})
    assert result.outcome is Outcome.SKIPPED and result.skip_reason is SkipReason.TYPE_ERROR


def test_rounding_a_huge_property_is_exact() -> None:
    value = D("123456789012345678901234567890123456789.125")
    result = run("customer.x", properties={"x": value},
                 options=ResultOptions(rounding=RoundingMode.ROUND, decimals=2))
    assert result.amount == D("123456789012345678901234567890123456789.13")


@pytest.mark.parametrize(("raw", "factor", "decimals", "amount"), [
    ("34.75", "0.1", 0, "34.8"),
    ("11", "3", 0, "12"),
    ("1.5", "3", 0, "3"),
    ("7", "0.25", 2, "7.00"),
    ("1000000000000000000000000000000.5", "0.000001", 2,
     "1000000000000000000000000000000.500000"),
])
def test_mround(raw: str, factor: str, decimals: int, amount: str) -> None:
    options = ResultOptions(rounding=RoundingMode.MROUND, decimals=decimals, factor=D(factor))
    result = run("customer.x", properties={"x": D(raw)}, options=options)
    assert str(result.amount) == amount


def test_mround_to_zero_is_zero_or_negative() -> None:
    options = ResultOptions(rounding=RoundingMode.MROUND, decimals=0, factor=D(3))
    result = run("1", options=options)
    assert result.skip_reason is SkipReason.ZERO_OR_NEGATIVE


@pytest.mark.parametrize("decimals", [D(9), D("2.5"), D(-1), D("1E+3")])
def test_round_with_runtime_decimals_out_of_range_is_a_type_error_skip(decimals: D) -> None:
    result = run("round(2.5, customer.d)", properties={"d": decimals})
    assert result.skip_reason is SkipReason.TYPE_ERROR
    assert "line 1, column 1" in (result.skip_detail or "")


@pytest.mark.parametrize("source", ["round(1, 9)", "round(1, 2.5)", "round(1, -1)"])
def test_round_with_literal_decimals_out_of_range_is_invalid(source: str) -> None:
    exc = _error(source)
    assert exc.reason == "FORMULA_INVALID" and _position(exc) == (1, source.index(",") + 3)


def test_where_filters_on_missing_attributes() -> None:
    events = [ev("bet", "10", game="A"), ev("bet", "20"), ev("bet", "40", game="B")]
    assert run('sum(bet.amount where game = "A")', events).amount == D(10)
    assert run('sum(bet.amount where game != "A")', events).amount == D(60)
    assert run('sum(bet.amount where game in ("A", "B"))', events).amount == D(50)
    assert run('sum(bet.amount where game not in ("A", "B"))', events).amount == D(20)
    assert run("count(bet where level > 1)", events).skip_reason is (
        SkipReason.NO_MATCHING_TRANSACTIONS
    )
    assert run("count(bet where level > 1) + 1", events).skip_reason is (
        SkipReason.NO_MATCHING_TRANSACTIONS
    )
    missing = run("avg(bet.level)", events)
    assert missing.skip_reason is SkipReason.NO_MATCHING_TRANSACTIONS


# --- (b) targeted: positions ---------------------------------------------------------------


@pytest.mark.parametrize(("source", "position"), [
    ("1e999999", (1, 2)),
    ("5%%", (1, 3)),
    ("x = 1\ny = x +\n", (2, 8)),
    ("x = 1\r\ny = x +\r\n", (2, 8)),
    ("x = 1\r\n\r\ny = )", (3, 5)),
    ("x = 1\n\tfoo(1)", (2, 2)),
    ("\t\t1 +\t)", (1, 7)),
    ("x = 1 # note\ny = 2 # note\nz +", (3, 4)),
    ("é = 1", (1, 1)),
    ('x = "\U0001f600" +\n"a" * ;', (2, 6)),
    ('x = "\U0001f600" +\n"a" * )', (2, 7)),
    ('t = "\U0001f600\\q"\n1', (1, 7)),
    ("x = 1\ny = 2\nx = 3\nx", (3, 1)),
    ("x = 1\nx = 2\nx", (2, 1)),
    ("flor(1)", (1, 1)),
    ("1 +\n  unknown_thing", (2, 3)),
    ("customer.x + sum(bet.amount where amount = \"x\")", (1, 35)),
    ("9" * 31, (1, 1)),
    ("1 + " + "9" * 31, (1, 5)),
    ("1 <\n2 < 3", (2, 3)),
    ("if 1 then 2", (1, 4)),
    ("\ufeff1", (1, 1)),
    ("x = 1 \u2028 2", (1, 7)),
    ("", (1, 1)),
    ("# only a comment\n\n", (1, 1)),
])
def test_error_positions(source: str, position: tuple[int, int]) -> None:
    exc = _error(source)
    _check_invalid(source, exc)
    assert _position(exc) == position, exc.message


def test_crlf_and_lf_give_the_same_positions() -> None:
    sources = ["x = 1\ny = x * \n(2 +\n3 +)", "a = 1\nb = 2\nc = foo(a)\nc",
               "t = 5\nif t > 1 then 2\nelse\n  \"x\" * 2"]
    for source in sources:
        lf, crlf = _error(source), _error(source.replace("\n", "\r\n"))
        assert _position(lf) == _position(crlf)


def test_comments_and_separators_are_ignored() -> None:
    assert run("# head\n\nx = 2 # two\n;; y = x * 3 ;\n# tail\ny # result\n").amount == D(6)


def test_unicode_text_is_kept() -> None:
    result = run('if customer.tier == "Gölд \U0001f600" then template("Spins \U0001f600")',
                 properties={"tier": "Gölд \U0001f600"})
    assert result.template == "Spins \U0001f600"


def test_keyword_prefixes_are_names() -> None:
    assert run("iffy = 2\nandrew = 3\nor_x = 4\ncustomers = 5\niffy * andrew * or_x * customers"
               ).amount == D(120)
