"""From formula text to a checked, evaluable :class:`CompiledFormula`.

Compilation parses (see :mod:`core.formula.parser`), then walks the tree once to resolve names
and check everything that can be known before any customer data exists:

* names: a local name must be assigned on an earlier line, may not be assigned twice, and may
  not shadow a promotion variable or a function; an unknown name gets a "did you mean" hint;
* aggregates: ``sum(kind.field)`` and friends take one event field (``count`` an event kind),
  filters compare with literals of the right type; identical aggregates share one key;
* types: numbers, text, true/false, templates and ``skip`` are tracked statically; ``"a" * 2``,
  ``template(...) + 1``, ``if 5 then ...`` or comparing a number with text are errors here,
  not surprises at payout time. Customer properties have no static type (their values come with
  the customer), so misuse of a property is caught at evaluation as a TYPE_ERROR skip;
* limits: 10,000 characters, 64 distinct aggregates, 50 levels of nesting.

Every problem is an InvalidArgument(reason="FORMULA_INVALID") with ``line`` / ``column``
metadata, like the syntax errors (reason "FORMULA_SYNTAX").
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from lark import Token, Tree

from core.errors import InvalidArgument
from core.formula import ast
from core.formula.evaluator import (
    DEFAULT_RESULT_OPTIONS,
    Evaluation,
    ResultOptions,
    build_runner,
    evaluate_program,
)
from core.formula.model import (
    AGGREGATE_FUNCTIONS,
    FORMULA_LANGUAGE_VERSION,
    ORDERING_OPS,
    AggregateSpec,
    Filter,
    FilterValue,
    FormulaInputs,
    is_identifier,
)
from core.formula.parser import Position, formula_error, parse_formula

MAX_AGGREGATES = 64
MAX_NUMBER_LENGTH = 30
# Deepest evaluation a formula may need, counting through its local names (ast.evaluation_depths):
# every level is a Python call, and the interpreter's stack holds about 1,000.
MAX_EVALUATION_DEPTH = 300
_EXACT = Context(prec=64)
MAX_TEMPLATE_NAME_LENGTH = 200

VariableValue = Decimal | str | Mapping[str, Decimal]
"""A promotion variable: a number, a text (e.g. a template name) or a per-currency amount."""

KEYWORDS = frozenset(
    {"if", "then", "elif", "else", "and", "or", "not", "in", "where", "true", "false", "skip",
     "customer"}
)  # fmt: skip
FUNCTIONS = frozenset(AGGREGATE_FUNCTIONS) | frozenset(ast.SCALAR_FUNCTIONS) | {"template"}

# Static types. A node's type is the set of kinds of value it may produce.
NUM = "number"
TEXT = "text"
BOOL = "true/false"
TEMPLATE = "template"
SKIP = "skip"
Type = frozenset[str]
_PROPERTY_TYPE: Type = frozenset({NUM, TEXT, BOOL})


def _describe_type(ty: Type) -> str:
    names = {NUM: "a number", TEXT: "text", BOOL: "true/false", TEMPLATE: "a bonus template",
             SKIP: "skip"}  # fmt: skip
    return " or ".join(names[t] for t in (NUM, TEXT, BOOL, TEMPLATE, SKIP) if t in ty)


# --- variables -----------------------------------------------------------------------------

ResolvedVariable = Decimal | str | tuple[tuple[str, Decimal], ...]


def _variable_error(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        f"variable {name!r}: {message}", reason="FORMULA_INVALID", metadata={"variable": name}
    )


def _as_decimal(name: str, value: object) -> Decimal:
    if isinstance(value, bool | float):
        raise _variable_error(name, f"must be a Decimal amount, got {type(value).__name__}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal) and value.is_finite():
        return value
    raise _variable_error(name, f"must be a finite Decimal, got {value!r}")


def normalize_variables(
    variables: Mapping[str, VariableValue] | None,
) -> dict[str, ResolvedVariable]:
    """Validate promotion variables: names are identifiers, values numbers, text or per-currency.

    Per-currency maps are keyed by currency code; codes are compared in upper case.
    """
    if variables is None:
        return {}
    if not isinstance(variables, Mapping):
        raise InvalidArgument(
            "variables must be a mapping of name to value",
            reason="FORMULA_INVALID",
            metadata={"field": "variables"},
        )
    out: dict[str, ResolvedVariable] = {}
    for name, value in variables.items():
        if not is_identifier(name) or name in KEYWORDS or name in FUNCTIONS:
            raise _variable_error(
                str(name), "a variable name must be letters, digits and '_', and not a keyword"
            )
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, Mapping):
            if not value:
                raise _variable_error(name, "needs a value for at least one currency")
            per_currency: dict[str, Decimal] = {}
            for currency, amount in value.items():
                if not isinstance(currency, str) or not currency.strip():
                    raise _variable_error(name, f"currency codes must be text, got {currency!r}")
                code = currency.strip().upper()
                if code in per_currency:
                    raise _variable_error(name, f"currency {code} is given twice")
                per_currency[code] = _as_decimal(f"{name}[{currency}]", amount)
            out[name] = tuple(sorted(per_currency.items()))
        else:
            out[name] = _as_decimal(name, value)
    return out


def _encode_variable(value: ResolvedVariable) -> VariableValue:
    if isinstance(value, tuple):
        return dict(value)
    return value


# --- compiled formula --------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledFormula:
    """A checked formula, ready to evaluate for any number of customers.

    ``aggregates`` lists what the caller must compute per customer (keyed "a0", "a1"...),
    ``properties_used`` the customer properties to load, ``variables_used`` the promotion
    variables it read, ``templates_used`` the bonus templates it may give.
    """

    source: str
    version: int
    program: ast.Program
    aggregates: tuple[AggregateSpec, ...]
    properties_used: tuple[str, ...]
    variables_used: tuple[str, ...]
    templates_used: tuple[str, ...]
    variables: Mapping[str, VariableValue] = dataclass_field(default_factory=dict)
    _runner: Any = dataclass_field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_runner", build_runner(self.program, self.aggregates))

    @property
    def returns_amount(self) -> bool:
        """Whether some path of the formula gives an amount (rather than a template or skip)."""
        leaves = ast.result_leaves(self.program)
        return any(not isinstance(leaf, ast.Template | ast.Skip) for leaf in leaves)

    @property
    def returns_template(self) -> bool:
        """Whether some path of the formula gives a bonus template."""
        return any(isinstance(leaf, ast.Template) for leaf in ast.result_leaves(self.program))

    def evaluate(
        self, inputs: FormulaInputs, options: ResultOptions = DEFAULT_RESULT_OPTIONS
    ) -> Evaluation:
        """Evaluate for one customer; see :mod:`core.formula.evaluator` for the pipeline."""
        return evaluate_program(self._runner, inputs, options)

    def to_stored(self) -> dict[str, Any]:
        """A JSON-able, versioned form: source, variables used, and the compiled tree."""
        from core.formula.stored import formula_to_dict

        return formula_to_dict(self)

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> CompiledFormula:
        """Rebuild from :meth:`to_stored` output.

        Same language version: the stored tree is validated and used as is, no parsing. Another
        version: the source is compiled again with the stored variables, so an old formula keeps
        working after the language changes (or fails with a clear FORMULA_INVALID).
        """
        from core.formula.stored import formula_from_dict

        return formula_from_dict(d)


def compile_formula(
    source: str, *, variables: Mapping[str, VariableValue] | None = None
) -> CompiledFormula:
    """Parse and check a formula; raise InvalidArgument (FORMULA_SYNTAX / FORMULA_INVALID)."""
    resolved = normalize_variables(variables)
    tree = parse_formula(source)
    compiler = _Compiler(source, resolved)
    program = compiler.program(tree)
    used = {name: _encode_variable(resolved[name]) for name in compiler.variables_used}
    return CompiledFormula(
        source=source,
        version=FORMULA_LANGUAGE_VERSION,
        program=program,
        aggregates=tuple(compiler.specs),
        properties_used=tuple(compiler.properties),
        variables_used=tuple(compiler.variables_used),
        templates_used=tuple(compiler.templates),
        variables=used,
    )


# --- the checking walk -------------------------------------------------------------------


def _pos(item: Tree[Token] | Token) -> Position:
    if isinstance(item, Token):
        return Position(item.line or 1, item.column or 1)
    meta = item.meta
    return Position(getattr(meta, "line", 1) or 1, getattr(meta, "column", 1) or 1)


def _decode_string(token: Token) -> str:
    """Decode a "..." literal: \\" and \\\\ are the only escapes (anything else is a mistake)."""
    body = str(token)[1:-1]
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            nxt = body[index + 1] if index + 1 < len(body) else ""
            if nxt not in ('"', "\\"):
                position = Position(token.line or 1, (token.column or 1) + 1 + index)
                raise formula_error(
                    "FORMULA_INVALID",
                    position,
                    f"unknown escape '\\{nxt}' in text: only \\\" and \\\\ are allowed",
                )
            out.append(nxt)
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


