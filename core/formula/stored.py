"""The stored (JSON-able) form of a compiled formula, and its validated reconstruction.

Storage keeps the source, the language version, the promotion variables the formula read and
the compiled tree. Reloading a formula of the current version rebuilds the tree without parsing;
a formula of another version is recompiled from its source, so a language change never strands
old promotions. Nothing in a stored form is trusted: every field is checked and a bad one is an
InvalidArgument(reason="FORMULA_INVALID") naming its path (``program.result.args[1].op``).
Decimals are stored as strings, never JSON floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from core.errors import InvalidArgument
from core.formula import ast
from core.formula.model import (
    AGGREGATE_FUNCTIONS,
    FILTER_OPS,
    FORMULA_LANGUAGE_VERSION,
    AggregateSpec,
    Filter,
    FilterValue,
    is_identifier,
)
from core.formula.parser import MAX_NESTING_DEPTH, MAX_SOURCE_LENGTH

if TYPE_CHECKING:
    from core.formula.compiler import CompiledFormula, VariableValue

FORMAT = "promo.formula"
_MAX_STORED_DEPTH = MAX_NESTING_DEPTH * 4
_ARITHMETIC_OPS = ("+", "-", "*", "/")
_COMPARISON_OPS = ("==", "!=", "<", ">", "<=", ">=")
_ARITY = {"min": (2, 10_000), "max": (2, 10_000), "cap": (2, 2), "floor": (1, 1),
          "abs": (1, 1), "round": (1, 2)}  # fmt: skip


# --- encoding ----------------------------------------------------------------------------


def _encode_filter_value(value: FilterValue) -> dict[str, str]:
    return {"text": value} if isinstance(value, str) else {"number": str(value)}


def _encode_variable(value: VariableValue) -> dict[str, Any]:
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, Decimal):
        return {"number": str(value)}
    return {"per_currency": {code: str(amount) for code, amount in value.items()}}


def encode_node(node: ast.Node) -> dict[str, Any]:
    """One tree node as a JSON object tagged with its class name."""
    out: dict[str, Any] = {"node": type(node).__name__, "line": node.line, "column": node.column}
    if isinstance(node, ast.Number):
        out["value"] = str(node.value)
    elif isinstance(node, ast.Text | ast.Boolean):
        out["value"] = node.value
    elif isinstance(node, ast.Template | ast.LocalRef | ast.Property):
        out["name"] = node.name
    elif isinstance(node, ast.Variable):
        out["name"] = node.name
        out["value"] = _encode_variable(node.value)
    elif isinstance(node, ast.CurrencyVariable):
        out["name"] = node.name
        out["values"] = [[code, str(amount)] for code, amount in node.values]
    elif isinstance(node, ast.Aggregate):
        out["key"] = node.key
    elif isinstance(node, ast.Negate | ast.Not):
        out["operand"] = encode_node(node.operand)
    elif isinstance(node, ast.Arithmetic):
        out["first"] = encode_node(node.first)
        out["rest"] = [[op, encode_node(operand)] for op, operand in node.rest]
    elif isinstance(node, ast.Comparison):
        out["op"] = node.op
        out["left"] = encode_node(node.left)
        out["right"] = encode_node(node.right)
    elif isinstance(node, ast.Logical):
        out["op"] = node.op
        out["operands"] = [encode_node(o) for o in node.operands]
    elif isinstance(node, ast.Conditional):
        out["branches"] = [
            {"condition": encode_node(b.condition), "value": encode_node(b.value), "text": b.text}
            for b in node.branches
        ]
        out["otherwise"] = None if node.otherwise is None else encode_node(node.otherwise)
    elif isinstance(node, ast.Call):
        out["function"] = node.function
        out["args"] = [encode_node(a) for a in node.args]
    return out


def encode_spec(spec: AggregateSpec) -> dict[str, Any]:
    """An aggregate spec as JSON."""
    return {
        "key": spec.key,
        "func": spec.func,
        "kind": spec.kind,
        "field": spec.field,
        "filters": [
            {
                "attribute": f.attribute,
                "op": f.op,
                "values": [_encode_filter_value(v) for v in f.values],
            }
            for f in spec.filters
        ],
    }


def formula_to_dict(formula: CompiledFormula) -> dict[str, Any]:
    """The complete stored form of a compiled formula."""
    program = formula.program
    return {
        "format": FORMAT,
        "version": formula.version,
        "source": formula.source,
        "variables": {name: _encode_variable(v) for name, v in formula.variables.items()},
        "aggregates": [encode_spec(s) for s in formula.aggregates],
        "properties_used": list(formula.properties_used),
        "variables_used": list(formula.variables_used),
        "templates_used": list(formula.templates_used),
        "program": {
            "assignments": [
                {"name": a.name, "line": a.line, "column": a.column, "value": encode_node(a.value)}
                for a in program.assignments
            ],
            "result": encode_node(program.result),
        },
    }


# --- decoding ----------------------------------------------------------------------------


def _bad(path: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        f"stored formula: {path}: {message}", reason="FORMULA_INVALID", metadata={"field": path}
    )


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(path, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise _bad(path, f"must be a list, got {type(value).__name__}")
    return list(value)


def _field(d: Mapping[str, Any], name: str, path: str) -> Any:
    if name not in d:
        raise _bad(f"{path}.{name}", "is missing")
    return d[name]


def _str(d: Mapping[str, Any], name: str, path: str, *, identifier: bool = False) -> str:
    value = _field(d, name, path)
    if not isinstance(value, str):
        raise _bad(f"{path}.{name}", f"must be text, got {type(value).__name__}")
    if identifier and not is_identifier(value):
        raise _bad(f"{path}.{name}", f"must be a name, got {value!r}")
    return value


def _int(d: Mapping[str, Any], name: str, path: str) -> int:
    value = _field(d, name, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{path}.{name}", f"must be a whole number, got {value!r}")
    return value


def _decimal(value: object, path: str) -> Decimal:
    if not isinstance(value, str):
        raise _bad(path, f"a number must be stored as text, got {type(value).__name__}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _bad(path, f"{value!r} is not a number") from None
    if not number.is_finite():
        raise _bad(path, f"{value!r} is not a finite number")
    return number


def _decode_variable(value: object, path: str) -> VariableValue:
    d = _obj(value, path)
    if len(d) != 1:
        raise _bad(path, "must have exactly one of number, text, per_currency")
    if "text" in d:
        return _str(d, "text", path)
    if "number" in d:
        return _decimal(d["number"], f"{path}.number")
    if "per_currency" in d:
        per = _obj(d["per_currency"], f"{path}.per_currency")
        return {str(code): _decimal(v, f"{path}.per_currency.{code}") for code, v in per.items()}
    raise _bad(path, "must have exactly one of number, text, per_currency")


def _decode_filter_value(value: object, path: str) -> FilterValue:
    d = _obj(value, path)
    if set(d) == {"text"}:
        return _str(d, "text", path)
    if set(d) == {"number"}:
        return _decimal(d["number"], f"{path}.number")
    raise _bad(path, 'must be {"text": ...} or {"number": ...}')


def decode_spec(value: object, path: str) -> AggregateSpec:
    """An aggregate spec from JSON, validated."""
    d = _obj(value, path)
    func = _str(d, "func", path)
    if func not in AGGREGATE_FUNCTIONS:
        raise _bad(f"{path}.func", f"unknown aggregate function {func!r}")
    field_value = _field(d, "field", path)
    if field_value is not None and not is_identifier(field_value):
        raise _bad(f"{path}.field", f"must be a name or null, got {field_value!r}")
    filters: list[Filter] = []
    for index, item in enumerate(_list(_field(d, "filters", path), f"{path}.filters")):
        fpath = f"{path}.filters[{index}]"
        fd = _obj(item, fpath)
        op = _str(fd, "op", fpath)
        if op not in FILTER_OPS:
            raise _bad(f"{fpath}.op", f"unknown filter operator {op!r}")
        values = tuple(
            _decode_filter_value(v, f"{fpath}.values[{i}]")
            for i, v in enumerate(_list(_field(fd, "values", fpath), f"{fpath}.values"))
        )
        try:
            filters.append(Filter(_str(fd, "attribute", fpath, identifier=True), op, values))
        except InvalidArgument as exc:
            raise _bad(fpath, exc.message) from None
    try:
        return AggregateSpec(
            _str(d, "key", path), func, _str(d, "kind", path, identifier=True), field_value,
            tuple(filters),
        )  # fmt: skip
    except InvalidArgument as exc:
        raise _bad(path, exc.message) from None


class _Decoder:
    """Decodes one stored tree, checking references as it goes."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys
        self.defined: set[str] = set()

    def node(self, value: object, path: str, depth: int = 0) -> ast.Node:
        if depth > _MAX_STORED_DEPTH:
            raise _bad(path, "the tree is nested too deeply")
        d = _obj(value, path)
        kind = _str(d, "node", path)
        pos = {"line": _int(d, "line", path), "column": _int(d, "column", path)}
        sub = depth + 1
        if kind == "Number":
            return ast.Number(_decimal(_field(d, "value", path), f"{path}.value"), **pos)
        if kind == "Text":
            return ast.Text(_str(d, "value", path), **pos)
        if kind == "Boolean":
            flag = _field(d, "value", path)
            if not isinstance(flag, bool):
                raise _bad(f"{path}.value", "must be true or false")
            return ast.Boolean(flag, **pos)
        if kind == "Skip":
            return ast.Skip(**pos)
        if kind == "Template":
            name = _str(d, "name", path)
            if not name.strip():
                raise _bad(f"{path}.name", "is empty")
            return ast.Template(name, **pos)
        if kind == "Variable":
            variable = _decode_variable(_field(d, "value", path), f"{path}.value")
            if not isinstance(variable, Decimal | str):
                raise _bad(f"{path}.value", "a single-value variable is a number or text")
            return ast.Variable(_str(d, "name", path, identifier=True), variable, **pos)
        if kind == "CurrencyVariable":
            pairs: list[tuple[str, Decimal]] = []
            for index, item in enumerate(_list(_field(d, "values", path), f"{path}.values")):
                pair = _list(item, f"{path}.values[{index}]")
                if len(pair) != 2 or not isinstance(pair[0], str):
                    raise _bad(f"{path}.values[{index}]", "must be [currency, amount]")
                pairs.append((pair[0], _decimal(pair[1], f"{path}.values[{index}][1]")))
            if not pairs:
                raise _bad(f"{path}.values", "is empty")
            return ast.CurrencyVariable(_str(d, "name", path, identifier=True), tuple(pairs), **pos)
        if kind == "LocalRef":
            name = _str(d, "name", path, identifier=True)
            if name not in self.defined:
                raise _bad(f"{path}.name", f"'{name}' is not assigned before this point")
            return ast.LocalRef(name, **pos)
        if kind == "Property":
            name = _str(d, "name", path)
            if not name.strip():
                raise _bad(f"{path}.name", "is empty")
            return ast.Property(name, **pos)
        if kind == "Aggregate":
            key = _str(d, "key", path)
            if key not in self.keys:
                raise _bad(f"{path}.key", f"no aggregate {key!r} in the aggregates list")
            return ast.Aggregate(key, **pos)
        if kind in ("Negate", "Not"):
            operand = self.node(_field(d, "operand", path), f"{path}.operand", sub)
            return ast.Negate(operand, **pos) if kind == "Negate" else ast.Not(operand, **pos)
        if kind == "Arithmetic":
            first = self.node(_field(d, "first", path), f"{path}.first", sub)
            rest: list[tuple[str, ast.Node]] = []
            for index, item in enumerate(_list(_field(d, "rest", path), f"{path}.rest")):
                ipath = f"{path}.rest[{index}]"
                pair = _list(item, ipath)
                if len(pair) != 2 or pair[0] not in _ARITHMETIC_OPS:
                    raise _bad(ipath, "must be [operator, node] with operator + - * /")
                rest.append((pair[0], self.node(pair[1], f"{ipath}[1]", sub)))
            return ast.Arithmetic(first, tuple(rest), **pos)
        if kind == "Comparison":
            op = _str(d, "op", path)
            if op not in _COMPARISON_OPS:
                raise _bad(f"{path}.op", f"unknown comparison {op!r}")
            left = self.node(_field(d, "left", path), f"{path}.left", sub)
            right = self.node(_field(d, "right", path), f"{path}.right", sub)
            return ast.Comparison(op, left, right, **pos)
        if kind == "Logical":
            op = _str(d, "op", path)
            if op not in ("and", "or"):
                raise _bad(f"{path}.op", f"must be 'and' or 'or', got {op!r}")
            operands = [
                self.node(item, f"{path}.operands[{i}]", sub)
                for i, item in enumerate(_list(_field(d, "operands", path), f"{path}.operands"))
            ]
            if len(operands) < 2:
                raise _bad(f"{path}.operands", "needs at least two operands")
            return ast.Logical(op, tuple(operands), **pos)
        if kind == "Conditional":
            branches: list[ast.Branch] = []
            for i, item in enumerate(_list(_field(d, "branches", path), f"{path}.branches")):
                bpath = f"{path}.branches[{i}]"
                bd = _obj(item, bpath)
                branches.append(
                    ast.Branch(
                        self.node(_field(bd, "condition", bpath), f"{bpath}.condition", sub),
                        self.node(_field(bd, "value", bpath), f"{bpath}.value", sub),
                        _str(bd, "text", bpath),
                    )
                )
            if not branches:
                raise _bad(f"{path}.branches", "needs at least one branch")
            raw_otherwise = _field(d, "otherwise", path)
            otherwise = (
                None if raw_otherwise is None
                else self.node(raw_otherwise, f"{path}.otherwise", sub)
            )  # fmt: skip
            return ast.Conditional(tuple(branches), otherwise, **pos)
        if kind == "Call":
            function = _str(d, "function", path)
            if function not in _ARITY:
                raise _bad(f"{path}.function", f"unknown function {function!r}")
            args = [
                self.node(item, f"{path}.args[{i}]", sub)
                for i, item in enumerate(_list(_field(d, "args", path), f"{path}.args"))
            ]
            low, high = _ARITY[function]
            if not low <= len(args) <= high:
                raise _bad(f"{path}.args", f"{function} takes {low} to {high} arguments")
            return ast.Call(function, tuple(args), **pos)
        raise _bad(f"{path}.node", f"unknown node type {kind!r}")


