"""Evaluating a compiled formula for one customer, and turning its value into a reward decision.

The tree is turned once into nested Python closures (no ``eval``, no per-call dispatch on node
types), then run per customer. Values are Decimal, text, true/false or a bonus template.
Assignments are evaluated lazily, on first use, and remembered: a branch not taken reads no
aggregate, so ``aggregates_used`` lists exactly what the decision depended on.

Pipeline (the order matters, and here is why):

1. **Evaluate.** A problem met on the way stops the evaluation with a skip reason:
   ``skip`` reached (EXPLICIT_SKIP, also when no ``if`` branch matched and there is no
   ``else``), a division by zero (DIVISION_BY_ZERO), a customer property without a value used
   in a calculation (MISSING_PROPERTY), a per-currency variable with no value for the customer's
   currency (MISSING_CURRENCY_VALUE), a value of the wrong type, e.g. a text property in a
   calculation (TYPE_ERROR), or an avg / min / max / first / last over no events
   (NO_MATCHING_TRANSACTIONS: there is nothing to compute with).
2. **Template** results are given as they are: the formula chose them explicitly, and amounts
   rules (rounding, caps) do not apply to them.
3. **Explicit skip** wins over everything below: the operator's own rule said "no reward".
4. **No matching transactions**: if the formula read at least one aggregate and every aggregate
   it read had no events, the result (or the error it ran into, like a division by zero of
   ``sum / count``) is an artefact of missing data, so the vendor's "no transactions matching"
   reason is the honest one. A formula that reads only customer properties never gets it.
5. **Zero or negative** raw amounts are not rewards (ZERO_OR_NEGATIVE); nor is an amount that
   rounding brings down to zero.
6. **Rounding** (the configured mode and decimals), then the **cap** (the excess is cut: cap 200
   on 1000 gives 200), then the **minimum**: below ``min_allowed`` is BELOW_MINIMUM. Rounding
   comes before the cap so the cap is exact money as configured; the minimum comes last because
   it judges the amount that would actually be issued. A skipped evaluation still carries the
   values computed so far (raw, rounded, capped) for the approval queue.

Comparisons with ``==`` / ``!=`` directly on a customer property treat a missing property as
equal to nothing (``customer.tier == "Gold"`` is false, ``!=`` true), mirroring event filters;
any other use of a missing property is MISSING_PROPERTY.

Arithmetic uses a 34-digit decimal context (ROUND_HALF_EVEN for inexact quotients such as
1/3); sums of money are exact well beyond any realistic amount.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import (
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DecimalException,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    localcontext,
)

from core.errors import InvalidArgument
from core.formula import ast
from core.formula.model import AggregateSpec, AggregateValue, FormulaInputs
from core.money import HUGE_DIGITS, far_from_amounts
from core.rounding import RoundingMode, apply_rounding, validate_rounding

EVAL_CONTEXT = Context(
    prec=34, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow]
)


class SkipReason(enum.Enum):
    """Why no reward was given (the vendor's "Skipped" trigger carries this)."""

    ZERO_OR_NEGATIVE = "ZERO_OR_NEGATIVE"
    NO_MATCHING_TRANSACTIONS = "NO_MATCHING_TRANSACTIONS"
    INVALID_PERIOD = "INVALID_PERIOD"
    BELOW_MINIMUM = "BELOW_MINIMUM"
    EXPLICIT_SKIP = "EXPLICIT_SKIP"
    DIVISION_BY_ZERO = "DIVISION_BY_ZERO"
    MISSING_PROPERTY = "MISSING_PROPERTY"
    MISSING_CURRENCY_VALUE = "MISSING_CURRENCY_VALUE"
    TYPE_ERROR = "TYPE_ERROR"
    AMOUNT_TOO_LARGE = "AMOUNT_TOO_LARGE"
    """Set by dynamic bonuses, not the evaluator: the finished amount has more integer digits
    than results and the ledger store (core.bonuses.results.MAX_STORED_AMOUNT)."""


class Outcome(enum.Enum):
    """What the evaluation decided."""

    AMOUNT = "AMOUNT"
    TEMPLATE = "TEMPLATE"
    SKIPPED = "SKIPPED"


def _options_error(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_RESULT_OPTIONS", metadata={"field": field})


@dataclass(frozen=True)
class ResultOptions:
    """How an amount is finished: rounding, then cap, then minimum (all optional).

    Validated on construction, so a bad configuration fails when it is saved, not in a batch.
    """

    rounding: RoundingMode = RoundingMode.NONE
    decimals: int = 2
    factor: Decimal | None = None
    cap_amount: Decimal | None = None
    min_allowed: Decimal | None = None

    def __post_init__(self) -> None:
        validate_rounding(self.rounding, self.decimals, self.factor)
        for name in ("cap_amount", "min_allowed"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Decimal) or not value.is_finite():
                raise _options_error(f"{name} must be a Decimal amount, got {value!r}", name)
            if value < 0 or (name == "cap_amount" and value == 0):
                raise _options_error(f"{name} must be greater than 0, got {value}", name)


DEFAULT_RESULT_OPTIONS = ResultOptions()


@dataclass(frozen=True)
class Evaluation:
    """The decision for one customer, with everything needed to explain it.

    ``amount`` is set only for AMOUNT, ``template`` only for TEMPLATE, ``skip_reason`` and
    ``skip_detail`` only for SKIPPED; the intermediate values are kept in every case where they
    were computed. ``branch`` names the arm taken by the formula's main ``if`` (the one that
    produces the result), ``decisions`` every arm taken, in order.
    """

    outcome: Outcome
    amount: Decimal | None = None
    template: str | None = None
    skip_reason: SkipReason | None = None
    skip_detail: str | None = None
    raw_value: Decimal | None = None
    value_after_rounding: Decimal | None = None
    value_after_cap: Decimal | None = None
    aggregates_used: Mapping[str, AggregateValue] = dataclass_field(default_factory=dict)
    branch: str | None = None
    decisions: tuple[str, ...] = ()
    aggregate_labels: Mapping[str, str] = dataclass_field(default_factory=dict)
    options: ResultOptions | None = None

    def explain(self) -> str:
        """A plain-English, multi-line account of how the result came about."""
        lines: list[str] = []
        if self.outcome is Outcome.AMOUNT:
            lines.append(f"Result: give {self.amount}.")
        elif self.outcome is Outcome.TEMPLATE:
            lines.append(f'Result: give the bonus template "{self.template}".')
        else:
            reason = self.skip_reason.value if self.skip_reason else "UNKNOWN"
            lines.append(f"Result: skipped ({reason}): {self.skip_detail}.")
        if self.branch is not None:
            lines.append(f"Branch taken: {self.branch}.")
        extra = [d for d in self.decisions if d != self.branch]
        if extra:
            lines.append("Other decisions: " + "; ".join(extra) + ".")
        if self.aggregates_used:
            lines.append("Aggregates read:")
            for key, value in self.aggregates_used.items():
                label = self.aggregate_labels.get(key, key)
                events = f"{value.count} event{'s' if value.count != 1 else ''}"
                shown = "no value" if value.value is None else _bounded(value.value)
                lines.append(f"  {label} = {shown} ({events})")
        elif self.outcome is not Outcome.TEMPLATE:
            lines.append("No aggregates were read.")
        if self.raw_value is not None:
            lines.append(f"Calculated value: {_bounded(self.raw_value)}.")
        options = self.options
        if self.value_after_rounding is not None and options is not None:
            if options.rounding is RoundingMode.NONE:
                lines.append("No rounding.")
            else:
                how = f"{options.rounding.value}, {options.decimals} decimals"
                if options.factor is not None and options.rounding is RoundingMode.MROUND:
                    how += f", factor {options.factor}"
                lines.append(f"After rounding ({how}): {self.value_after_rounding}.")
        if self.value_after_cap is not None and options is not None:
            if options.cap_amount is not None and self.value_after_cap != (
                self.value_after_rounding
            ):
                if self.value_after_rounding is None:
                    lines.append("Not rounded: far more than any amount.")
                lines.append(f"Capped at {options.cap_amount}: {self.value_after_cap}.")
            if options.min_allowed is not None:
                verdict = "below it" if self.skip_reason is SkipReason.BELOW_MINIMUM else "reached"
                lines.append(f"Minimum allowed {options.min_allowed}: {verdict}.")
        return "\n".join(lines)


def _bounded(value: Decimal) -> str:
    """A value in an explanation: as Decimal writes it, scientific when far from amounts
    (10^983045 written out was 1 MB per mention)."""
    return f"{value:.6E}" if far_from_amounts(value) else str(value)


# --- runtime values and signals ----------------------------------------------------------


@dataclass(frozen=True)
class TemplateResult:
    """The runtime value of ``template("...")``."""

    name: str


Value = Decimal | str | bool | TemplateResult
"""What an expression evaluates to."""


class _SkipSignal(Exception):
    """Stops an evaluation with a reason; never leaves this module."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Context:
    """Per-evaluation state: inputs, memoised assignments, aggregates read, decisions taken."""

    __slots__ = ("branch", "decisions", "inputs", "locals", "used")

    def __init__(self, inputs: FormulaInputs) -> None:
        self.inputs = inputs
        self.locals: dict[str, Value] = {}
        self.used: dict[str, AggregateValue] = {}
        self.decisions: list[str] = []
        self.branch: str | None = None


Fn = Callable[[_Context], Value]
NullableFn = Callable[[_Context], Value | None]


def _describe_value(value: Value | None) -> str:
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, Decimal):
        return f"the number {value}"
    if isinstance(value, TemplateResult):
        return f'the bonus template "{value.name}"'
    return f'the text "{value}"'


def _need_number(node: ast.Node, value: Value, what: str) -> Decimal:
    if isinstance(value, Decimal):
        return value
    raise _SkipSignal(
        SkipReason.TYPE_ERROR,
        f"{node.position()}: {what} needs a number, got {_describe_value(value)}",
    )


def _need_bool(node: ast.Node, value: Value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _SkipSignal(
        SkipReason.TYPE_ERROR,
        f"{node.position()}: {what} must be true or false, got {_describe_value(value)}",
    )


_SNAKE: dict[type, str] = {
    getattr(ast, name): "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    for name in (
        "Number", "Text", "Boolean", "Skip", "Template", "Variable", "CurrencyVariable",
        "LocalRef", "Property", "Aggregate", "Negate", "Not", "Arithmetic", "Comparison",
        "Logical", "Conditional", "Call",
    )
}  # fmt: skip


# --- building closures -------------------------------------------------------------------


class _Builder:
    """Turns tree nodes into closures; one per compiled formula."""

    def __init__(self, program: ast.Program, specs: Sequence[AggregateSpec]) -> None:
        self.labels = {spec.key: spec.describe() for spec in specs}
        self.assignments: dict[str, Fn] = {}
        self.primary = _primary_conditional(program)

    def build(self, node: ast.Node) -> Fn:
        name = _SNAKE.get(type(node))
        if name is None:
            raise InvalidArgument(
                f"cannot evaluate {type(node).__name__}", reason="FORMULA_INVALID"
            )
        method: Callable[[ast.Node], Fn] = getattr(self, f"_b_{name}")
        return method(node)

    def _b_number(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Number)
        value = node.value
        return lambda ctx: value

    def _b_text(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Text)
        value = node.value
        return lambda ctx: value

    def _b_boolean(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Boolean)
        value = node.value
        return lambda ctx: value

    def _b_skip(self, node: ast.Node) -> Fn:
        detail = f"the formula returned skip ({node.position()})"

        def skip(ctx: _Context) -> Value:
            raise _SkipSignal(SkipReason.EXPLICIT_SKIP, detail)

        return skip

    def _b_template(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Template)
        result = TemplateResult(node.name)
        return lambda ctx: result

    def _b_variable(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Variable)
        value = node.value
        return lambda ctx: value

    def _b_currency_variable(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.CurrencyVariable)
        values = {code.upper(): amount for code, amount in node.values}
        name = node.name
        known = ", ".join(sorted(values))

        def variable(ctx: _Context) -> Value:
            currency = ctx.inputs.currency
            if not currency:
                raise _SkipSignal(
                    SkipReason.MISSING_CURRENCY_VALUE,
                    f"the customer has no currency, needed for the variable '{name}'",
                )
            try:
                return values[currency.strip().upper()]
            except KeyError:
                raise _SkipSignal(
                    SkipReason.MISSING_CURRENCY_VALUE,
                    f"the variable '{name}' has no value for {currency} (it has {known})",
                ) from None

        return variable

    def _b_local_ref(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.LocalRef)
        name = node.name
        assignments = self.assignments

        def local(ctx: _Context) -> Value:
            try:
                return ctx.locals[name]
            except KeyError:
                value = assignments[name](ctx)
                ctx.locals[name] = value
                return value

        return local

    def _property(self, node: ast.Property) -> NullableFn:
        name = node.name
        position = node.position()

        def prop(ctx: _Context) -> Value | None:
            value = ctx.inputs.properties.get(name)
            if value is None or isinstance(value, bool | str):
                return value
            if isinstance(value, int):
                return Decimal(value)
            if isinstance(value, Decimal) and value.is_finite():
                return value
            raise _SkipSignal(
                SkipReason.TYPE_ERROR,
                f"{position}: the customer property '{name}' holds {value!r}, which is not "
                "text, a Decimal or true/false",
            )

        return prop

    def _b_property(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Property)
        nullable = self._property(node)
        name = node.name

        def prop(ctx: _Context) -> Value:
            value = nullable(ctx)
            if value is None:
                raise _SkipSignal(
                    SkipReason.MISSING_PROPERTY, f"the customer property '{name}' has no value"
                )
            return value

        return prop

    def _b_aggregate(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Aggregate)
        key = node.key
        label = self.labels.get(key, key)

        def aggregate(ctx: _Context) -> Value:
            try:
                result = ctx.inputs.aggregates[key]
            except KeyError:
                raise InvalidArgument(
                    f"the inputs have no value for aggregate {key} ({label}); compute every "
                    "aggregate of CompiledFormula.aggregates",
                    reason="FORMULA_INPUT_MISSING",
                    metadata={"aggregate": key},
                ) from None
            ctx.used[key] = result
            if result.value is None:
                raise _SkipSignal(
                    SkipReason.NO_MATCHING_TRANSACTIONS, f"{label} has no matching events"
                )
            return result.value

        return aggregate

    def _b_negate(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Negate)
        operand = self.build(node.operand)
        target = node.operand
        return lambda ctx: -_need_number(target, operand(ctx), "a negative sign")

    def _b_not(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Not)
        operand = self.build(node.operand)
        target = node.operand
        return lambda ctx: not _need_bool(target, operand(ctx), "'not'")

    def _b_arithmetic(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Arithmetic)
        first = self.build(node.first)
        first_node = node.first
        rest = [(op, self.build(operand), operand) for op, operand in node.rest]
        first_what = f"'{node.rest[0][0]}'" if node.rest else "a calculation"

        steps = [(_ARITHMETIC[op], fn, operand_node, f"'{op}'", op == "/")
                 for op, fn, operand_node in rest]

        def arithmetic(ctx: _Context) -> Value:
            total = first(ctx)
            if not isinstance(total, Decimal):
                total = _need_number(first_node, total, first_what)
            for apply, fn, operand_node, what, divides in steps:
                value = fn(ctx)
                if not isinstance(value, Decimal):
                    value = _need_number(operand_node, value, what)
                if divides and value == 0:
                    raise _SkipSignal(
                        SkipReason.DIVISION_BY_ZERO,
                        f"{operand_node.position()}: division by zero",
                    )
                total = apply(total, value)
            return total

        return arithmetic

    def _comparison_side(self, node: ast.Node, nullable: bool) -> NullableFn:
        if nullable and isinstance(node, ast.Property):
            return self._property(node)
        return self.build(node)

    def _b_comparison(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Comparison)
        op = node.op
        equality = op in ("==", "!=")
        left = self._comparison_side(node.left, equality)
        right = self._comparison_side(node.right, equality)
        position = node.position()

        what = f"'{op}'"
        order = _ORDER.get(op)

        def compare(ctx: _Context) -> Value:
            a, b = left(ctx), right(ctx)
            if order is not None:
                if type(a) is Decimal and type(b) is Decimal:  # the common case, fast
                    return order(a, b)
                x = _need_number(node.left, _present(node.left, a), what)
                y = _need_number(node.right, _present(node.right, b), what)
                return order(x, y)
            if a is None or b is None:
                return (op == "!=") != (a is None and b is None)
            if isinstance(a, TemplateResult) or isinstance(b, TemplateResult) or (
                _kind(a) != _kind(b)
            ):
                raise _SkipSignal(
                    SkipReason.TYPE_ERROR,
                    f"{position}: '{op}' compares {_describe_value(a)} with "
                    f"{_describe_value(b)}",
                )
            return (a == b) == (op == "==")

        return compare

    def _b_logical(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Logical)
        operands = [(self.build(o), o) for o in node.operands]
        stop_at = node.op == "or"  # 'or' stops at the first true, 'and' at the first false
        what = f"a side of '{node.op}'"

        def logical(ctx: _Context) -> Value:
            for fn, operand_node in operands:
                if _need_bool(operand_node, fn(ctx), what) is stop_at:
                    return stop_at
            return not stop_at

        return logical

    def _b_conditional(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Conditional)
        arms: list[tuple[Fn, Fn, ast.Node, str]] = []
        for index, branch in enumerate(node.branches, start=1):
            label = f"{'if' if index == 1 else 'elif'} #{index} ({branch.text})"
            arms.append((self.build(branch.condition), self.build(branch.value),
                         branch.condition, label))  # fmt: skip
        otherwise = self.build(node.otherwise) if node.otherwise is not None else None
        is_primary = node is self.primary
        no_match = f"no condition matched and there is no else ({node.position()})"

        def conditional(ctx: _Context) -> Value:
            for condition, value, condition_node, label in arms:
                if _need_bool(condition_node, condition(ctx), "an 'if' condition"):
                    _decide(ctx, label, is_primary)
                    return value(ctx)
            if otherwise is None:
                _decide(ctx, "no branch matched (skip)", is_primary)
                raise _SkipSignal(SkipReason.EXPLICIT_SKIP, no_match)
            _decide(ctx, "else", is_primary)
            return otherwise(ctx)

        return conditional

    def _b_call(self, node: ast.Node) -> Fn:
        assert isinstance(node, ast.Call)
        args = [(self.build(a), a) for a in node.args]
        name = node.function
        what = f"{name}(...)"

        def numbers(ctx: _Context) -> list[Decimal]:
            return [_need_number(a, fn(ctx), what) for fn, a in args]

        if name in ("min", "cap"):
            return lambda ctx: min(numbers(ctx))
        if name == "max":
            return lambda ctx: max(numbers(ctx))
        if name == "abs":
            return lambda ctx: abs(numbers(ctx)[0])
        if name == "floor":
            return lambda ctx: numbers(ctx)[0].to_integral_value(rounding=ROUND_FLOOR)
        if name == "round":
            position = node.position()

            def round_(ctx: _Context) -> Value:
                values = numbers(ctx)
                decimals = values[1] if len(values) > 1 else Decimal(0)
                if decimals != decimals.to_integral_value() or not 0 <= decimals <= 8:
                    raise _SkipSignal(
                        SkipReason.TYPE_ERROR,
                        f"{position}: round needs 0 to 8 decimals, got {decimals}",
                    )
                return apply_rounding(values[0], RoundingMode.ROUND, int(decimals))

            return round_
        raise InvalidArgument(  # pragma: no cover - validated by the compiler and the loader
            f"unknown function {name!r}", reason="FORMULA_INVALID"
        )


_ARITHMETIC: dict[str, Callable[[Decimal, Decimal], Decimal]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_ORDER: dict[str, Callable[[Decimal, Decimal], bool]] = {
    "<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}


def _kind(value: Value) -> type:
    return bool if isinstance(value, bool) else type(value)


def _present(node: ast.Node, value: Value | None) -> Value:
    if value is None:  # pragma: no cover - only equality sides are nullable
        raise _SkipSignal(SkipReason.MISSING_PROPERTY, f"{node.position()}: no value")
    return value


def _decide(ctx: _Context, label: str, is_primary: bool) -> None:
    ctx.decisions.append(label)
    if is_primary:
        ctx.branch = label


def _primary_conditional(program: ast.Program) -> ast.Conditional | None:
    """The ``if`` whose arm decides the result: found from the result through local names and
    calculations (not through conditions), so ``bonus = if ...`` then ``cap(bonus, 100)`` reports
    the arm of ``bonus``."""
    assignments = {a.name: a.value for a in program.assignments}
    stack: list[ast.Node] = [program.result]
    seen: set[str] = set()
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.Conditional):
            return node
        if isinstance(node, ast.LocalRef):
            if node.name in assignments and node.name not in seen:
                seen.add(node.name)
                stack.append(assignments[node.name])
        elif isinstance(node, ast.Arithmetic | ast.Call | ast.Negate):
            stack.extend(ast.children(node))
    return None


@dataclass(frozen=True)
class Runner:
    """A program turned into closures, with what the evaluation needs to report."""

    fn: Fn
    labels: Mapping[str, str]


def build_runner(program: ast.Program, specs: Sequence[AggregateSpec]) -> Runner:
    """Compile the tree into closures once; evaluation then only runs them."""
    builder = _Builder(program, specs)
    for assignment in program.assignments:
        builder.assignments[assignment.name] = builder.build(assignment.value)
    return Runner(builder.build(program.result), builder.labels)


def _done(
    runner: Runner,
    ctx: _Context,
    options: ResultOptions,
    outcome: Outcome,
    *,
    amount: Decimal | None = None,
    template: str | None = None,
    skip_reason: SkipReason | None = None,
    skip_detail: str | None = None,
    raw_value: Decimal | None = None,
    value_after_rounding: Decimal | None = None,
    value_after_cap: Decimal | None = None,
) -> Evaluation:
    used = ctx.used  # the context ends here: its dict becomes the evaluation's
    labels = runner.labels
    return Evaluation(
        outcome=outcome,
        amount=amount,
        template=template,
        skip_reason=skip_reason,
        skip_detail=skip_detail,
        raw_value=raw_value,
        value_after_rounding=value_after_rounding,
        value_after_cap=value_after_cap,
        aggregates_used=used,
        branch=ctx.branch,
        decisions=tuple(ctx.decisions),
        aggregate_labels={k: labels.get(k, k) for k in used},
        options=options,
    )


def _skipped(
    runner: Runner,
    ctx: _Context,
    options: ResultOptions,
    reason: SkipReason,
    detail: str,
    *,
    raw_value: Decimal | None = None,
    value_after_rounding: Decimal | None = None,
    value_after_cap: Decimal | None = None,
) -> Evaluation:
    return _done(runner, ctx, options, Outcome.SKIPPED, skip_reason=reason, skip_detail=detail,
                 raw_value=raw_value, value_after_rounding=value_after_rounding,
                 value_after_cap=value_after_cap)


def _no_data(ctx: _Context) -> bool:
    return bool(ctx.used) and all(v.count == 0 for v in ctx.used.values())


def _no_data_detail(runner: Runner, ctx: _Context) -> str:
    names = ", ".join(runner.labels.get(k, k) for k in ctx.used)
    return f"no events matched {names}"


def evaluate_program(
    runner: Runner, inputs: FormulaInputs, options: ResultOptions = DEFAULT_RESULT_OPTIONS
) -> Evaluation:
    """Evaluate for one customer and apply the result pipeline described in the module doc."""
    ctx = _Context(inputs)
    try:
        with localcontext(EVAL_CONTEXT):
            value = runner.fn(ctx)
    except _SkipSignal as signal:
        if signal.reason is not SkipReason.EXPLICIT_SKIP and _no_data(ctx):
            return _skipped(runner, ctx, options, SkipReason.NO_MATCHING_TRANSACTIONS,
                            _no_data_detail(runner, ctx))
        return _skipped(runner, ctx, options, signal.reason, signal.detail)
    except DecimalException as exc:
        return _skipped(runner, ctx, options, SkipReason.TYPE_ERROR,
                        f"the calculation overflowed ({exc!r})")
    if isinstance(value, TemplateResult):
        return _done(runner, ctx, options, Outcome.TEMPLATE, template=value.name)
    if _no_data(ctx):
        return _skipped(runner, ctx, options, SkipReason.NO_MATCHING_TRANSACTIONS,
                        _no_data_detail(runner, ctx))
    if not isinstance(value, Decimal):
        return _skipped(runner, ctx, options, SkipReason.TYPE_ERROR,
                        f"the formula gave {_describe_value(value)}, not an amount or a template")
    raw = value
    if raw <= 0:
        return _skipped(runner, ctx, options, SkipReason.ZERO_OR_NEGATIVE,
                        f"the calculated value {_bounded(raw)} is not positive",
                        raw_value=raw)
    if raw.adjusted() < -HUGE_DIGITS and options.rounding is not RoundingMode.ROUND_UP:
        # Positive, but nothing of it survives the rounding an amount has (it would only be
        # written out: 1 / 10^983045 has 983,045 digits). ROUND_UP makes it the smallest
        # amount (0.01 with 2 decimals), at once, so it goes on.
        return _skipped(runner, ctx, options, SkipReason.ZERO_OR_NEGATIVE,
                        f"the calculated value {_bounded(raw)} is 0 at any precision an "
                        "amount has", raw_value=raw)
    if raw.adjusted() >= HUGE_DIGITS:
        # No amount is this large (results hold 14 integer digits); rounding it would only
        # write out its digits (or overflow). A cap still applies: it is what would be given.
        if options.cap_amount is None:
            return _skipped(runner, ctx, options, SkipReason.AMOUNT_TOO_LARGE,
                            f"the calculated value {_bounded(raw)} is far more than any "
                            "amount", raw_value=raw)
        capped = options.cap_amount
        if options.min_allowed is not None and capped < options.min_allowed:
            return _skipped(runner, ctx, options, SkipReason.BELOW_MINIMUM,
                            f"{capped} is below the minimum allowed amount "
                            f"{options.min_allowed}", raw_value=raw, value_after_cap=capped)
        return _done(runner, ctx, options, Outcome.AMOUNT, amount=capped, raw_value=raw,
                     value_after_cap=capped)
    rounded = apply_rounding(raw, options.rounding, options.decimals, options.factor)
    if rounded <= 0:
        return _skipped(runner, ctx, options, SkipReason.ZERO_OR_NEGATIVE,
                        f"the calculated value {_bounded(raw)} rounds to {rounded}",
                        raw_value=raw,
                        value_after_rounding=rounded)
    capped = rounded
    if options.cap_amount is not None and capped > options.cap_amount:
        capped = options.cap_amount
    if options.min_allowed is not None and capped < options.min_allowed:
        return _skipped(runner, ctx, options, SkipReason.BELOW_MINIMUM,
                        f"{capped} is below the minimum allowed amount {options.min_allowed}",
                        raw_value=raw, value_after_rounding=rounded, value_after_cap=capped)
    return _done(runner, ctx, options, Outcome.AMOUNT, amount=capped, raw_value=raw,
                 value_after_rounding=rounded, value_after_cap=capped)
