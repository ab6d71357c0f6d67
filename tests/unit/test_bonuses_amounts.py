"""Bonus amounts at the edges, without a database: what decide stores for amounts results
cannot hold, how events write an amount (amount_places / amount_text), and the template check
for broken placeholders. The end-to-end side is tests/e2e/test_bonus_queue_regressions.py."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.bonuses.definitions import ApprovalMode
from core.bonuses.messages import validate_template
from core.bonuses.results import (
    MAX_STORED_AMOUNT,
    BonusStatus,
    Decision,
    amount_places,
    amount_text,
    decide,
)
from core.errors import InvalidArgument
from core.formula import Evaluation, Outcome, ResultOptions
from core.rounding import RoundingMode

NO_ROUNDING = ResultOptions()
CENTS = ResultOptions(rounding=RoundingMode.ROUND, decimals=2)


def decided(amount: str, options: ResultOptions = NO_ROUNDING) -> Decision:
    return decide(Evaluation(Outcome.AMOUNT, amount=Decimal(amount)), ApprovalMode.AUTOMATIC,
                  options)


def test_the_largest_storable_amount_is_issued() -> None:
    assert decided(str(MAX_STORED_AMOUNT)) == Decision(
        BonusStatus.ISSUED, MAX_STORED_AMOUNT, None, None, None)
    assert decided("99999999999999.99", CENTS).amount == Decimal("99999999999999.99")


@pytest.mark.parametrize(("amount", "options", "detail"), [
    ("100000000000000", NO_ROUNDING, "100000000000000"),
    # Rounded half up to 6 places it no longer fits.
    ("99999999999999.9999995", NO_ROUNDING, "100000000000000"),
    # Beyond the default 28-digit context: quantizing must not raise.
    ("1" + "0" * 30 + ".5", NO_ROUNDING, "1.000000E+30"),
    ("1E+40", CENTS, "1.000000E+40"),
])
def test_an_amount_results_cannot_hold_is_skipped(amount: str, options: ResultOptions,
                                                 detail: str) -> None:
    assert decided(amount, options) == Decision(
        BonusStatus.SKIPPED, None, None, "AMOUNT_TOO_LARGE",
        f"{detail} is more than 99999999999999.999999, the largest amount a result can hold")


@pytest.mark.parametrize(("options", "places"), [
    (NO_ROUNDING, None),
    (CENTS, 2),
    (ResultOptions(rounding=RoundingMode.ROUND_DOWN, decimals=0), 0),
    (ResultOptions(rounding=RoundingMode.MROUND, decimals=0, factor=Decimal("0.25")), 2),
    (ResultOptions(rounding=RoundingMode.MROUND, decimals=3, factor=Decimal("0.5")), 3),
])
def test_events_write_rounded_amounts_with_the_definitions_places(
        options: ResultOptions, places: int | None) -> None:
    assert amount_places(options) == places


@pytest.mark.parametrize(("amount", "places", "text"), [
    ("2.5", 2, "2.50"),
    ("2.500000", 2, "2.50"),
    ("25", 2, "25.00"),
    ("25.000000", None, "25"),
    ("2.5", 0, "2.5"),  # never rounded: more places than asked are kept
    ("12.345", 2, "12.345"),
    ("99999999999999.5", 6, "99999999999999.500000"),
])
def test_amount_text_only_adds_zeros(amount: str, places: int | None, text: str) -> None:
    assert amount_text(Decimal(amount), places) == text


@pytest.mark.parametrize(("template", "found", "position"), [
    ("Hi {{event.bonus_amount} EUR", "{{", 4),
    ("Hi {event.bonus_amount}} EUR", "{event.", 4),
    ("Hi {{event.bonus_amount EUR", "{{", 4),
    ("{{event.status}} and }}", "}}", 22),
    ("{{event.status}} { event.reason}", "{ event.", 18),
])
def test_a_broken_placeholder_is_refused_with_its_position(template: str, found: str,
                                                          position: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_template(template, field="issued_message")
    assert caught.value.reason == "INVALID_MESSAGE_TEMPLATE"
    assert caught.value.metadata == {"field": "issued_message"}
    assert caught.value.message == (
        f"issued_message: broken placeholder {found!r} at character {position}; write a "
        "placeholder as {{event.NAME}}")


@pytest.mark.parametrize("template", [
    "{{event.bonus_amount}} {x} } {",
    "{{{event.bonus_amount}}}",
    "{{ event.status }}{{event.reason}}",
    "no placeholder at all",
])
def test_complete_placeholders_and_single_braces_are_accepted(template: str) -> None:
    assert validate_template(template, field="m") == template
