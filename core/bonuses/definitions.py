"""Dynamic reward definitions: a formula and everything that decides what its value becomes.

A definition says what the formula gives (an amount, a bonus template, or points / gems /
diamonds, points going to the balance, a leaderboard or level progress), how an amount is
finished (rounding and decimals, then the cap, then the minimum: core.formula.evaluator's
pipeline), which data it reads (transactions and properties over a period, or properties only,
which has no period), whether results wait for an operator, how long requests pile up before
their batch runs, and the named amounts (variables) its formula may use: a fixed value, or one
value per currency resolved with each customer's currency when evaluated (seed 004: "a cap of
200 EUR or 250 USD"). Everything is checked when saved, so a batch never meets a bad
definition.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from core.bonuses.messages import validate_template
from core.bonuses.windows import check_window_seconds
from core.customers import CURRENCY_PATTERN
from core.errors import InvalidArgument
from core.formula import CompiledFormula, ResultOptions, compile_formula
from core.formula.compiler import FUNCTIONS, KEYWORDS
from core.formula.model import is_identifier
from core.money import parse_decimal, read_decimal
from core.periods import Period, period_from_dict, period_to_dict
from core.rounding import RoundingMode

DEFINITION_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
# Results and the ledger store amounts as numeric(20,6): a definition rounding to more places
# would have PostgreSQL round its amounts again (half up) when they are written, so the issued
# amount would differ from the one calculated and announced.
MAX_BONUS_DECIMALS = 6
MAX_DISPLAY_NAME = 200
MAX_VARIABLES = 50


class ResultType(enum.Enum):
    AMOUNT = "AMOUNT"
    BONUS_TEMPLATE = "BONUS_TEMPLATE"
    POINTS = "POINTS"
    GEMS = "GEMS"
    DIAMONDS = "DIAMONDS"


class PointsTarget(enum.Enum):
    BALANCE = "BALANCE"
    LEADERBOARD = "LEADERBOARD"
    LEVEL_PROGRESS = "LEVEL_PROGRESS"


class DataMode(enum.Enum):
    TRANSACTIONS_AND_PROPERTIES = "TRANSACTIONS_AND_PROPERTIES"
    PROPERTIES_ONLY = "PROPERTIES_ONLY"


class ApprovalMode(enum.Enum):
    AUTOMATIC = "AUTOMATIC"
    MANUAL = "MANUAL"


MESSAGE_FIELDS = ("skipped_message", "calculated_message", "issued_message")
UPDATABLE = ("display_name", "formula", "variables", "result_type", "points_target",
             "min_allowed", "cap_amount", "rounding", "decimals", "rounding_factor", "data_mode",
             "period", "approval_mode", "batch_window_seconds", *MESSAGE_FIELDS)
# Fields whose change alters what a calculation gives (a new revision of the definition).
CALCULATION_FIELDS = frozenset(UPDATABLE) - {"display_name", "approval_mode",
                                             "batch_window_seconds", *MESSAGE_FIELDS}


@dataclass(frozen=True)
class DefinitionVariable:
    """A named amount of a definition: ``value``, or ``per_currency`` (code, amount) pairs in
    code order (the customer's currency picks one when the formula is evaluated)."""

    name: str
    value: Decimal | None = None
    per_currency: tuple[tuple[str, Decimal], ...] = ()

    def formula_value(self) -> Decimal | dict[str, Decimal]:
        """What core.formula.compile_formula takes for this variable."""
        if self.per_currency:
            return dict(self.per_currency)
        assert self.value is not None
        return self.value

    def to_stored(self) -> dict[str, Any]:
        if self.per_currency:
            return {"name": self.name, "per_currency": {c: str(v) for c, v in self.per_currency}}
        return {"name": self.name, "value": str(self.value)}


@dataclass(frozen=True)
class BonusDefinition:
    definition_id: str
    display_name: str
    formula: str
    result_type: ResultType
    points_target: PointsTarget | None
    min_allowed: Decimal | None
    cap_amount: Decimal | None
    rounding: RoundingMode
    decimals: int
    rounding_factor: Decimal | None
    data_mode: DataMode
    period: Period | None
    approval_mode: ApprovalMode
    batch_window_seconds: int | None  # None: the deployment's default
    skipped_message: str = ""
    calculated_message: str = ""
    issued_message: str = ""
    variables: tuple[DefinitionVariable, ...] = ()
    revision: int = 1
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def options(self) -> ResultOptions:
        """The amount pipeline's settings (validated when the definition was)."""
        return ResultOptions(rounding=self.rounding, decimals=self.decimals,
                             factor=self.rounding_factor, cap_amount=self.cap_amount,
                             min_allowed=self.min_allowed)

    def period_dict(self) -> dict[str, object] | None:
        return None if self.period is None else period_to_dict(self.period)


def _bad(field: str, message: str, reason: str = "INVALID_BONUS_DEFINITION") -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", reason=reason, metadata={"field": field})


def _bad_variable(index: int, name: str, message: str) -> InvalidArgument:
    shown = f"variables[{index}]" + (f" ({name!r})" if name else "")
    return InvalidArgument(f"{shown}: {message}", reason="INVALID_VARIABLE",
                           metadata={"field": f"variables[{index}]", "variable": name})


def _variable_amount(index: int, name: str, text: str, what: str) -> Decimal:
    """An amount as the API reads every amount (core.money.parse_decimal: ASCII digits, so
    "1_000" is refused, at most 14 integer digits and 6 decimal places); negatives allowed."""
    if read_decimal(text) is None:
        raise _bad_variable(index, name, f"{what} must be a decimal number, got {text!r}")
    try:
        amount = parse_decimal(text, field=what, allow_negative=True)
    except InvalidArgument as exc:
        raise _bad_variable(index, name, exc.message) from exc
    assert amount is not None
    return amount


def parse_variable(index: int, name: str, value: str,
                   per_currency: Mapping[str, str]) -> DefinitionVariable:
    """One variable as given (decimal text, or currency code -> decimal text), checked: an
    identifier that is not a keyword or function, and numbers (a definition's variables are
    amounts: caps, rates, thresholds)."""
    if not name:
        raise _bad_variable(index, name, "name is required")
    if not is_identifier(name) or name in KEYWORDS or name in FUNCTIONS:
        raise _bad_variable(index, name, "a name must be letters, digits and '_', not "
                            "starting with a digit, and not a keyword or function")
    if per_currency:
        if value:
            raise _bad_variable(index, name, "give value or per_currency, not both")
        amounts: dict[str, Decimal] = {}
        for code, text in per_currency.items():
            upper = code.strip().upper()
            if not CURRENCY_PATTERN.fullmatch(upper):
                raise _bad_variable(index, name, f"{code!r} is not a currency code (ISO 4217, "
                                    "e.g. 'EUR')")
            if upper in amounts:
                raise _bad_variable(index, name, f"currency {upper} is given twice")
            amounts[upper] = _variable_amount(index, name, text, f"the {upper} value")
        return DefinitionVariable(name, per_currency=tuple(sorted(amounts.items())))
    if not value:
        raise _bad_variable(index, name, "needs a value or per-currency values")
    return DefinitionVariable(name, value=_variable_amount(index, name, value, "value"))


def check_variables(variables: Sequence[DefinitionVariable]) -> tuple[DefinitionVariable, ...]:
    """At most MAX_VARIABLES, each name once; returned in name order (so a reordering is not a
    change of the definition)."""
    if len(variables) > MAX_VARIABLES:
        raise InvalidArgument(f"variables: at most {MAX_VARIABLES}, got {len(variables)}",
                              reason="INVALID_VARIABLE", metadata={"field": "variables"})
    seen: set[str] = set()
    for index, variable in enumerate(variables):
        if variable.name in seen:
            raise _bad_variable(index, variable.name, "the name is given twice")
        seen.add(variable.name)
    return tuple(sorted(variables, key=lambda v: v.name))


def variables_from_stored(value: Sequence[Mapping[str, Any]]) -> tuple[DefinitionVariable, ...]:
    return tuple(
        DefinitionVariable(str(v["name"]), per_currency=tuple(
            (str(c), Decimal(str(a))) for c, a in sorted(v["per_currency"].items())))
        if "per_currency" in v else DefinitionVariable(str(v["name"]), Decimal(str(v["value"])))
        for v in value)


def compile_definition_formula(
        source: str, variables: Sequence[DefinitionVariable] = ()) -> CompiledFormula:
    """Compile ``source`` with the definition's variables; errors keep FORMULA_SYNTAX /
    FORMULA_INVALID with line and column and name the field."""
    try:
        return compile_formula(source, variables={v.name: v.formula_value() for v in variables})
    except InvalidArgument as exc:
        metadata = {**exc.metadata, "field": "formula"}
        raise InvalidArgument(f"formula: {exc.message}", reason=exc.reason,
                              metadata=metadata) from exc


def validate_definition(d: BonusDefinition) -> tuple[BonusDefinition, CompiledFormula]:
    """Check everything; return the definition (normalised) and its compiled formula."""
    if not DEFINITION_ID.match(d.definition_id):
        raise _bad("definition_id", "must be 1-64 characters: lower-case letters, digits, "
                   f"'_', '.', '-', starting with a letter or digit; got {d.definition_id!r}",
                   "INVALID_ID")
    if len(d.display_name) > MAX_DISPLAY_NAME:
        raise _bad("display_name", f"must be at most {MAX_DISPLAY_NAME} characters")
    if not d.formula.strip():
        raise _bad("formula", "is required", "MISSING_FIELD")
    d = replace(d, variables=check_variables(d.variables))
    compiled = compile_definition_formula(d.formula, d.variables)
    if d.result_type is ResultType.BONUS_TEMPLATE:
        if compiled.returns_amount:
            raise _bad("formula", "a BONUS_TEMPLATE definition must give template(\"...\") or "
                       "skip on every path, not an amount", "FORMULA_INVALID")
    elif compiled.returns_template:
        raise _bad("formula", f"a {d.result_type.value} definition must compute an amount, not "
                   "a bonus template (use result type BONUS_TEMPLATE)", "FORMULA_INVALID")
    if d.result_type is ResultType.POINTS:
        if d.points_target is None:
            raise _bad("points_target", "is required for POINTS: BALANCE, LEADERBOARD or "
                       "LEVEL_PROGRESS", "MISSING_FIELD")
    elif d.points_target is not None:
        raise _bad("points_target", f"applies to POINTS only, not {d.result_type.value}")
    if d.data_mode is DataMode.PROPERTIES_ONLY:
        if d.period is not None:
            raise _bad("period", "a PROPERTIES_ONLY definition has no transaction period")
        if compiled.aggregates:
            raise _bad("formula", "a PROPERTIES_ONLY definition reads customer properties "
                       f"only, but the formula reads {compiled.aggregates[0].describe()}",
                       "FORMULA_INVALID")
    elif d.period is None:
        raise _bad("period", "is required: this definition reads transactions",
                   "INVALID_PERIOD")
    if d.min_allowed is not None and d.cap_amount is not None and d.min_allowed > d.cap_amount:
        raise _bad("min_allowed", f"({d.min_allowed}) is above cap_amount ({d.cap_amount})")
    if d.decimals > MAX_BONUS_DECIMALS:
        raise InvalidArgument(
            f"decimals must be between 0 and {MAX_BONUS_DECIMALS} for a bonus definition "
            f"(amounts are stored with {MAX_BONUS_DECIMALS} decimal places), got {d.decimals}",
            reason="INVALID_ROUNDING", metadata={"field": "decimals", "value": str(d.decimals)})
    try:
        _ = d.options  # validates rounding, decimals, cap and minimum
    except InvalidArgument as exc:
        field = {"factor": "rounding_factor"}.get(exc.metadata.get("field", ""),
                                                 exc.metadata.get("field", "rounding"))
        raise InvalidArgument(exc.message, reason=exc.reason,
                              metadata={**exc.metadata, "field": field}) from exc
    if d.batch_window_seconds is not None:
        check_window_seconds(d.batch_window_seconds)
    for name in MESSAGE_FIELDS:
        validate_template(getattr(d, name), field=name)
    return d, compiled


def _comparable(path: str, value: Any) -> Any:
    """A field's value as a calculation sees it: variables in any order are the same."""
    return sorted(value, key=lambda v: v.name) if path == "variables" else value


def apply_update(current: BonusDefinition, patch: BonusDefinition,
                 paths: Sequence[str]) -> BonusDefinition:
    """``current`` with the masked fields taken from ``patch``; a calculation change bumps the
    revision (results of an older revision can be recalculated)."""
    if not paths:
        raise InvalidArgument("update_mask must name at least one field",
                              reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
    changes: dict[str, Any] = {}
    for path in paths:
        if path not in UPDATABLE:
            raise InvalidArgument(
                f"update_mask: {path!r} cannot be updated; updatable fields: "
                f"{', '.join(UPDATABLE)}", reason="INVALID_UPDATE_MASK",
                metadata={"field": "update_mask"})
        changes[path] = getattr(patch, path)
    updated = replace(current, **changes)
    if any(_comparable(p, getattr(updated, p)) != _comparable(p, getattr(current, p))
           for p in paths if p in CALCULATION_FIELDS):
        updated = replace(updated, revision=current.revision + 1)
    return updated


def period_from_stored(value: Mapping[str, object] | None) -> Period | None:
    return None if value is None else period_from_dict(value)
