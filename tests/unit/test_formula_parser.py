"""Formula syntax: what parses, and the exact errors (line, column, message) for what does not."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.errors import InvalidArgument
from core.formula import (
    MAX_NESTING_DEPTH,
    AggregateSpec,
    Filter,
    compile_formula,
)
from core.formula import ast as nodes

D = Decimal


def error_of(source: str, **variables: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        compile_formula(source, variables=variables or None)  # type: ignore[arg-type]
    return info.value


# --- what parses ---------------------------------------------------------------------------


def test_the_seed_example_compiles() -> None:
    formula = compile_formula(
        "# comment\n"
        'net_loss = sum(bet.amount where game_category != "Roulette") - '
        'sum(win.amount where game_category != "Roulette")\n'
        "if net_loss > 500 then net_loss * 5%\n"
        "elif net_loss > 300 then net_loss * 3%\n"
        "else net_loss * 1%\n"
    )
    roulette = (Filter("game_category", "!=", ("Roulette",)),)
    assert formula.aggregates == (
        AggregateSpec("a0", "sum", "bet", "amount", roulette),
        AggregateSpec("a1", "sum", "win", "amount", roulette),
    )
    assert [a.name for a in formula.program.assignments] == ["net_loss"]
    result = formula.program.result
    assert isinstance(result, nodes.Conditional)
    assert [b.text for b in result.branches] == ["net_loss > 500", "net_loss > 300"]
    assert formula.returns_amount and not formula.returns_template


@pytest.mark.parametrize(
    "source",
    [
        "a = 1; b = 2; a + b",
        "a = 1;;\n\n; b = 2\n\n\na + b\n\n",
        "  # leading comment\n\na = 1  # trailing comment\n# between\na + 1",
        "x = (1 +\n 2)\nx",
        "x = 1 +\n 2\nx",
        "x = 2\n* 3\nx",  # a line starting with '*' continues the statement
        "if 1 > 0\n  then 5\n  else 6",
        "if 1 > 0 and\n 2 > 1\n or 3 > 4 then 1 else 2",
        'sum(\n  bet.amount\n  where game in ("a",\n "b")\n  and amount >= 10\n)',
        "cap(\n  1,\n  2\n)",
        "x = 1\r\nx * 2\r\n",
    ],
)
def test_layouts_that_parse(source: str) -> None:
    compile_formula(source)


def test_percentages_and_literals() -> None:
    formula = compile_formula('x = 12.5% + 0.05 + 5%\nif "a" == "a" and true then x else 0')
    value = formula.program.assignments[0].value
    assert isinstance(value, nodes.Arithmetic)
    assert isinstance(value.first, nodes.Number) and value.first.value == D("0.125")


def test_string_escapes() -> None:
    formula = compile_formula('template("say \\"hi\\" \\\\ bye")')
    assert formula.templates_used == ('say "hi" \\ bye',)


def test_a_leading_minus_line_starts_a_new_statement() -> None:
    # "x = 1" then the result "-2": documented, since '-' may be a unary minus.
    formula = compile_formula("x = 1\n-2")
    result = formula.program.result
    assert isinstance(result, nodes.Number) and result.value == D(-2)


def test_identical_aggregates_share_a_key_in_order_of_first_appearance() -> None:
    formula = compile_formula(
        "a = sum(bet.amount) + count(bet)\n"
        'b = sum(bet.amount) - max(win.amount where game = "x")\n'
        'a + b + count(bet) + max(win.amount where game == "x")'
    )
    assert [(s.key, s.describe()) for s in formula.aggregates] == [
        ("a0", "sum(bet.amount)"),
        ("a1", "count(bet)"),
        ("a2", 'max(win.amount where game = "x")'),
    ]


def test_min_and_max_are_aggregates_with_one_field_and_functions_with_more() -> None:
    formula = compile_formula("min(deposit.amount) + max(1, 2, 3) + min(4, 5)")
    assert [s.func for s in formula.aggregates] == ["min"]
    calls = [n for n in nodes.walk(formula.program) if isinstance(n, nodes.Call)]
    assert [c.function for c in calls] == ["max", "min"]


def test_filters_of_every_kind() -> None:
    formula = compile_formula(
        'count(bet where game = "a" and game_category != "b" and product in ("c", "d")'
        ' and tag not in ("e") and level < 5 and level > -1 and amount <= 10.5'
        ' and amount >= 1 and currency == "EUR")'
    )
    assert formula.aggregates[0].filters == (
        Filter("game", "=", ("a",)),
        Filter("game_category", "!=", ("b",)),
        Filter("product", "in", ("c", "d")),
        Filter("tag", "not in", ("e",)),
        Filter("level", "<", (D(5),)),
        Filter("level", ">", (D(-1),)),
        Filter("amount", "<=", (D("10.5"),)),
        Filter("amount", ">=", (D(1),)),
        Filter("currency", "=", ("EUR",)),
    )


def test_properties_variables_and_templates_used() -> None:
    formula = compile_formula(
        'if customer.tier == "Gold" and customer["Logins count ever"] > 3 '
        "then template(welcome) else cap(rate * 100, max_bonus)",
        variables={"welcome": "Welcome pack", "rate": D("0.1"), "max_bonus": {"EUR": D(5)},
                   "unused": D(1)},
    )  # fmt: skip
    assert formula.properties_used == ("tier", "Logins count ever")
    assert formula.variables_used == ("welcome", "rate", "max_bonus")
    assert formula.templates_used == ("Welcome pack",)
    assert formula.returns_amount and formula.returns_template


# --- syntax errors: exact position and message ----------------------------------------------

SYNTAX_ERRORS = [
    (
        "net = sum(deposit.amount)\nnet *",
        2, 6, "line 2, column 6: the formula ends too early: expected an expression after '*'",
    ),
    (
        "net = sum(deposit.amount)\nbonus = net * (5% + )\nbonus",
        2, 21, "line 2, column 21: expected an expression after '+', but found ')'",
    ),
    (
        "x = sum(bet.amount\nx",
        2, 1, "line 2, column 1: unexpected name 'x' after 'amount': expected an operator "
        "(+ - * / == < and or ...), ')', ',' or 'where' (a '(' is not closed: is a ')' missing "
        "on line 1?)",
    ),
    (
        "if sum(bet.amount) > 500 then 5\nelif sum(bet.amount) > 300 4\nelse 1",
        2, 28, "line 2, column 28: unexpected number 4 after '300': expected an operator "
        "(+ - * / == < and or ...) or 'then' (an operator is missing between the two)",
    ),
    (
        "if last(deposit.amount) = 100 then 10 else 0",
        1, 25, "line 1, column 25: unexpected '=' after ')': expected an operator "
        "(+ - * / == < and or ...) or 'then' ('=' gives a name a value; to compare two values "
        "use '==')",
    ),
    (
        "a = 1\nb = 2\na < b < 3",
        3, 7, "line 3, column 7: unexpected '<' after 'b': expected 'and', 'or' or the end of "
        "the line (comparisons cannot be chained; combine them with 'and')",
    ),
    (
        "sum(bet.amount where game_category != Roulette)",
        1, 39, "line 1, column 39: unexpected name 'Roulette' after '!=': expected a text in "
        'double quotes or a number (text goes in double quotes: "Roulette")',
    ),
    (
        'sum(bet.amount where game_category != "Roulette" or game = "x")',
        1, 50, "line 1, column 50: unexpected 'or' after '\"Roulette\"': expected ')', ',' or "
        "'and'",
    ),
    (
        "bonus = 10 % 3\nbonus",
        1, 12, "line 1, column 12: unexpected character '%': a percent sign must follow a "
        "number directly, like 5%",
    ),
    (
        "template('Free Spins')",
        1, 10, "line 1, column 10: unexpected character \"'\": use double quotes for text, "
        'like "Roulette"',
    ),
    (
        "x = 5\ny = x * 2",
        2, 10, "line 2, column 10: the formula has no result: it ends with an assignment; add "
        "a last line with the result to give (for example just the name you assigned)",
    ),
    (
        "total = sum(deposit.amount))\ntotal",
        1, 28, "line 1, column 28: unexpected ')' after ')': expected the end of the line "
        "(there is no '(' for this ')')",
    ),
    (
        "count(deposit where amount in 5, 6)",
        1, 31, "line 1, column 31: unexpected number 5 after 'in': expected '('",
    ),
    (
        "", 1, 1, "line 1, column 1: the formula is empty: write a result, e.g. "
        "sum(deposit.amount) * 10%",
    ),
    (
        "# just a comment\n", 1, 1, "line 1, column 1: the formula is empty: write a result, "
        "e.g. sum(deposit.amount) * 10%",
    ),
    (
        "10 @ 5", 1, 4, "line 1, column 4: unexpected character '@': it has no meaning in a "
        "formula",
    ),
    (
        'x = "open\nx', 1, 5, "line 1, column 5: unexpected character '\"': this text is not "
        "closed: add the closing '\"' on the same line",
    ),
    (
        "if sum(bet.amount) > 1 then 2 elseif 3",
        1, 31, "line 1, column 31: unexpected name 'elseif' after '2': expected an operator "
        "(+ - * / == < and or ...), 'elif', 'else' or the end of the line (write 'elif')",
    ),
    (
        "net = sum(deposit.amount)\n\n  bonus = net * 10%\n  if bonus > 100 then 100 else "
        "bonus 5",
        4, 38, "line 4, column 38: unexpected number 5 after 'bonus': expected an operator "
        "(+ - * / == < and or ...) or the end of the line (an operator is missing between the "
        "two)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), SYNTAX_ERRORS)
def test_syntax_errors(source: str, line: int, column: int, message: str) -> None:
    error = error_of(source)
    assert error.reason == "FORMULA_SYNTAX"
    assert (error.metadata["line"], error.metadata["column"]) == (str(line), str(column))
    assert error.message == message


# --- static errors: exact position and message ----------------------------------------------

VARIABLES = {"max_bonus": {"EUR": D(200), "USD": D(250)}, "rate": D("0.1")}

STATIC_ERRORS = [
    ('"a" * 2', 1, 1, "line 1, column 1: '*' needs a number, but this is text"),
    (
        'template("x") + 1',
        1, 1, "line 1, column 1: a bonus template can only be the result of the formula, not "
        "part of '+'",
    ),
    ('if template("x") == 1 then 1', 1, 4, "line 1, column 4: a bonus template cannot be compared"),
    (
        "x = 1\nx = 2\nx",
        2, 1, "line 2, column 1: 'x' is already assigned on line 1; use a different name for "
        "each step",
    ),
    (
        "max_bonus = 5\nmax_bonus",
        1, 1, "line 1, column 1: 'max_bonus' is a promotion variable; a local name cannot "
        "replace it, choose another name",
    ),
    (
        "a = b * 2\nb = 1\na",
        1, 5, "line 1, column 5: 'b' is used before it is assigned (on line 2); move the "
        "assignment above this line",
    ),
    ("a = a + 1\na", 1, 5, "line 1, column 5: 'a' is used in its own definition"),
    (
        "net_loss = 1\nnet_los * 2",
        2, 1, "line 2, column 1: unknown name 'net_los'; did you mean 'net_loss'?",
    ),
    (
        "deposit * 10%",
        1, 1, "line 1, column 1: unknown name 'deposit' (names come from assignments above or "
        "from the promotion's variables; for events use an aggregate like sum(deposit.amount) "
        "or count(deposit))",
    ),
    ("sum(amount)", 1, 5, "line 1, column 5: sum takes an event field, like sum(deposit.amount)"),
    (
        "count(deposit.amount)",
        1, 7, 'line 1, column 7: count takes an event kind, like count(deposit) or '
        'count(bet where game = "Gold Quest")',
    ),
    (
        "min(5)",
        1, 1, "line 1, column 1: min takes 2 to 1,000 values: min(a, b, ...) or "
        "min(deposit.amount)",
    ),
    (
        "bet.amount * 5%",
        1, 1, "line 1, column 1: bet.amount is an event field; use it inside an aggregate such "
        "as sum(bet.amount), last(bet.amount) or count(bet). Customer properties are written "
        "customer.name",
    ),
    ("summ(bet.amount)", 1, 1, "line 1, column 1: unknown function 'summ'; did you mean 'sum'?"),
    (
        "round(sum(bet.amount), 9)",
        1, 24, "line 1, column 24: round takes a whole number of decimals from 0 to 8",
    ),
    (
        "template(customer.tier)",
        1, 10, 'line 1, column 10: the template name must be text in quotes, like '
        'template("10 Free Spins"), or a text variable',
    ),
    ('if 1 == "a" then 1', 1, 6, "line 1, column 6: '==' compares a number with text; they are "
     "never equal"),
    (
        "if 5 then 1 else 2",
        1, 4, "line 1, column 4: an 'if' condition must be true or false (a comparison such as "
        "x > 5), but this is a number",
    ),
    (
        'sum(bet.amount where amount = "x")',
        1, 22, "line 1, column 22: amount is a number; compare it with numbers",
    ),
    (
        'sum(bet.amount where level < "x")',
        1, 22, "line 1, column 22: '<' compares with a number, not text",
    ),
    (
        "sum = 5\nsum",
        1, 1, "line 1, column 1: 'sum' is the name of a function; choose another name",
    ),
    ('"a\\n"', 1, 3, "line 1, column 3: unknown escape '\\n' in text: only \\\" and \\\\ are "
     "allowed"),
    ("skip + 1", 1, 1, "line 1, column 1: 'skip' cannot be part of '+'"),
    (
        'flag = customer.tier == "Gold"\nflag',
        2, 1, "line 2, column 1: the result must be an amount, a bonus template or skip, but "
        "this gives true/false",
    ),
    (
        "cap(1, 2 where x = 1)",
        1, 10, "line 1, column 10: 'where' filters events, so it only works inside an "
        'aggregate such as sum(bet.amount where game = "Gold Quest"), not in cap(...)',
    ),
    (
        "1" + "0" * 40,
        1, 1, "line 1, column 1: the number 100000000000... is too long (over 30 characters)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), STATIC_ERRORS)
def test_static_errors(source: str, line: int, column: int, message: str) -> None:
    error = error_of(source, **VARIABLES)
    assert error.reason == "FORMULA_INVALID"
    assert (error.metadata["line"], error.metadata["column"]) == (str(line), str(column))
    assert error.message == message


# --- variables -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables",
    [
        {"rate": 0.1},
        {"rate": True},
        {"rate": D("NaN")},
        {"max": D(1)},
        {"if": D(1)},
        {"has space": D(1)},
        {"cap_eur": {}},
        {"cap_eur": {"EUR": 1.5}},
        {"cap_eur": {"EUR": D(1), "eur": D(2)}},
    ],
)
def test_invalid_variables(variables: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_formula("1", variables=variables)  # type: ignore[arg-type]
    assert info.value.reason == "FORMULA_INVALID"
    assert "variable" in info.value.metadata


# --- limits --------------------------------------------------------------------------------


def test_source_length_limit() -> None:
    error = error_of("1 + " * 2_500 + "1")
    assert error.reason == "FORMULA_INVALID"
    assert error.message == "the formula is 10001 characters long; the limit is 10000"
    compile_formula("1+" * 4_999 + "1")  # 9,999 characters, a long but flat sum


def test_aggregate_limit() -> None:
    ok = " + ".join(f"count(bet where level = {i})" for i in range(64))
    assert len(compile_formula(ok).aggregates) == 64
    error = error_of(ok + " + count(bet where level = 64)")
    assert error.reason == "FORMULA_INVALID"
    assert "more than 64 different aggregates" in error.message
    # repeating the same aggregate does not count twice
    assert len(compile_formula(ok + " + count(bet where level = 0)").aggregates) == 64


@pytest.mark.parametrize(
    "source",
    [
        "-" * 3_000 + "1",
        "not " * 2_000 + "true",
        "abs(" * 2_000 + "1" + ")" * 2_000,
        "(1 + " * 1_600 + "1" + ")" * 1_600,
        "if true then (" * 600 + "1" + ")" * 600,
    ],
)
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(source: str) -> None:
    error = error_of(source[:10_000])
    assert error.reason in ("FORMULA_INVALID", "FORMULA_SYNTAX")
    if error.reason == "FORMULA_INVALID":
        assert f"nested more than {MAX_NESTING_DEPTH} levels" in error.message


def test_nesting_at_the_limit_is_fine() -> None:
    """formulas.proto: 50 levels of nesting, counted in operations (the innermost number is
    not a level: it was, and 50 nested operations were refused)."""
    compile_formula("abs(" * MAX_NESTING_DEPTH + "1" + ")" * MAX_NESTING_DEPTH)
    compile_formula("-" * MAX_NESTING_DEPTH + "1")
    error = error_of("abs(" * (MAX_NESTING_DEPTH + 1) + "1" + ")" * (MAX_NESTING_DEPTH + 1))
    assert error.metadata["line"] == "1"
    assert error_of("-" * (MAX_NESTING_DEPTH + 1) + "1").reason == "FORMULA_INVALID"


def test_redundant_parentheses_do_not_count_as_nesting() -> None:
    compile_formula("(" * 3_000 + "1" + ")" * 3_000)


def test_non_text_source() -> None:
    error = error_of(123)  # type: ignore[arg-type]
    assert error.reason == "FORMULA_INVALID"
