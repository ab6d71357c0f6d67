"""core.bonuses: batching windows, message templates, definition checks, the status machine and
how an evaluation becomes a stored decision (rounding per seed 000, caps and minimums)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    PointsTarget,
    ResultType,
    apply_update,
    validate_definition,
)
from core.bonuses.messages import render_template, validate_template
from core.bonuses.results import BonusStatus, check_decision, decide, event_payload
from core.bonuses.windows import window_end, window_start
from core.errors import FailedPrecondition, InvalidArgument
from core.formula import AggregateValue, FormulaInputs, ResultOptions, compile_formula
from core.periods import RelativeKind, RelativePeriod, TimeBackPeriod
from core.rounding import RoundingMode

UTC_NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def base(**kw: object) -> BonusDefinition:
    fields: dict[str, object] = dict(
        definition_id="d1", display_name="D1", formula="sum(deposit.amount) * 10%",
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=ApprovalMode.MANUAL, batch_window_seconds=None)
    fields.update(kw)
    return BonusDefinition(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("now", "seconds", "start"), [
    (UTC_NOON + timedelta(minutes=4, seconds=59), 300, UTC_NOON),
    (UTC_NOON + timedelta(minutes=5), 300, UTC_NOON + timedelta(minutes=5)),
    (UTC_NOON + timedelta(seconds=59, microseconds=999999), 60, UTC_NOON),
    (UTC_NOON + timedelta(hours=5), 86400, datetime(2026, 11, 22, tzinfo=UTC)),
    (datetime(2026, 11, 22, 13, 2, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo(
        "Europe/Berlin")), 300, UTC_NOON + timedelta(hours=1)),
])
def test_window_start_is_a_floor_of_epoch_time(now: datetime, seconds: int,
                                               start: datetime) -> None:
    assert window_start(now, seconds) == start
    assert window_end(start, seconds) == start + timedelta(seconds=seconds)


def test_window_needs_aware_time_and_a_sane_length() -> None:
    with pytest.raises(ValueError):
        window_start(datetime(2026, 1, 1), 300)
    with pytest.raises(InvalidArgument) as caught:
        window_start(UTC_NOON, 0)
    assert caught.value.reason == "INVALID_BATCH_WINDOW"


def test_message_templates_render_placeholders_without_evaluating_anything() -> None:
    text = "Your bonus of {{event.bonus_amount}} {{ event.currency }}! {{event.bonus_template}}"
    assert validate_template(text, field="m") == text
    assert render_template(text, {"bonus_amount": "12.5", "currency": "EUR"}) == \
        "Your bonus of 12.5 EUR! "
    assert render_template("{{event.bonus_amount}}", {"bonus_amount": "{{event.currency}}",
                                                      "currency": "X"}) == "{{event.currency}}"
    for bad in ("{{event.__class__}}", "{{ bonus_amount }}", "{{event.amount}}",
                "{{event.bonus_amount + 1}}"):
        with pytest.raises(InvalidArgument) as caught:
            validate_template(f"a {bad}", field="issued_message")
        assert caught.value.reason == "INVALID_MESSAGE_TEMPLATE"
        assert caught.value.metadata["field"] == "issued_message"
        assert "at character 3" in caught.value.message


def test_a_valid_definition_compiles() -> None:
    d, compiled = validate_definition(base())
    assert [a.describe() for a in compiled.aggregates] == ["sum(deposit.amount)"]
    assert d.options == ResultOptions()


@pytest.mark.parametrize(("changes", "reason", "field"), [
    ({"formula": "sum(deposit.amount"}, "FORMULA_SYNTAX", "formula"),
    ({"formula": "  "}, "MISSING_FIELD", "formula"),
    ({"result_type": ResultType.BONUS_TEMPLATE}, "FORMULA_INVALID", "formula"),
    ({"formula": 'template("Spins")'}, "FORMULA_INVALID", "formula"),
    ({"result_type": ResultType.POINTS}, "MISSING_FIELD", "points_target"),
    ({"points_target": PointsTarget.BALANCE}, "INVALID_BONUS_DEFINITION", "points_target"),
    ({"period": None}, "INVALID_PERIOD", "period"),
    ({"data_mode": DataMode.PROPERTIES_ONLY}, "INVALID_BONUS_DEFINITION", "period"),
    ({"data_mode": DataMode.PROPERTIES_ONLY, "period": None}, "FORMULA_INVALID", "formula"),
    ({"cap_amount": Decimal(0)}, "INVALID_RESULT_OPTIONS", "cap_amount"),
    ({"rounding": RoundingMode.MROUND}, "INVALID_ROUNDING", "rounding_factor"),
    ({"batch_window_seconds": 100_000}, "INVALID_BATCH_WINDOW", "batch_window_seconds"),
    ({"definition_id": "-x"}, "INVALID_ID", "definition_id"),
])
def test_bad_definitions(changes: dict[str, object], reason: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(base(**changes))
    assert caught.value.reason == reason
    assert caught.value.metadata.get("field") == field


def test_syntax_errors_keep_line_and_column() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(base(formula="x = 1\ny = (2"))
    assert caught.value.metadata["line"] == "2"
    assert caught.value.message.startswith("formula: ")


def test_template_and_properties_only_definitions() -> None:
    validate_definition(base(result_type=ResultType.BONUS_TEMPLATE,
                             formula='if sum(deposit.amount) > 100 then template("10 Spins")'))
    validate_definition(base(result_type=ResultType.POINTS, points_target=PointsTarget.BALANCE,
                             data_mode=DataMode.PROPERTIES_ONLY, period=None,
                             formula='customer["Logins count ever"] * 2'))
    validate_definition(base(period=RelativePeriod(RelativeKind.LAST_WEEKEND)))


def test_updates_bump_the_revision_only_for_calculation_changes() -> None:
    current = base()
    same = apply_update(current, replace(current, approval_mode=ApprovalMode.AUTOMATIC),
                        ["approval_mode"])
    assert same.revision == 1 and same.approval_mode is ApprovalMode.AUTOMATIC
    changed = apply_update(current, replace(current, formula="sum(deposit.amount) * 20%"),
                           ["formula"])
    assert changed.revision == 2
    unchanged = apply_update(current, current, ["formula"])
    assert unchanged.revision == 1
    for paths in ([], ["definition_id"], ["revision"]):
        with pytest.raises(InvalidArgument) as caught:
            apply_update(current, current, paths)
        assert caught.value.reason == ("EMPTY_UPDATE_MASK" if not paths
                                       else "INVALID_UPDATE_MASK")


def _evaluate(formula: str, deposits: str, options: ResultOptions) -> object:
    compiled = compile_formula(formula)
    inputs = FormulaInputs(aggregates={"a0": AggregateValue(Decimal(deposits), 1)})
    return compiled.evaluate(inputs, options)


@pytest.mark.parametrize(("rounding", "decimals", "amount"), [
    # Seed 000's examples: 2.735 down 2.73, up 2.74, nearest 2.74; with 0 decimals 2 / 3 / 3.
    (RoundingMode.ROUND_DOWN, 2, "2.73"), (RoundingMode.ROUND_UP, 2, "2.74"),
    (RoundingMode.ROUND, 2, "2.74"), (RoundingMode.ROUND_DOWN, 0, "2"),
    (RoundingMode.ROUND_UP, 0, "3"), (RoundingMode.ROUND, 0, "3"),
    (RoundingMode.NONE, 2, "2.735"),
])
def test_decide_rounds_as_seed_000_says(rounding: RoundingMode, decimals: int,
                                        amount: str) -> None:
    options = ResultOptions(rounding=rounding, decimals=decimals)
    evaluation = _evaluate("sum(deposit.amount) * 1%", "273.5", options)
    decision = decide(evaluation, ApprovalMode.AUTOMATIC, options)  # type: ignore[arg-type]
    assert decision.status is BonusStatus.ISSUED
    assert decision.amount == Decimal(amount) and str(decision.amount) == amount


def test_decide_caps_skips_and_waits_for_approval() -> None:
    capped = ResultOptions(cap_amount=Decimal(200))
    evaluation = _evaluate("sum(deposit.amount)", "1000", capped)
    decision = decide(evaluation, ApprovalMode.MANUAL, capped)  # type: ignore[arg-type]
    assert (decision.status, decision.amount) == (BonusStatus.CALCULATED, Decimal(200))
    minimum = ResultOptions(min_allowed=Decimal(5))
    evaluation = _evaluate("sum(deposit.amount) * 1%", "100", minimum)
    decision = decide(evaluation, ApprovalMode.AUTOMATIC, minimum)  # type: ignore[arg-type]
    assert (decision.status, decision.skip_reason) == (BonusStatus.SKIPPED, "BELOW_MINIMUM")
    tiny = _evaluate("sum(deposit.amount) * 0.0000001", "1", ResultOptions())
    decision = decide(tiny, ApprovalMode.AUTOMATIC, ResultOptions())  # type: ignore[arg-type]
    assert (decision.status, decision.skip_reason) == (BonusStatus.SKIPPED, "ZERO_OR_NEGATIVE")
    template = compile_formula('template("10 Spins")').evaluate(FormulaInputs())
    decision = decide(template, ApprovalMode.AUTOMATIC, ResultOptions())
    assert (decision.status, decision.template) == (BonusStatus.ISSUED, "10 Spins")


def test_only_calculated_results_can_be_decided() -> None:
    check_decision("b1", BonusStatus.CALCULATED, BonusStatus.ISSUED)
    check_decision("b1", BonusStatus.CALCULATED, BonusStatus.REJECTED)
    for current in (BonusStatus.SKIPPED, BonusStatus.ISSUED, BonusStatus.REJECTED):
        with pytest.raises(FailedPrecondition) as caught:
            check_decision("b1", current, BonusStatus.ISSUED)
        assert caught.value.reason == "BONUS_NOT_AWAITING_APPROVAL"
        assert caught.value.message == (f"bonus b1 is {current.value}; only CALCULATED results "
                                        "can be approved")


def test_event_payloads_carry_the_amount_and_the_rendered_message() -> None:
    issued = event_payload(
        bonus_id="b1", definition_id="d1", customer_id="c1", status=BonusStatus.ISSUED,
        result_type="AMOUNT", amount=Decimal("12.500000"), template=None, currency="EUR",
        skip_reason=None, skip_detail=None, period_start=None, period_end=None,
        requires_approval=False, issued_at=UTC_NOON,
        message_template="Your bonus of {{event.bonus_amount}} {{event.currency}}")
    assert issued == {"bonus_id": "b1", "formula_id": "d1", "customer_id": "c1",
                      "result_type": "AMOUNT", "status": "ISSUED", "amount": "12.5",
                      "bonus_amount": "12.5", "template": None, "bonus_template": None,
                      "currency": "EUR", "issued_at": UTC_NOON,
                      "message": "Your bonus of 12.5 EUR"}
    skipped = event_payload(
        bonus_id="b2", definition_id="d1", customer_id="c1", status=BonusStatus.SKIPPED,
        result_type="AMOUNT", amount=None, template=None, currency=None,
        skip_reason="BELOW_MINIMUM", skip_detail="0.5 is below 1", period_start=None,
        period_end=None, requires_approval=False, issued_at=None, message_template="")
    assert skipped["reason"] == "BELOW_MINIMUM" and skipped["message"] == ""
    assert "amount" not in skipped
