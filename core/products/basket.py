"""Basket evaluation: what the product-set discounts take off a customer's basket, and why.

Rules (documented in docs/products.md):
- Discounts are evaluated in discount_id order. Each basket unit serves at most one discount:
  the units a discount uses (to qualify or to be discounted) are not available to later ones.
- Within a discount, the sets that do not get the discount are matched first; they take units of
  products outside the discounted sets where they can, then in line order, so that a qualifying
  purchase does not use up the product that was to be discounted. When taking units that way
  leaves a set short although the basket could serve every set's required units at once
  (sets sharing products), the unmarked sets take an exact assignment instead
  (core/products/matching.py) and the discounted sets proceed as before.
- A discounted set needs ``required_quantity`` of its remaining units and then discounts up to
  ``discounted_quantity`` of them, the cheapest first (ties: the earlier line).
- A personalized set's products are the customer's selection in its promotion (their choice, or
  the default product); a customer without a list in that promotion gets no discount from it.
- Amounts are exact cents: percentage discounts are rounded half up on the discount's total and
  spread over the lines by largest remainder; amount-off and fixed-price discounts are exact per
  unit and never exceed the price.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from core.errors import InvalidArgument
from core.money import format_decimal, parse_decimal, plain
from core.products.allocation import CENT, spread_percentage
from core.products.discounts import DiscountType, ProductSet, ProductSetDiscount, has_cents_only
from core.products.matching import assign_units
from core.products.promotions import validate_product_id

MAX_LINES = 1000
MAX_LINE_QUANTITY = 1_000_000


@dataclass(frozen=True)
class RawLine:
    """A basket line as it arrives: the price still a decimal string."""

    product_id: str
    quantity: int
    unit_price: str


@dataclass(frozen=True)
class BasketLine:
    product_id: str
    quantity: int
    unit_price: Decimal

    @property
    def total(self) -> Decimal:
        return self.unit_price * self.quantity


@dataclass(frozen=True)
class DiscountLine:
    discount_id: str
    line_index: int
    product_id: str
    quantity: int
    amount: Decimal


@dataclass(frozen=True)
class DiscountOutcome:
    discount_id: str
    applied: bool
    amount: Decimal
    explanation: str
    personalized_promotion_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    discount_lines: tuple[DiscountLine, ...]
    outcomes: tuple[DiscountOutcome, ...]
    basket_total: Decimal
    discount_total: Decimal

    @property
    def total_after_discounts(self) -> Decimal:
        return self.basket_total - self.discount_total

    @property
    def applied_promotion_ids(self) -> tuple[str, ...]:
        """Personalized promotions linked to a discount that applied (their first apply)."""
        return tuple(sorted({pid for o in self.outcomes if o.applied
                             for pid in o.personalized_promotion_ids}))


def validate_lines(lines: Sequence[RawLine]) -> tuple[BasketLine, ...]:
    """Every line checked, errors naming the field (``lines[2].quantity``)."""
    if not 1 <= len(lines) <= MAX_LINES:
        raise InvalidArgument(f"lines must hold 1-{MAX_LINES} basket lines, got {len(lines)}",
                              reason="INVALID_BASKET", metadata={"field": "lines"})
    result = []
    for index, line in enumerate(lines):
        prefix = f"lines[{index}]"
        validate_product_id(line.product_id, field=f"{prefix}.product_id")
        if not 1 <= line.quantity <= MAX_LINE_QUANTITY:
            raise InvalidArgument(
                f"{prefix}.quantity must be 1-{MAX_LINE_QUANTITY}, got {line.quantity}",
                reason="INVALID_QUANTITY", metadata={"field": f"{prefix}.quantity"})
        price = parse_decimal(line.unit_price, field=f"{prefix}.unit_price")
        assert price is not None
        if not has_cents_only(price):
            raise InvalidArgument(
                f"{prefix}.unit_price must have at most 2 decimal places, got {line.unit_price!r}",
                reason="INVALID_DECIMAL", metadata={"field": f"{prefix}.unit_price"})
        result.append(BasketLine(product_id=line.product_id, quantity=line.quantity,
                                 unit_price=price))
    return tuple(result)


def money(value: Decimal) -> str:
    """The wire form of an amount: always two decimal places."""
    return format_decimal(value.quantize(CENT))


def _products(count: int) -> str:
    return f"{count} product" if count == 1 else f"{count} products"


def _describe(discount: ProductSetDiscount) -> str:
    if discount.discount_type is DiscountType.PERCENTAGE_OFF:
        return f"{format_decimal(plain(discount.value))}% off"
    if discount.discount_type is DiscountType.AMOUNT_OFF:
        return f"{money(discount.value)} off each of"
    return f"a fixed price of {money(discount.value)} for"


def _set_label(product_set: ProductSet, products: tuple[str, ...]) -> str:
    if product_set.personalized_promotion_id is None:
        return f"set {product_set.name!r}"
    return (f"set {product_set.name!r} (selected in personalized promotion "
            f"{product_set.personalized_promotion_id!r}: {', '.join(products)})")


def _take(candidates: Sequence[int], count: int, left: list[int]) -> dict[int, int]:
    """Take ``count`` units from the candidate lines in order; returns units per line."""
    taken: dict[int, int] = {}
    for index in candidates:
        if count == 0:
            break
        units = min(left[index], count)
        if units:
            left[index] -= units
            taken[index] = units
            count -= units
    return taken


class _NotApplied(Exception):
    pass


def _amounts(discount: ProductSetDiscount, lines: Sequence[BasketLine],
             granted: Mapping[int, int]) -> dict[int, Decimal]:
    indexes = sorted(granted)
    if discount.discount_type is DiscountType.PERCENTAGE_OFF:
        bases = [lines[i].unit_price * granted[i] for i in indexes]
        return dict(zip(indexes, spread_percentage(bases, discount.value), strict=True))
    if discount.discount_type is DiscountType.AMOUNT_OFF:
        return {i: min(discount.value, lines[i].unit_price) * granted[i] for i in indexes}
    return {i: max(lines[i].unit_price - discount.value, Decimal(0)) * granted[i]
            for i in indexes}


Resolved = list[tuple[ProductSet, tuple[str, ...]]]  # each set with its products for the customer


class _Short(_NotApplied):
    """A set found fewer units than it requires (perhaps because an earlier set took them)."""


def _resolve(discount: ProductSetDiscount,
             selections: Mapping[str, Sequence[str]]) -> Resolved:
    """Each set with its products: a personalized set's are the customer's selection."""
    resolved: Resolved = []
    for product_set in discount.product_sets:
        promotion_id = product_set.personalized_promotion_id
        if promotion_id is None:
            resolved.append((product_set, product_set.product_ids))
            continue
        selected = selections.get(promotion_id)
        if selected is None:
            raise _NotApplied(f"the customer has no product list in personalized promotion "
                              f"{promotion_id!r}")
        resolved.append((product_set, tuple(selected)))
    return resolved


def _unmarked_plan(resolved: Resolved, lines: Sequence[BasketLine],
                   left: Sequence[int]) -> list[dict[int, int]] | None:
    """Units per line for each unmarked set (in order) such that every set, marked ones too,
    has its required units; None when the basket cannot serve all sets at once."""
    discounted_products = {p for s, products in resolved if s.gets_discount for p in products}
    ordered = ([(s, p) for s, p in resolved if not s.gets_discount]
               + [(s, p) for s, p in resolved if s.gets_discount])
    candidates = []
    for product_set, products in ordered:
        found = [i for i, line in enumerate(lines) if line.product_id in products and left[i]]
        if not product_set.gets_discount:  # the preference of taking units in order
            found.sort(key=lambda i: (lines[i].product_id in discounted_products, i))
        candidates.append(found)
    plan = assign_units([s.required_quantity for s, _ in ordered], candidates, left)
    unmarked = sum(1 for s, _ in resolved if not s.gets_discount)
    return None if plan is None else plan[:unmarked]


def _match(discount: ProductSetDiscount, resolved: Resolved, lines: Sequence[BasketLine],
           left: list[int], plan: Sequence[dict[int, int]] | None
           ) -> tuple[dict[int, int], list[str]]:
    """Units granted the discount per line, and the notes; consumes units from ``left``.

    The unmarked sets take their units from ``plan`` when given, else in order (see the
    module notes); the marked sets then take theirs from what is left."""
    discounted_products = {p for s, products in resolved if s.gets_discount for p in products}
    notes: list[str] = []

    def candidates(products: tuple[str, ...]) -> list[int]:
        return [i for i, line in enumerate(lines) if line.product_id in products and left[i]]

    def require(product_set: ProductSet, products: tuple[str, ...], found: list[int]) -> None:
        available = sum(left[i] for i in found)
        if available < product_set.required_quantity:
            raise _Short(f"{_set_label(product_set, products)} needs "
                         f"{_products(product_set.required_quantity)} in the basket, "
                         f"found {available}")

    unmarked = [(s, p) for s, p in resolved if not s.gets_discount]
    for number, (product_set, products) in enumerate(unmarked):
        if plan is not None:
            for index, units in plan[number].items():
                left[index] -= units
        else:
            found = candidates(products)
            require(product_set, products, found)
            found.sort(key=lambda i: (lines[i].product_id in discounted_products, i))
            _take(found, product_set.required_quantity, left)
        notes.append(f"{_set_label(product_set, products)} has the "
                     f"{_products(product_set.required_quantity)} required")

    granted: dict[int, int] = {}
    for product_set, products in resolved:
        if not product_set.gets_discount:
            continue
        found = candidates(products)
        require(product_set, products, found)
        count = min(product_set.discounted_quantity, sum(left[i] for i in found))
        cheapest = sorted(found, key=lambda i: (lines[i].unit_price, i))
        for index, units in _take(cheapest, count, left).items():
            granted[index] = granted.get(index, 0) + units
        _take(found, max(product_set.required_quantity - count, 0), left)
        notes.append(f"{_describe(discount)} {_products(count)} of "
                     f"{_set_label(product_set, products)}")
    return granted, notes


def _evaluate_one(discount: ProductSetDiscount, selections: Mapping[str, Sequence[str]],
                  lines: Sequence[BasketLine], left: list[int],
                  basket_total: Decimal) -> tuple[list[DiscountLine], str]:
    """The discount's lines and explanation; consumes units from ``left``; raises _NotApplied."""
    minimum = discount.min_basket_total
    if minimum is not None and basket_total < minimum:
        raise _NotApplied(f"the basket total {money(basket_total)} is below the minimum "
                          f"{money(minimum)}")
    resolved = _resolve(discount, selections)
    before = list(left)
    try:
        granted, notes = _match(discount, resolved, lines, left, None)
    except _Short:
        plan = _unmarked_plan(resolved, lines, before)
        if plan is None:
            raise  # no assignment serves every set: the shortage found in order stands
        left[:] = before
        granted, notes = _match(discount, resolved, lines, left, plan)

    amounts = _amounts(discount, lines, granted)
    discount_lines = [
        DiscountLine(discount_id=discount.discount_id, line_index=i,
                     product_id=lines[i].product_id, quantity=granted[i], amount=amounts[i])
        for i in sorted(granted) if amounts[i] > 0]
    if not discount_lines:
        if discount.discount_type is DiscountType.PERCENTAGE_OFF:
            raise _NotApplied(f"{_describe(discount)} the discounted products rounds to less "
                              f"than a cent")
        raise _NotApplied("the discounted products already cost no more than the discounted "
                          "price")
    return discount_lines, "; ".join(notes)


