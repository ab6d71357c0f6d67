"""TIERED and CALCULATED promotion rewards, expressed in the formula language.

A CALCULATED reward is a formula. A TIERED reward is a chain of (condition, value) tiers, the
first whose condition holds paying its value; it compiles to one formula
``if (c1) then (v1) elif (c2) then (v2) ... else skip``. Each tier's condition and value are
also compiled on their own first, so an error names the tier and the line and column within
that tier's own text. The reward's rounding applies to the computed value; the reward type's
bounds are applied afterwards by core.rewards (below the minimum denies, above the maximum
is cut).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from core.catalogue.promotions import Promotion, PromotionReward, RewardKind
from core.errors import InvalidArgument
from core.formula import (
    AggregateValue,
    CompiledFormula,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
    compile_formula,
)
from core.money import plain, shown_number
from core.rewards import Denial
from core.rounding import RoundingMode, parse_rounding_mode

_POSITION = re.compile(r"^line (\d+), column (\d+): ")
MONEY_STEP = Decimal("0.000001")


@dataclass(frozen=True)
class RewardFormula:
    reward_type: str
    compiled: CompiledFormula
    options: ResultOptions
    lookback: timedelta


def _compile_part(source: str, field: str, *, wrap_condition: bool = False) -> CompiledFormula:
    """Compile one piece; errors are re-raised naming ``field`` with positions in its own text.

    A condition is checked as ``if COND`` + newline + ``then 1 else skip``: only line 1 shifts
    (by the 3 characters of ``if ``), and an error past the condition's end is reported there.
    """
    text = f"if {source}\nthen 1 else skip" if wrap_condition else source
    try:
        compiled = compile_formula(text)
    except InvalidArgument as exc:
        line = int(exc.metadata.get("line", "1"))
        column = int(exc.metadata.get("column", "1"))
        lines = source.split("\n")
        if wrap_condition and line > len(lines):
            line, column = len(lines), len(lines[-1]) + 1
        elif wrap_condition and line == 1:
            column = max(1, column - 3)
        detail = _POSITION.sub("", exc.message)
        raise InvalidArgument(f"{field}: line {line}, column {column}: {detail}",
                              reason=exc.reason,
                              metadata={"field": field, "line": line, "column": column}) from exc
    if not wrap_condition and compiled.returns_template:
        raise InvalidArgument(f"{field}: a promotion reward must compute an amount, not a "
                              "bonus template", reason="FORMULA_INVALID",
                              metadata={"field": field})
    return compiled


def compile_reward(index: int, reward: PromotionReward) -> RewardFormula | None:
    """The formula of a TIERED or CALCULATED reward (None for SINGLE and EXTERNAL)."""
    where = f"rewards[{index}]"
    if reward.kind is RewardKind.CALCULATED:
        compiled = _compile_part(reward.formula, f"{where}.formula")
    elif reward.kind is RewardKind.TIERED:
        branches = []
        for t_index, tier in enumerate(reward.tiers):
            _compile_part(tier.condition, f"{where}.tiers[{t_index}].condition",
                          wrap_condition=True)
            _compile_part(tier.value, f"{where}.tiers[{t_index}].value")
            keyword = "if" if t_index == 0 else "elif"
            branches.append(f"{keyword} (\n{tier.condition}\n) then (\n{tier.value}\n)")
        compiled = _compile_part("\n".join(branches) + "\nelse skip", f"{where}.tiers")
    else:
        return None
    return RewardFormula(reward.reward_type, compiled, _options(index, reward),
                         timedelta(days=reward.lookback_days))


def _options(index: int, reward: PromotionReward) -> ResultOptions:
    try:
        return ResultOptions(rounding=parse_rounding_mode(reward.rounding),
                             decimals=reward.decimals, factor=reward.rounding_factor)
    except InvalidArgument as exc:
        raise InvalidArgument(f"rewards[{index}]: {exc.message}", reason=exc.reason,
                              metadata={"field": f"rewards[{index}].rounding"}) from exc


def compile_rewards(promotion: Promotion) -> dict[str, RewardFormula]:
    """Every formula of a promotion by reward type; raises InvalidArgument on the first error."""
    found: dict[str, RewardFormula] = {}
    for index, reward in enumerate(promotion.rewards):
        formula = compile_reward(index, reward)
        if formula is not None:
            found[reward.reward_type] = formula
    return found


def stored_forms(formulas: Mapping[str, RewardFormula]) -> dict[str, dict[str, Any]]:
    """The validated, versioned form of each compiled formula, to keep beside the source."""
    return {reward_type: f.compiled.to_stored() for reward_type, f in formulas.items()}


def load_rewards(promotion: Promotion,
                 stored: Mapping[str, Mapping[str, Any]]) -> dict[str, RewardFormula]:
    """Every formula of a saved promotion, from its stored form where there is one (no
    parsing; an older language version is recompiled from source by from_stored), compiled
    from source otherwise."""
    found: dict[str, RewardFormula] = {}
    for index, reward in enumerate(promotion.rewards):
        form = stored.get(reward.reward_type)
        if form is None or reward.kind not in (RewardKind.CALCULATED, RewardKind.TIERED):
            formula = compile_reward(index, reward)
            if formula is not None:
                found[reward.reward_type] = formula
            continue
        found[reward.reward_type] = RewardFormula(
            reward.reward_type, CompiledFormula.from_stored(form), _options(index, reward),
            timedelta(days=reward.lookback_days))
    return found


def evaluate_reward(formula: RewardFormula, *, aggregates: Mapping[str, AggregateValue],
                    properties: Mapping[str, str | Decimal | bool | None],
                    currency: str | None) -> Decimal | Denial:
    """The rounded value, or a NOT_ELIGIBLE denial saying why the formula skipped."""
    evaluation = formula.compiled.evaluate(
        FormulaInputs(aggregates=aggregates, properties=properties, currency=currency),
        formula.options)
    if evaluation.outcome is Outcome.AMOUNT and evaluation.amount is not None:
        if formula.options.rounding is RoundingMode.NONE:
            # Unrounded values keep at most the 6 places that budgets count in, written
            # without trailing zeros (10, not 10.00000000).
            amount = evaluation.amount
            wide = Context(prec=max(28, amount.adjusted() + 8))  # 10^22 and up need more
            kept = plain(amount.quantize(MONEY_STEP, rounding=ROUND_HALF_UP, context=wide))
            if kept <= 0:
                # As a bonus result: no reward of 0 (it was granted, and took the customer's
                # cap for nothing).
                shown = shown_number(amount)
                return Denial("NOT_ELIGIBLE", f"{formula.reward_type}: no reward, "
                                              f"ZERO_OR_NEGATIVE (the calculated value {shown} "
                                              "is 0 at 6 decimal places)")
            return kept
        return evaluation.amount
    if evaluation.skip_reason is SkipReason.AMOUNT_TOO_LARGE and evaluation.raw_value is not None:
        # Far beyond any amount, so not rounded (core.formula.evaluator): the reward's max_value
        # cuts it, or it is denied (core.rewards.apply_bounds), as any value past the largest.
        return evaluation.raw_value
    reason = evaluation.skip_reason.name if evaluation.skip_reason else "NO_RESULT"
    detail = f" ({evaluation.skip_detail})" if evaluation.skip_detail else ""
    return Denial("NOT_ELIGIBLE", f"{formula.reward_type}: no reward, {reason}{detail}")
