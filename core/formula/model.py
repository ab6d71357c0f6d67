"""Value types shared by the compiler, the evaluator and the aggregation back ends.

An :class:`AggregateSpec` is the contract between a compiled formula and whoever reads the
customer's events: the in-memory reference (:mod:`core.formula.memory`) or the SQL batch path.
Both must produce the same :class:`AggregateValue` for the same events.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import Decimal

from core.errors import InvalidArgument

FORMULA_LANGUAGE_VERSION = 1
"""Bumped whenever the stored compiled tree changes shape or meaning; stored formulas of another
version are recompiled from their source."""

AGGREGATE_FUNCTIONS = ("sum", "count", "avg", "min", "max", "first", "last")
FILTER_OPS = ("=", "!=", "in", "not in", "<", ">", "<=", ">=")
ORDERING_OPS = ("<", ">", "<=", ">=")
PSEUDO_ATTRIBUTES = ("amount", "currency")
"""Filter attributes that read the event's own columns rather than its attributes."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

FilterValue = str | Decimal
PropertyValue = str | Decimal | bool | None


def _invalid(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason="FORMULA_INVALID", metadata={"field": field})


def is_identifier(name: object) -> bool:
    """Whether ``name`` is a formula identifier (letters, digits, underscores)."""
    return isinstance(name, str) and _IDENTIFIER.match(name) is not None


def format_value(value: FilterValue) -> str:
    """A filter value as it is written in a formula (text quoted and escaped)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@dataclass(frozen=True)
class Filter:
    """One condition of an aggregate's ``where`` clause.

    Semantics (mirrored by SQL with IS DISTINCT FROM): a missing attribute never matches ``=``,
    ``in`` or an ordering, and always matches ``!=`` and ``not in``. Equality needs the same type
    on both sides (text with text, number with number, numbers compared numerically); orderings
    need a numeric attribute value, anything else does not match.
    """

    attribute: str
    op: str
    values: tuple[FilterValue, ...]

    def __post_init__(self) -> None:
        if not is_identifier(self.attribute):
            raise _invalid(f"filter attribute must be a name, got {self.attribute!r}", "attribute")
        if self.op not in FILTER_OPS:
            raise _invalid(f"filter operator must be one of {FILTER_OPS}, got {self.op!r}", "op")
        if not isinstance(self.values, tuple) or not self.values:
            raise _invalid("a filter needs at least one value", "values")
        for value in self.values:
            if isinstance(value, Decimal):
                if not value.is_finite():
                    raise _invalid(f"filter values must be finite, got {value}", "values")
            elif not isinstance(value, str):
                raise _invalid(f"filter values are text or Decimal, got {value!r}", "values")
        if self.op not in ("in", "not in") and len(self.values) != 1:
            raise _invalid(f"the {self.op} filter takes exactly one value", "values")
        if self.op in ORDERING_OPS and not isinstance(self.values[0], Decimal):
            raise _invalid(f"the {self.op} filter compares with a number", "values")

    def describe(self) -> str:
        """The condition as it reads in a formula: ``game_category != "Roulette"``."""
        if self.op in ("in", "not in"):
            inner = ", ".join(format_value(v) for v in self.values)
            return f"{self.attribute} {self.op} ({inner})"
        return f"{self.attribute} {self.op} {format_value(self.values[0])}"


@dataclass(frozen=True)
class AggregateSpec:
    """One aggregate a formula needs, e.g. ``sum(bet.amount where game != "Roulette")``.

    ``key`` is stable ("a0", "a1", ... in order of first appearance in the source); identical
    aggregates written twice share one key and are computed once. ``field`` is None for count.
    """

    key: str
    func: str
    kind: str
    field: str | None
    filters: tuple[Filter, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise _invalid(f"aggregate key must be non-empty text, got {self.key!r}", "key")
        if self.func not in AGGREGATE_FUNCTIONS:
            raise _invalid(f"unknown aggregate function {self.func!r}", "func")
        if not is_identifier(self.kind):
            raise _invalid(f"event kind must be a name, got {self.kind!r}", "kind")
        if self.func == "count":
            if self.field is not None:
                raise _invalid("count has no field", "field")
        elif not is_identifier(self.field):
            raise _invalid(f"{self.func} needs a field name, got {self.field!r}", "field")
        if not isinstance(self.filters, tuple) or not all(
            isinstance(f, Filter) for f in self.filters
        ):
            raise _invalid("filters must be a tuple of Filter", "filters")

    @property
    def signature(self) -> tuple[str, str, str | None, tuple[Filter, ...]]:
        """Everything but the key: two specs with equal signatures compute the same value."""
        return (self.func, self.kind, self.field, self.filters)

    def describe(self) -> str:
        """The aggregate as it reads in a formula."""
        target = self.kind if self.field is None else f"{self.kind}.{self.field}"
        if self.filters:
            target += " where " + " and ".join(f.describe() for f in self.filters)
        return f"{self.func}({target})"


@dataclass(frozen=True)
class AggregateValue:
    """The result of one aggregate for one customer.

    ``count`` is the number of events that contributed. ``value`` is None when nothing matched
    for avg / min / max / first / last; the sum of nothing is 0 and count's value is the count.
    """

    value: Decimal | None
    count: int


@dataclass(frozen=True)
class FormulaInputs:
    """Everything a compiled formula reads for one customer.

    ``aggregates`` is keyed by :attr:`AggregateSpec.key`; ``properties`` by the property name as
    written in the formula (``customer.tier`` -> "tier", ``customer["Logins count ever"]`` ->
    "Logins count ever"); ``currency`` is the customer's currency, used for per-currency
    variables.
    """

    aggregates: Mapping[str, AggregateValue] = dataclass_field(default_factory=dict)
    properties: Mapping[str, PropertyValue] = dataclass_field(default_factory=dict)
    currency: str | None = None