class _Compiler:
    """One compilation: resolves names, collects aggregates, infers static types."""

    def __init__(self, source: str, variables: dict[str, ResolvedVariable]) -> None:
        self.source = source
        self.variables = variables
        self.locals: dict[str, Type] = {}
        self.assigned: dict[str, Position] = {}
        self.current: str | None = None
        self.specs: list[AggregateSpec] = []
        self.keys: dict[tuple[object, ...], str] = {}
        self.properties: list[str] = []
        self.variables_used: list[str] = []
        self.templates: list[str] = []

    def error(self, where: Tree[Token] | Token | Position, message: str) -> InvalidArgument:
        position = where if isinstance(where, Position) else _pos(where)
        return formula_error("FORMULA_INVALID", position, message)

    # program and statements

    def program(self, tree: Tree[Token]) -> ast.Program:
        items = [c for c in tree.children if isinstance(c, Tree)]
        statements, result = items[:-1], items[-1]
        for statement in statements:
            name_token = statement.children[0]
            assert isinstance(name_token, Token)
            self.assigned.setdefault(str(name_token), _pos(name_token))
        assignments: list[ast.Assignment] = []
        seen: dict[str, Position] = {}
        for statement in statements:
            name_token, _, value_tree = statement.children
            assert isinstance(name_token, Token) and isinstance(value_tree, Tree)
            name = str(name_token)
            position = _pos(name_token)
            if name in seen:
                raise self.error(
                    name_token,
                    f"'{name}' is already assigned on line {seen[name].line}; "
                    "use a different name for each step",
                )
            if name in self.variables:
                raise self.error(
                    name_token,
                    f"'{name}' is a promotion variable; a local name cannot replace it, "
                    "choose another name",
                )
            if name in FUNCTIONS:
                raise self.error(
                    name_token, f"'{name}' is the name of a function; choose another name"
                )
            self.current = name
            node, ty = self.expr(value_tree)
            self.current = None
            seen[name] = position
            self.locals[name] = ty
            assignments.append(ast.Assignment(name, node, position.line, position.column))
        node, ty = self.expr(result)
        if not ty & {NUM, TEMPLATE, SKIP}:
            raise self.error(
                result,
                f"the result must be an amount, a bonus template or skip, but this gives "
                f"{_describe_type(ty)}",
            )
        program = ast.Program(tuple(assignments), node)
        for assignment, depth in ast.evaluation_depths(program):
            if depth > MAX_EVALUATION_DEPTH:
                where = (Position(assignment.line, assignment.column) if assignment
                         else _pos(result))
                what = f"'{assignment.name}'" if assignment else "the result"
                raise self.error(
                    where,
                    f"{what} is computed through {depth} nested steps, counting the steps of "
                    f"the names it uses (at most {MAX_EVALUATION_DEPTH}); compute it from fewer "
                    "chained names",
                )
        return program

    # expressions

    def expr(self, tree: Tree[Token] | Token) -> tuple[ast.Node, Type]:
        if isinstance(tree, Token):  # pragma: no cover - every atom has an alias
            raise self.error(tree, f"unexpected {tree.value!r}")
        handler = getattr(self, f"_x_{tree.data}", None)
        if handler is None:  # pragma: no cover - grammar and compiler out of sync
            raise self.error(tree, f"unsupported construct {tree.data}")
        result: tuple[ast.Node, Type] = handler(tree)
        return result

    def _at(self, tree: Tree[Token] | Token) -> dict[str, int]:
        position = _pos(tree)
        return {"line": position.line, "column": position.column}

    def _x_number(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        token = tree.children[0]
        assert isinstance(token, Token)
        return ast.Number(self._number(token, str(token)), **self._at(tree)), frozenset({NUM})

    def _number(self, token: Token, text: str) -> Decimal:
        if len(text) > MAX_NUMBER_LENGTH:
            raise self.error(token, f"the number {text[:12]}... is too long (over "
                             f"{MAX_NUMBER_LENGTH} characters)")  # fmt: skip
        try:
            return Decimal(text)
        except InvalidOperation as exc:  # pragma: no cover - the lexer only lets digits through
            raise self.error(token, f"{text!r} is not a number") from exc

    def _x_percent(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        token = tree.children[0]
        assert isinstance(token, Token)
        # Exact: a literal has up to 30 digits, more than the default 28-digit context keeps.
        value = self._number(token, str(token)[:-1]).scaleb(-2, context=_EXACT)
        return ast.Number(value, **self._at(tree)), frozenset({NUM})

    def _x_string(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        token = tree.children[0]
        assert isinstance(token, Token)
        return ast.Text(_decode_string(token), **self._at(tree)), frozenset({TEXT})

    def _x_true(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        return ast.Boolean(True, **self._at(tree)), frozenset({BOOL})

    def _x_false(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        return ast.Boolean(False, **self._at(tree)), frozenset({BOOL})

    def _x_skip(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        return ast.Skip(**self._at(tree)), frozenset({SKIP})

    def _x_name(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        token = tree.children[0]
        assert isinstance(token, Token)
        name = str(token)
        if name in self.locals:
            return ast.LocalRef(name, **self._at(tree)), self.locals[name]
        if name == self.current:
            raise self.error(token, f"'{name}' is used in its own definition")
        if name in self.assigned:
            raise self.error(
                token,
                f"'{name}' is used before it is assigned (on line {self.assigned[name].line}); "
                "move the assignment above this line",
            )
        if name in self.variables:
            if name not in self.variables_used:
                self.variables_used.append(name)
            value = self.variables[name]
            if isinstance(value, tuple):
                return ast.CurrencyVariable(name, value, **self._at(tree)), frozenset({NUM})
            ty = frozenset({TEXT}) if isinstance(value, str) else frozenset({NUM})
            return ast.Variable(name, value, **self._at(tree)), ty
        if name in FUNCTIONS:
            example = "count(deposit)" if name == "count" else f"{name}(deposit.amount)"
            if name not in AGGREGATE_FUNCTIONS:
                example = f"{name}(...)"
            raise self.error(token, f"'{name}' is a function; call it like {example}")
        candidates = list(self.locals) + list(self.variables)
        close = difflib.get_close_matches(name, candidates, n=1)
        if close:
            hint = f"; did you mean '{close[0]}'?"
        else:
            hint = (
                " (names come from assignments above or from the promotion's variables; "
                "for events use an aggregate like sum(deposit.amount) or count(deposit))"
            )
        raise self.error(token, f"unknown name '{name}'{hint}")

    def _x_dotted(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        kind, field_name = (str(c) for c in tree.children)
        raise self.error(
            tree,
            f"{kind}.{field_name} is an event field; use it inside an aggregate such as "
            f"sum({kind}.{field_name}), last({kind}.{field_name}) or count({kind}). "
            "Customer properties are written customer.name",
        )

    def _x_prop(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        token = tree.children[1]
        assert isinstance(token, Token)
        name = _decode_string(token) if token.type == "STRING" else str(token)
        if not name.strip():
            raise self.error(token, "a customer property needs a name, like customer.tier")
        if name not in self.properties:
            self.properties.append(name)
        return ast.Property(name, **self._at(tree)), _PROPERTY_TYPE

    # operators

    def _need_number(self, where: Tree[Token] | Token, ty: Type, what: str) -> None:
        if TEMPLATE in ty:
            raise self.error(
                where, "a bonus template can only be the result of the formula, not part of "
                f"{what}",
            )  # fmt: skip
        if NUM not in ty:
            if ty == frozenset({SKIP}):
                raise self.error(where, f"'skip' cannot be part of {what}")
            raise self.error(where, f"{what} needs a number, but this is {_describe_type(ty)}")

    def _need_bool(self, where: Tree[Token] | Token, ty: Type, what: str) -> None:
        if TEMPLATE in ty:
            raise self.error(where, f"a bonus template cannot be used as {what}")
        if BOOL not in ty:
            if ty == frozenset({SKIP}):
                raise self.error(where, f"'skip' cannot be used as {what}")
            raise self.error(
                where,
                f"{what} must be true or false (a comparison such as x > 5), but this is "
                f"{_describe_type(ty)}",
            )

    def _operand(self, child: Tree[Token] | Token, what: str) -> tuple[ast.Node, Type]:
        node, ty = self.expr(child)
        self._need_number(child, ty, what)
        return node, ty

    def _x_neg(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        operand_tree = tree.children[1]
        assert isinstance(operand_tree, Tree)
        node, ty = self._operand(operand_tree, "a negative sign")
        if isinstance(node, ast.Number):
            return ast.Number(node.value.copy_negate(), **self._at(tree)), ty
        return ast.Negate(node, **self._at(tree)), ty

    def _arithmetic(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        parts = tree.children
        first_tree = parts[0]
        assert isinstance(first_tree, Tree)
        first_op = parts[1] if len(parts) > 1 else "a calculation"
        first, ty = self._operand(first_tree, f"'{first_op}'")
        rest: list[tuple[str, ast.Node]] = []
        result_ty = {NUM} | (ty & {SKIP})
        for index in range(1, len(parts), 2):
            op_token, operand_tree = parts[index], parts[index + 1]
            assert isinstance(op_token, Token) and isinstance(operand_tree, Tree)
            node, operand_ty = self._operand(operand_tree, f"'{op_token}'")
            result_ty |= operand_ty & {SKIP}
            rest.append((str(op_token), node))
        return ast.Arithmetic(first, tuple(rest), **self._at(tree)), frozenset(result_ty)

    _x_sum = _arithmetic
    _x_product = _arithmetic

    def _x_comparison(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        left_tree, op_token, right_tree = tree.children
        assert isinstance(op_token, Token)
        assert isinstance(left_tree, Tree) and isinstance(right_tree, Tree)
        op = str(op_token)
        left, left_ty = self.expr(left_tree)
        right, right_ty = self.expr(right_tree)
        if op in ORDERING_OPS:
            self._need_number(left_tree, left_ty, f"'{op}'")
            self._need_number(right_tree, right_ty, f"'{op}'")
        else:
            for side_tree, side_ty in ((left_tree, left_ty), (right_tree, right_ty)):
                if TEMPLATE in side_ty:
                    raise self.error(side_tree, "a bonus template cannot be compared")
                if side_ty == frozenset({SKIP}):
                    raise self.error(side_tree, "'skip' cannot be compared")
            left_known, right_known = left_ty - {SKIP}, right_ty - {SKIP}
            if len(left_known) == 1 and len(right_known) == 1 and left_known != right_known:
                raise self.error(
                    op_token,
                    f"'{op}' compares {_describe_type(left_known)} with "
                    f"{_describe_type(right_known)}; they are never equal",
                )
        skip = (left_ty | right_ty) & {SKIP}
        return ast.Comparison(op, left, right, **self._at(tree)), frozenset({BOOL} | skip)

    def _logical(self, tree: Tree[Token], op: str) -> tuple[ast.Node, Type]:
        operands: list[ast.Node] = []
        skip: set[str] = set()
        for child in tree.children:
            assert isinstance(child, Tree)
            node, ty = self.expr(child)
            self._need_bool(child, ty, f"a side of '{op}'")
            skip |= ty & {SKIP}
            operands.append(node)
        return ast.Logical(op, tuple(operands), **self._at(tree)), frozenset({BOOL} | skip)

    def _x_and_expr(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        return self._logical(tree, "and")

    def _x_or_expr(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        return self._logical(tree, "or")

    def _x_not_op(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        operand_tree = tree.children[1]
        assert isinstance(operand_tree, Tree)
        node, ty = self.expr(operand_tree)
        self._need_bool(operand_tree, ty, "the operand of 'not'")
        return ast.Not(node, **self._at(tree)), frozenset({BOOL} | (ty & {SKIP}))

    def _condition_text(self, tree: Tree[Token]) -> str:
        meta = tree.meta
        start = getattr(meta, "start_pos", None)
        end = getattr(meta, "end_pos", None)
        if start is None or end is None:  # pragma: no cover - positions are always propagated
            return "?"
        return " ".join(self.source[start:end].split())

    def _branch(self, cond_tree: Tree[Token], value_tree: Tree[Token]) -> tuple[ast.Branch, Type]:
        condition, cond_ty = self.expr(cond_tree)
        self._need_bool(cond_tree, cond_ty, "an 'if' condition")
        value, value_ty = self.expr(value_tree)
        text = self._condition_text(cond_tree)
        return ast.Branch(condition, value, text), value_ty | (cond_ty & {SKIP})

    def _x_if_expr(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        parts = [c for c in tree.children if isinstance(c, Tree)]
        cond_tree, value_tree = parts[0], parts[1]
        first, ty = self._branch(cond_tree, value_tree)
        branches = [first]
        result_ty = set(ty)
        otherwise: ast.Node | None = None
        for part in parts[2:]:
            if part.data == "elif_branch":
                elif_cond, elif_value = (c for c in part.children if isinstance(c, Tree))
                branch, ty = self._branch(elif_cond, elif_value)
                branches.append(branch)
                result_ty |= ty
            else:  # else_branch
                else_tree = next(c for c in part.children if isinstance(c, Tree))
                otherwise, ty = self.expr(else_tree)
                result_ty |= ty
        if otherwise is None:
            result_ty.add(SKIP)
        node = ast.Conditional(tuple(branches), otherwise, **self._at(tree))
        return node, frozenset(result_ty)

    # calls

    def _x_call(self, tree: Tree[Token]) -> tuple[ast.Node, Type]:
        name_token, arglist, where = tree.children
        assert isinstance(name_token, Token)
        name = str(name_token)
        args: list[Tree[Token]] = []
        if isinstance(arglist, Tree):
            args = [c for c in arglist.children if isinstance(c, Tree)]
        where_tree = where if isinstance(where, Tree) else None
        is_aggregate = name in ("sum", "avg", "first", "last", "count") or (
            name in ("min", "max") and len(args) == 1 and args[0].data == "dotted"
        )
        if is_aggregate:
            return self._aggregate(tree, name, args, where_tree)
        if where_tree is not None and name in FUNCTIONS:
            raise self.error(
                where_tree,
                "'where' filters events, so it only works inside an aggregate such as "
                f'sum(bet.amount where game = "Gold Quest"), not in {name}(...)',
            )
        if name == "template":
            return self._template(tree, args)
        if name in ast.SCALAR_FUNCTIONS:
            return self._scalar(tree, name, args)
        close = difflib.get_close_matches(name, sorted(FUNCTIONS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (
            f" (functions: {', '.join(sorted(FUNCTIONS))})"
        )  # fmt: skip
        raise self.error(name_token, f"unknown function '{name}'{hint}")

    def _aggregate(
        self,
        tree: Tree[Token],
        func: str,
        args: list[Tree[Token]],
        where: Tree[Token] | None,
    ) -> tuple[ast.Node, Type]:
        if func == "count":
            if len(args) != 1 or args[0].data != "name":
                raise self.error(
                    args[0] if args else tree,
                    "count takes an event kind, like count(deposit) or "
                    'count(bet where game = "Gold Quest")',
                )
            kind_token = args[0].children[0]
            assert isinstance(kind_token, Token)
            kind, field_name = str(kind_token), None
        else:
            if len(args) != 1 or args[0].data != "dotted":
                example = f"{func}(deposit.amount)"
                if len(args) > 1:
                    message = f"{func} takes one event field, like {example}"
                    if func in ("min", "max"):  # pragma: no cover - handled as scalar
                        message += f", or two or more numbers: {func}(a, b)"
                    raise self.error(args[1], message)
                extra = f", or two or more numbers: {func}(a, b)" if func in ("min", "max") else ""
                raise self.error(
                    args[0] if args else tree,
                    f"{func} takes an event field, like {example}{extra}",
                )
            kind, field_name = (str(c) for c in args[0].children)
        filters = tuple(self._filter(c) for c in where.children[1:]) if where else ()
        spec = AggregateSpec(f"a{len(self.specs)}", func, kind, field_name, filters)
        key = self.keys.get(spec.signature)
        if key is None:
            if len(self.specs) >= MAX_AGGREGATES:
                raise self.error(
                    tree,
                    f"the formula uses more than {MAX_AGGREGATES} different aggregates; "
                    "simplify it",
                )
            self.specs.append(spec)
            key = self.keys[spec.signature] = spec.key
        return ast.Aggregate(key, **self._at(tree)), frozenset({NUM})

    def _filter_value(self, tree: Tree[Token] | Token) -> FilterValue:
        assert isinstance(tree, Tree)
        token = tree.children[-1]
        assert isinstance(token, Token)
        if tree.data == "fv_string":
            return _decode_string(token)
        value = self._number(token, str(token))
        return value.copy_negate() if tree.data == "fv_negative" else value

    def _filter(self, tree: Tree[Token] | Token) -> Filter:
        assert isinstance(tree, Tree)
        attribute_token = tree.children[0]
        assert isinstance(attribute_token, Token)
        attribute = str(attribute_token)
        if tree.data == "cmp_condition":
            op_token = tree.children[1]
            assert isinstance(op_token, Token)
            op = "=" if str(op_token) in ("=", "==") else str(op_token)
            values: tuple[FilterValue, ...] = (self._filter_value(tree.children[2]),)
        else:
            op = "in" if tree.data == "in_condition" else "not in"
            value_list = tree.children[-1]
            assert isinstance(value_list, Tree)
            values = tuple(self._filter_value(c) for c in value_list.children)
        texts = [v for v in values if isinstance(v, str)]
        if op in ORDERING_OPS and texts:
            raise self.error(tree, f"'{op}' compares with a number, not text")
        if attribute == "amount" and texts:
            raise self.error(tree, "amount is a number; compare it with numbers")
        if attribute == "currency" and len(texts) != len(values):
            raise self.error(tree, 'currency is text; compare it with text like "EUR"')
        return Filter(attribute, op, values)

    def _template(self, tree: Tree[Token], args: list[Tree[Token]]) -> tuple[ast.Node, Type]:
        if len(args) != 1:
            raise self.error(
                tree, 'template takes one bonus template name, like template("10 Free Spins")'
            )
        node, _ = self.expr(args[0])
        name = _constant_text(node)
        if name is None:
            raise self.error(
                args[0],
                'the template name must be text in quotes, like template("10 Free Spins"), '
                "or a text variable",
            )
        if not name.strip():
            raise self.error(args[0], "the template name is empty")
        if len(name) > MAX_TEMPLATE_NAME_LENGTH:
            raise self.error(
                args[0], f"the template name is longer than {MAX_TEMPLATE_NAME_LENGTH} characters"
            )
        if name not in self.templates:
            self.templates.append(name)
        return ast.Template(name, **self._at(tree)), frozenset({TEMPLATE})

    def _scalar(
        self, tree: Tree[Token], name: str, args: list[Tree[Token]]
    ) -> tuple[ast.Node, Type]:
        arity = {"cap": (2, 2), "floor": (1, 1), "abs": (1, 1), "round": (1, 2)}
        low, high = arity.get(name, (2, 1_000))
        usage = {
            "min": "min(a, b, ...) or min(deposit.amount)",
            "max": "max(a, b, ...) or max(deposit.amount)",
            "cap": "cap(amount, limit)",
            "floor": "floor(amount)",
            "abs": "abs(amount)",
            "round": "round(amount, decimals)",
        }[name]
        if not low <= len(args) <= high:
            raise self.error(tree, f"{name} takes {_count(low, high)}: {usage}")
        nodes: list[ast.Node] = []
        skip: set[str] = set()
        for index, arg in enumerate(args):
            node, ty = self._operand(arg, f"{name}(...)")
            skip |= ty & {SKIP}
            if (
                name == "round"
                and index == 1
                and isinstance(node, ast.Number)
                and not (node.value == node.value.to_integral_value() and 0 <= node.value <= 8)
            ):
                raise self.error(arg, "round takes a whole number of decimals from 0 to 8")
            nodes.append(node)
        return ast.Call(name, tuple(nodes), **self._at(tree)), frozenset({NUM} | skip)


def _constant_text(node: ast.Node) -> str | None:
    """The text of a literal or of a text variable; None for anything only known at runtime."""
    if isinstance(node, ast.Text):
        return node.value
    if isinstance(node, ast.Variable) and isinstance(node.value, str):
        return node.value
    return None


def _count(low: int, high: int) -> str:
    if low == high:
        return f"exactly {low} value{'s' if low != 1 else ''}"
    return f"{low} to {high:,} values"