def _variables_used(
    d: Mapping[str, Any], nodes: list[ast.Node], variables: Mapping[str, object]
) -> tuple[str, ...]:
    """The stored list, checked: it must cover the variables in the tree (a text variable used
    as a template name leaves no Variable node, so the list cannot simply be recomputed)."""
    stored = [str(n) for n in _list(d.get("variables_used", []), "variables_used")]
    in_tree = {n.name for n in nodes if isinstance(n, ast.Variable | ast.CurrencyVariable)}
    missing = in_tree - set(stored)
    if missing:
        raise _bad("variables_used", f"does not list {sorted(missing)}")
    unknown = [name for name in stored if name not in variables]
    if unknown:
        raise _bad("variables", f"has no value for {unknown}")
    return _ordered_unique(stored)


def _ordered_unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def formula_from_dict(value: Mapping[str, Any]) -> CompiledFormula:
    """Rebuild a CompiledFormula from its stored form (see the module docstring)."""
    from core.formula.compiler import CompiledFormula, compile_formula

    d = _obj(value, "formula")
    if d.get("format", FORMAT) != FORMAT:
        raise _bad("format", f"must be {FORMAT!r}")
    source = _str(d, "source", "formula")
    if len(source) > MAX_SOURCE_LENGTH:
        raise _bad("source", f"is longer than {MAX_SOURCE_LENGTH} characters")
    version = _field(d, "version", "formula")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("version", f"must be a whole number, got {version!r}")
    variables = {
        str(name): _decode_variable(v, f"variables.{name}")
        for name, v in _obj(d.get("variables", {}), "variables").items()
    }
    if version != FORMULA_LANGUAGE_VERSION:
        return compile_formula(source, variables=variables)

    specs = [
        decode_spec(item, f"aggregates[{i}]")
        for i, item in enumerate(_list(_field(d, "aggregates", "formula"), "aggregates"))
    ]
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise _bad("aggregates", "two aggregates share a key")
    if len({s.signature for s in specs}) != len(specs):
        raise _bad("aggregates", "the same aggregate is listed twice")
    decoder = _Decoder(set(keys))
    program_d = _obj(_field(d, "program", "formula"), "program")
    assignments: list[ast.Assignment] = []
    raw_assignments = _list(_field(program_d, "assignments", "program"), "program.assignments")
    for index, item in enumerate(raw_assignments):
        apath = f"program.assignments[{index}]"
        ad = _obj(item, apath)
        name = _str(ad, "name", apath, identifier=True)
        if name in decoder.defined or name in variables:
            raise _bad(f"{apath}.name", f"'{name}' is assigned twice or shadows a variable")
        node = decoder.node(_field(ad, "value", apath), f"{apath}.value")
        decoder.defined.add(name)
        assignments.append(
            ast.Assignment(name, node, _int(ad, "line", apath), _int(ad, "column", apath))
        )
    result = decoder.node(_field(program_d, "result", "program"), "program.result")
    program = ast.Program(tuple(assignments), result)

    nodes = list(ast.walk(program))
    used_keys = {n.key for n in nodes if isinstance(n, ast.Aggregate)}
    if used_keys != set(keys):
        raise _bad("aggregates", "lists aggregates the formula does not use")
    return CompiledFormula(
        source=source,
        version=version,
        program=program,
        aggregates=tuple(specs),
        properties_used=_ordered_unique([n.name for n in nodes if isinstance(n, ast.Property)]),
        variables_used=_variables_used(d, nodes, variables),
        templates_used=_ordered_unique([n.name for n in nodes if isinstance(n, ast.Template)]),
        variables=variables,
    )
