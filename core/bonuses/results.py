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
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from core.bonuses.definitions import ApprovalMode
from core.bonuses.messages import render_template
from core.errors import FailedPrecondition
from core.formula import Evaluation, Outcome, ResultOptions
from core.money import plain
from core.rounding import RoundingMode


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


@dataclass(frozen=True)
class Decision:
    """What one evaluation gives, ready to store: a status and an amount or template, or a skip
    reason. Unrounded amounts keep the 6 decimal places amounts are stored with."""

    status: BonusStatus
    amount: Decimal | None
    template: str | None
    skip_reason: str | None
    skip_detail: str | None


def decide(evaluation: Evaluation, approval: ApprovalMode, options: ResultOptions) -> Decision:
    status = status_after_evaluation(evaluation, approval)
    if status is BonusStatus.SKIPPED:
        reason = evaluation.skip_reason.value if evaluation.skip_reason else "NO_RESULT"
        return Decision(status, None, None, reason, evaluation.skip_detail)
    if evaluation.outcome is Outcome.TEMPLATE:
        return Decision(status, None, evaluation.template, None, None)
    amount = evaluation.amount
    assert amount is not None
    if options.rounding is RoundingMode.NONE:
        amount = plain(amount.quantize(MONEY_STEP, rounding=ROUND_HALF_UP))
        if amount <= 0:
            return Decision(BonusStatus.SKIPPED, None, None, "ZERO_OR_NEGATIVE",
                            f"{evaluation.amount} is 0 at 6 decimal places")
    return Decision(status, plain(amount), None, None, None)


def event_payload(*, bonus_id: str, definition_id: str, customer_id: str, status: BonusStatus,
                  result_type: str, amount: Decimal | None, template: str | None,
                  currency: str | None, skip_reason: str | None, skip_detail: str | None,
                  period_start: datetime | None, period_end: datetime | None,
                  requires_approval: bool, issued_at: datetime | None,
                  message_template: str) -> dict[str, Any]:
    """The data of a Skipped / Calculated / Issued event (core.events.PAYLOAD_FIELDS plus
    ``bonus_amount``, ``bonus_template`` and the rendered ``message``)."""
    amount_text = None if amount is None else format(plain(amount), "f")
    data: dict[str, Any] = {"bonus_id": bonus_id, "formula_id": definition_id,
                            "customer_id": customer_id, "result_type": result_type,
                            "status": status.value}
    if status is BonusStatus.SKIPPED:
        data.update(reason=skip_reason, detail=skip_detail)
    else:
        data.update(amount=amount_text, bonus_amount=amount_text, template=template,
                    bonus_template=template, currency=currency)
        if status is BonusStatus.CALCULATED or issued_at is None:
            data.update(period_start=period_start, period_end=period_end,
                        requires_approval=requires_approval)
        else:
            data.update(issued_at=issued_at)
    values = {**data, "bonus_amount": amount_text, "bonus_template": template}
    data["message"] = render_template(message_template, values) if message_template else ""
    return data
