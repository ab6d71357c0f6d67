"""The life of one bonus result: how an evaluation becomes a status, and which moves are legal.

::

    evaluation --skip--> SKIPPED                      (terminal, may be recalculated)
               --value-> CALCULATED --approve--> ISSUED     (terminal)
                          (manual)   --reject--> REJECTED   (terminal)
               --value-> ISSUED                      (automatic approval)

Recalculation (after a formula edit) touches only results not yet decided: SKIPPED and
CALCULATED. Switching a definition from manual to automatic approval issues only results
calculated afterwards; earlier CALCULATED ones wait for an operator (the vendor's FAQ).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from core.bonuses.definitions import ApprovalMode
from core.bonuses.messages import render_template
from core.errors import FailedPrecondition
from core.formula import Evaluation, Outcome, ResultOptions, SkipReason
from core.money import LARGEST_AMOUNT, plain
from core.rounding import RoundingMode, factor_places


class BonusStatus(enum.Enum):
    SKIPPED = "SKIPPED"
    CALCULATED = "CALCULATED"
    ISSUED = "ISSUED"
    REJECTED = "REJECTED"


RECALCULABLE = frozenset({BonusStatus.SKIPPED, BonusStatus.CALCULATED})


def status_after_evaluation(evaluation: Evaluation, approval: ApprovalMode) -> BonusStatus:
    """SKIPPED without a value; otherwise ISSUED when approval is automatic, else CALCULATED."""
    if evaluation.outcome is Outcome.SKIPPED:
        return BonusStatus.SKIPPED
    return BonusStatus.ISSUED if approval is ApprovalMode.AUTOMATIC else BonusStatus.CALCULATED


def check_decision(bonus_id: str, current: BonusStatus, target: BonusStatus) -> None:
    """An operator's approve (-> ISSUED) or reject (-> REJECTED) needs a CALCULATED result."""
    if target not in (BonusStatus.ISSUED, BonusStatus.REJECTED):
        raise ValueError(f"not a decision: {target}")
    if current is not BonusStatus.CALCULATED:
        verb = "approved" if target is BonusStatus.ISSUED else "rejected"
        raise FailedPrecondition(
            f"bonus {bonus_id} is {current.value}; only CALCULATED results can be {verb}",
            reason="BONUS_NOT_AWAITING_APPROVAL",
            metadata={"bonus_id": bonus_id, "status": current.value})


MONEY_STEP = Decimal("0.000001")
# bonus_results.amount and bonus_ledger.amount are numeric(20,6): 14 integer digits at most.
# A larger amount would fail the insert of its whole chunk (and every retry of the batch), so it
# is skipped (AMOUNT_TOO_LARGE) instead.
MAX_STORED_AMOUNT = LARGEST_AMOUNT


@dataclass(frozen=True)
class Decision:
    """What one evaluation gives, ready to store: a status and an amount or template, or a skip
    reason. Unrounded amounts keep the 6 decimal places amounts are stored with."""

    status: BonusStatus
    amount: Decimal | None
    template: str | None
    skip_reason: str | None
    skip_detail: str | None


def _shown(amount: Decimal) -> str:
    """An amount for a skip detail: plain up to 28 digits, else scientific (1.000000E+40)."""
    return format(plain(amount), "f") if amount.adjusted() < 28 else f"{amount:.6E}"


def decide(evaluation: Evaluation, approval: ApprovalMode, options: ResultOptions) -> Decision:
    """The stored form of an evaluation, shared by batches and recalculation. Without rounding
    the amount is rounded half up to the 6 places it is stored with (0 there: ZERO_OR_NEGATIVE);
    a finished amount beyond MAX_STORED_AMOUNT is SKIPPED with AMOUNT_TOO_LARGE, so one
    customer's amount never fails the writing of everyone else's results."""
    status = status_after_evaluation(evaluation, approval)
    if status is BonusStatus.SKIPPED:
        reason = evaluation.skip_reason.value if evaluation.skip_reason else "NO_RESULT"
        return Decision(status, None, None, reason, evaluation.skip_detail)
    if evaluation.outcome is Outcome.TEMPLATE:
        return Decision(status, None, evaluation.template, None, None)
    amount = evaluation.amount
    assert amount is not None
    if options.rounding is RoundingMode.NONE:
        # A context as wide as the amount: the default 28 digits cannot quantize 10^22 and up.
        wide = Context(prec=max(28, amount.adjusted() + 8))
        amount = plain(amount.quantize(MONEY_STEP, rounding=ROUND_HALF_UP, context=wide))
        if amount <= 0:
            return Decision(BonusStatus.SKIPPED, None, None, "ZERO_OR_NEGATIVE",
                            f"{evaluation.amount} is 0 at 6 decimal places")
    if abs(amount) > MAX_STORED_AMOUNT:
        return Decision(BonusStatus.SKIPPED, None, None, SkipReason.AMOUNT_TOO_LARGE.value,
                        f"{_shown(amount)} is more than {MAX_STORED_AMOUNT}, the largest "
                        "amount a result can hold")
    return Decision(status, plain(amount), None, None, None)


def amount_places(options: ResultOptions) -> int | None:
    """The decimal places a rounded amount is written with in events and messages: the
    definition's ``decimals`` (MROUND: at least the factor's places, as core.rounding writes
    it); None without rounding (the amount as stored, trailing zeros dropped)."""
    if options.rounding is RoundingMode.NONE:
        return None
    if options.rounding is RoundingMode.MROUND and options.factor is not None:
        return max(options.decimals, factor_places(options.factor))
    return options.decimals


def amount_text(amount: Decimal, places: int | None) -> str:
    """``amount`` as events and messages show it: without trailing zeros, then extended with
    zeros to ``places`` (2.5 with 2 places is "2.50"). Never rounded: an amount with more places
    (calculated before the definition's decimals were lowered) keeps them."""
    value = plain(amount)
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if places is not None and -exponent < places:
        wide = Context(prec=max(28, value.adjusted() + places + 2))
        value = value.quantize(Decimal(1).scaleb(-places), context=wide)
    return format(value, "f")


def event_payload(*, bonus_id: str, definition_id: str, customer_id: str, status: BonusStatus,
                  result_type: str, amount: Decimal | None, template: str | None,
                  currency: str | None, skip_reason: str | None, skip_detail: str | None,
                  period_start: datetime | None, period_end: datetime | None,
                  requires_approval: bool, issued_at: datetime | None,
                  message_template: str, places: int | None = None) -> dict[str, Any]:
    """The data of a Skipped / Calculated / Issued event (core.events.PAYLOAD_FIELDS plus
    ``bonus_amount``, ``bonus_template`` and the rendered ``message``). ``amount`` and
    ``bonus_amount`` are written with ``places`` decimals (amount_places: the customer reads
    "2.50 EUR" from a definition rounding to 2), the API's results and ledger keep plain text."""
    shown = None if amount is None else amount_text(amount, places)
    data: dict[str, Any] = {"bonus_id": bonus_id, "formula_id": definition_id,
                            "customer_id": customer_id, "result_type": result_type,
                            "status": status.value}
    if status is BonusStatus.SKIPPED:
        data.update(reason=skip_reason, detail=skip_detail)
    else:
        data.update(amount=shown, bonus_amount=shown, template=template,
                    bonus_template=template, currency=currency)
        if status is BonusStatus.CALCULATED or issued_at is None:
            data.update(period_start=period_start, period_end=period_end,
                        requires_approval=requires_approval)
        else:
            data.update(issued_at=issued_at)
    values = {**data, "bonus_amount": shown, "bonus_template": template}
    data["message"] = render_template(message_template, values) if message_template else ""
    return data
