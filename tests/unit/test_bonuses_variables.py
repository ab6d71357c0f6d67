"""core.bonuses: definition variables (fixed and per currency: parsing, checks, the compiled
formula resolving them with the customer's currency, the revision on a change, the stored form)
and the trigger update masks."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    DefinitionVariable,
    ResultType,
    apply_update,
    check_variables,
    parse_variable,
    validate_definition,
    variables_from_stored,
)
from core.bonuses.rules import RULE_UPDATABLE, SCHEDULE_UPDATABLE, check_update_mask
from core.errors import InvalidArgument
from core.formula import AggregateValue, FormulaInputs, SkipReason
from core.periods import TimeBackPeriod
from core.rounding import RoundingMode

MAX_BONUS = DefinitionVariable("max_bonus", per_currency=(("EUR", Decimal(200)),
                                                          ("USD", Decimal(250))))


def capped(*variables: DefinitionVariable) -> BonusDefinition:
    return BonusDefinition(
        definition_id="capped", display_name="", formula="cap(sum(deposit.amount) * 50%, "
        "max_bonus)", result_type=ResultType.AMOUNT, points_target=None, min_allowed=None,
        cap_amount=None, rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=ApprovalMode.AUTOMATIC, batch_window_seconds=None, variables=variables)


def deposits(total: str, currency: str | None) -> FormulaInputs:
    return FormulaInputs(aggregates={"a0": AggregateValue(Decimal(total), 1)}, properties={},
                         currency=currency)


def test_parse_variable_fixed_and_per_currency() -> None:
    assert parse_variable(0, "rate", " 0.05 ", {}) == DefinitionVariable("rate",
                                                                         Decimal("0.05"))
    assert parse_variable(1, "max_bonus", "", {"usd": "250", "EUR": "200"}) == MAX_BONUS
    assert parse_variable(2, "min_loss", "-5", {}).value == Decimal(-5)


@pytest.mark.parametrize(("name", "value", "per_currency", "message"), [
    ("", "1", {}, "variables[3]: name is required"),
    ("then", "1", {}, "variables[3] ('then'): a name must be letters"),
    ("count", "1", {}, "not a keyword or function"),
    ("a-b", "1", {}, "letters, digits and '_'"),
    ("x", "", {}, "variables[3] ('x'): needs a value or per-currency values"),
    ("x", "ten", {}, "variables[3] ('x'): value must be a decimal number, got 'ten'"),
    ("x", "Infinity", {}, "value must be a decimal number, got 'Infinity'"),
    ("x", "", {"EUR": ""}, "the EUR value must be a decimal number, got ''"),
    ("x", "", {"EURO": "1"}, "'EURO' is not a currency code"),
    ("x", "", {"EUR": "1", " eur": "2"}, "currency EUR is given twice"),
    ("x", "1", {"EUR": "1"}, "give value or per_currency, not both"),
])
def test_bad_variables(name: str, value: str, per_currency: dict[str, str],
                       message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_variable(3, name, value, per_currency)
    assert caught.value.reason == "INVALID_VARIABLE"
    assert message in caught.value.message
    assert caught.value.metadata == {"field": "variables[3]", "variable": name}


def test_names_are_unique_and_kept_in_name_order() -> None:
    rate = DefinitionVariable("rate", Decimal("0.5"))
    assert check_variables([rate, MAX_BONUS]) == (MAX_BONUS, rate)
    with pytest.raises(InvalidArgument) as caught:
        check_variables([rate, MAX_BONUS, rate])
    assert caught.value.message == "variables[2] ('rate'): the name is given twice"
    with pytest.raises(InvalidArgument) as caught:
        check_variables([DefinitionVariable(f"v{i}", Decimal(i)) for i in range(51)])
    assert caught.value.message == "variables: at most 50, got 51"


def test_the_compiled_formula_resolves_per_currency_values_with_the_customers_currency() -> None:
    _, compiled = validate_definition(capped(MAX_BONUS))
    assert compiled.variables_used == ("max_bonus",)
    assert compiled.evaluate(deposits("1000", "EUR")).amount == Decimal(200)
    assert compiled.evaluate(deposits("1000", "usd")).amount == Decimal(250)
    assert compiled.evaluate(deposits("60", "EUR")).amount == Decimal(30)
    missing = compiled.evaluate(deposits("1000", "GBP"))
    assert missing.skip_reason is SkipReason.MISSING_CURRENCY_VALUE
    none = compiled.evaluate(deposits("1000", None))
    assert none.skip_detail == "the customer has no currency, needed for the variable 'max_bonus'"


def test_a_formula_naming_a_variable_the_definition_lacks_is_formula_invalid() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(capped())
    assert caught.value.reason == "FORMULA_INVALID"
    assert caught.value.metadata["field"] == "formula"
    assert "unknown name 'max_bonus'" in caught.value.message


def test_a_change_of_variables_is_a_new_revision_a_reordering_is_not() -> None:
    rate = DefinitionVariable("rate", Decimal("0.5"))
    current, _ = validate_definition(capped(MAX_BONUS, rate))
    reordered, _ = validate_definition(apply_update(current, capped(rate, MAX_BONUS),
                                                    ["variables"]))
    assert reordered.revision == 1 and reordered.variables == (MAX_BONUS, rate)
    raised = apply_update(current, capped(DefinitionVariable(
        "max_bonus", per_currency=(("EUR", Decimal(300)),)), rate), ["variables"])
    assert raised.revision == 2


def test_variables_round_trip_through_their_stored_form() -> None:
    variables = (MAX_BONUS, DefinitionVariable("rate", Decimal("0.050")))
    stored = [v.to_stored() for v in variables]
    assert stored == [{"name": "max_bonus", "per_currency": {"EUR": "200", "USD": "250"}},
                      {"name": "rate", "value": "0.050"}]
    assert variables_from_stored(stored) == variables


def test_trigger_update_masks() -> None:
    assert check_update_mask(["every", "filter", "every"], RULE_UPDATABLE) == ["every", "filter"]
    for paths, updatable in ((["rule_id"], RULE_UPDATABLE), (["create_time"], RULE_UPDATABLE),
                             (["next_run_time"], SCHEDULE_UPDATABLE),
                             (["schedule_id"], SCHEDULE_UPDATABLE)):
        with pytest.raises(InvalidArgument) as caught:
            check_update_mask(paths, updatable)
        assert caught.value.reason == "INVALID_UPDATE_MASK"
        assert caught.value.metadata == {"field": "update_mask", "path": paths[0]}
    with pytest.raises(InvalidArgument) as caught:
        check_update_mask([], SCHEDULE_UPDATABLE)
    assert caught.value.message == "update_mask must name at least one field"