def evaluate(discounts: Sequence[ProductSetDiscount], selections: Mapping[str, Sequence[str]],
             lines: Sequence[BasketLine]) -> Evaluation:
    """Apply ``discounts`` to ``lines`` for a customer whose selections per personalized
    promotion are ``selections`` (promotions they have no list in are absent)."""
    basket_total = sum((line.total for line in lines), Decimal(0)).quantize(CENT)
    left = [line.quantity for line in lines]
    all_lines: list[DiscountLine] = []
    outcomes: list[DiscountOutcome] = []
    for discount in sorted(discounts, key=lambda d: d.discount_id):
        trial = list(left)
        linked = tuple(dict.fromkeys(discount.personalized_promotion_ids))
        try:
            discount_lines, why = _evaluate_one(discount, selections, lines, trial, basket_total)
        except _NotApplied as not_applied:
            outcomes.append(DiscountOutcome(
                discount_id=discount.discount_id, applied=False, amount=Decimal(0),
                explanation=f"not applied: {not_applied}", personalized_promotion_ids=linked))
            continue
        left = trial
        amount = sum((line.amount for line in discount_lines), Decimal(0))
        all_lines.extend(discount_lines)
        outcomes.append(DiscountOutcome(
            discount_id=discount.discount_id, applied=True, amount=amount,
            explanation=f"applied: {why}", personalized_promotion_ids=linked))
    discount_total = sum((line.amount for line in all_lines), Decimal(0)).quantize(CENT)
    return Evaluation(discount_lines=tuple(all_lines), outcomes=tuple(outcomes),
                      basket_total=basket_total, discount_total=discount_total)
