"""The dynamic-bonus formula language: operators write it, the batch calculation runs it.

A formula computes one customer's reward from their events in the transaction period (bets,
wins, deposits, withdrawals, orders or any custom kind), their properties and the promotion's
variables. It gives an amount, a bonus template, or ``skip``.

Example (5% / 3% / 1% of the net loss outside Roulette)::

    # net loss outside Roulette
    net_loss = sum(bet.amount where game_category != "Roulette") -
               sum(win.amount where game_category != "Roulette")
    if net_loss > 500 then net_loss * 5%
    elif net_loss > 300 then net_loss * 3%
    else net_loss * 1%

Structure
    Zero or more assignments ``name = expression``, then exactly one result expression. Each
    statement ends at the end of its line (or at ``;``). A statement continues on the next line
    inside parentheses, after an operator or keyword that needs more (``+ - * / == and or then
    else = ,`` ...), and before a line that starts with ``then``, ``elif``, ``else``, ``and``,
    ``or``, ``*``, ``/`` or a comparison. A line starting with ``+`` or ``-`` starts a new
    statement (put the operator at the end of the previous line instead). ``#`` starts a
    comment. Names are letters, digits and ``_``, case-sensitive; a name is assigned once,
    before it is used, and may not shadow a promotion variable or a function.

Values
    Numbers ``12``, ``0.05``; percentages ``5%`` (= 0.05); text ``"Roulette"`` (double quotes,
    ``\\"`` and ``\\\\`` escapes); ``true`` / ``false``; ``skip`` (no reward);
    ``template("10 Free Spins on Golden Quest")`` (give a bonus template; the name is text in
    quotes or a text variable).

Operators, loosest first
    ``if C then X elif C then X ... else X`` (``else`` may be left out: it means ``else skip``;
    a condition or a ``then`` value that is itself an ``if`` needs parentheses, an ``else`` value
    does not); ``or``; ``and``; ``not``; comparisons ``== != < > <= >=`` (not chainable: write
    ``a < b and b < c``); ``+ -``; ``* /``; unary ``-``; parentheses. Division by zero skips the
    reward (DIVISION_BY_ZERO) rather than failing the batch.

Aggregates over the customer's events in the period
    ``sum(kind.field)``, ``avg(kind.field)``, ``min(kind.field)``, ``max(kind.field)``,
    ``first(kind.field)``, ``last(kind.field)`` (first / last by time, ties by event id),
    ``count(kind)``. ``field`` is ``amount`` or a numeric attribute. An optional filter goes
    inside the parentheses: ``where <condition> and <condition> ...`` with conditions
    ``attr = "x"`` (or ``==``), ``attr != "x"``, ``attr in ("a", "b")``,
    ``attr not in ("a", "b")``, ``attr < 5``, ``attr > 5``, ``attr <= 5``, ``attr >= 5``, where
    ``attr`` is an event attribute (``game``, ``game_category``, ``product``...) or the
    pseudo-attributes ``amount`` and ``currency``. Filter values are literals. A missing
    attribute never matches ``=``, ``in`` or an ordering and always matches ``!=`` and
    ``not in``. Identical aggregates are computed once. See :mod:`core.formula.memory` for the
    exact semantics.

Functions
    ``min(a, b, ...)``, ``max(a, b, ...)`` (two or more values; with one ``kind.field`` they are
    the aggregates), ``cap(x, limit)`` (= min), ``floor(x)``, ``abs(x)``,
    ``round(x, decimals)`` (half away from zero; decimals 0..8, default 0).

Customer properties and variables
    ``customer.tier``, ``customer.logins_count_ever`` or ``customer["Logins count ever"]``
    (text, number, true/false; a missing one skips with MISSING_PROPERTY, except that ``==`` /
    ``!=`` directly on a property treat it as equal to nothing). Promotion variables are used
    by bare name; a per-currency variable (``{"EUR": 200, "USD": 250}``) takes the customer's
    currency's value (none: MISSING_CURRENCY_VALUE).

More examples::

    10% of the last deposit:            last(deposit.amount) * 10%
    Tiered cashback:                    d = last(deposit.amount)
                                        if d > 200 then d * 30%
                                        elif d > 100 then d * 20%
                                        elif d >= 50 then d * 10%
                                        else skip
    Net deposit, capped by a variable:  cap(sum(deposit.amount) - sum(withdrawal.amount), max_bonus)
    A template:                         net = sum(deposit.amount) - sum(withdrawal.amount)
                                        if net > 100 then template("10 Free Spins on Golden Quest")
    Properties only:                    customer["Logins count ever"] * 2

Limits: 10,000 characters, 64 distinct aggregates, 50 levels of nesting. Every problem is an
InvalidArgument: reason FORMULA_SYNTAX or FORMULA_INVALID, with ``line`` and ``column``.

Public API: :func:`compile_formula` -> :class:`CompiledFormula` (``aggregates`` to compute,
``evaluate(inputs, options)`` -> :class:`Evaluation`, ``to_stored`` / ``from_stored``);
:func:`aggregate_in_memory` and :func:`aggregate_in_memory_by_customer` are the reference
aggregation the SQL batch path mirrors.
"""

from core.formula.compiler import CompiledFormula, VariableValue, compile_formula
from core.formula.evaluator import (
    DEFAULT_RESULT_OPTIONS,
    Evaluation,
    Outcome,
    ResultOptions,
    SkipReason,
)
from core.formula.memory import (
    EventRecord,
    aggregate_in_memory,
    aggregate_in_memory_by_customer,
    average,
    empty_aggregates,
    filter_matches,
    inputs_from_events,
)
from core.formula.model import (
    FORMULA_LANGUAGE_VERSION,
    AggregateSpec,
    AggregateValue,
    Filter,
    FormulaInputs,
)
from core.formula.parser import MAX_NESTING_DEPTH, MAX_SOURCE_LENGTH

__all__ = [
    "DEFAULT_RESULT_OPTIONS",
    "FORMULA_LANGUAGE_VERSION",
    "MAX_NESTING_DEPTH",
    "MAX_SOURCE_LENGTH",
    "AggregateSpec",
    "AggregateValue",
    "CompiledFormula",
    "Evaluation",
    "EventRecord",
    "Filter",
    "FormulaInputs",
    "Outcome",
    "ResultOptions",
    "SkipReason",
    "VariableValue",
    "aggregate_in_memory",
    "aggregate_in_memory_by_customer",
    "average",
    "compile_formula",
    "empty_aggregates",
    "filter_matches",
    "inputs_from_events",
]
