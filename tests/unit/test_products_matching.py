"""core.products.matching and its use by basket evaluation: sets sharing products get units
for every set whenever the basket has them, and the order of preference is kept."""

from __future__ import annotations

from decimal import Decimal

from core.products.basket import BasketLine, evaluate
from core.products.discounts import DiscountType, ProductSet, ProductSetDiscount
from core.products.matching import assign_units

D = Decimal


def test_a_later_set_moves_an_earlier_one_to_another_line() -> None:
    # Set 0 may use lines 0 and 1 (prefers 0); set 1 only line 0, which has one unit.
    assert assign_units([1, 1], [[0, 1], [0]], [1, 1]) == [{1: 1}, {0: 1}]


def test_units_move_along_a_chain_of_sets() -> None:
    # Set 2 needs line 0; set 1 holds it and moves to line 1, which set 0 gives up for line 2.
    plan = assign_units([1, 1, 1], [[1, 2], [0, 1], [0]], [1, 1, 1])
    assert plan == [{2: 1}, {1: 1}, {0: 1}]


def test_quantities_split_over_lines_in_order_of_preference() -> None:
    assert assign_units([3, 2], [[0, 1], [0]], [2, 5]) == [{1: 3}, {0: 2}]
    assert assign_units([3], [[0, 1]], [2, 5]) == [{0: 2, 1: 1}]


def test_none_when_the_lines_cannot_serve_every_set() -> None:
    assert assign_units([1, 1], [[0], [0]], [1]) is None
    assert assign_units([2], [[0, 1]], [1, 0]) is None
    assert assign_units([1], [[]], []) is None


def line(product: str, quantity: int, price: str) -> BasketLine:
    return BasketLine(product_id=product, quantity=quantity, unit_price=D(price))


def jam_deal(discount_id: str = "jam-deal") -> ProductSetDiscount:
    return ProductSetDiscount(
        discount_id=discount_id, name="Jam deal", discount_type=DiscountType.AMOUNT_OFF,
        value=D("1.00"), product_sets=(
            ProductSet(name="Spread", product_ids=("jam", "bread"), required_quantity=2),
            ProductSet(name="Jam", product_ids=("jam",), required_quantity=1),
            ProductSet(name="Coffee", product_ids=("espresso",), required_quantity=1,
                       gets_discount=True, discounted_quantity=1)))


def test_overlapping_unmarked_sets_qualify_and_leave_the_rest_to_later_discounts() -> None:
    lines = [line("jam", 2, "3.00"), line("bread", 1, "2.00"), line("espresso", 2, "2.50")]
    result = evaluate([jam_deal("a"), jam_deal("b")], {}, lines)
    first, second = result.outcomes
    # In line order 'Spread' would take both jams; assigned exactly it takes a jam and the bread.
    assert first.applied, first.explanation
    assert result.discount_total == D("1.00")
    # One jam is left, not enough for a second 'Spread' and 'Jam'.
    assert not second.applied
    assert second.explanation.startswith("not applied: set ")


def test_a_basket_that_qualifies_in_line_order_is_matched_as_before() -> None:
    lines = [line("bread", 2, "2.00"), line("jam", 1, "3.00"), line("espresso", 1, "2.50")]
    (outcome,) = evaluate([jam_deal()], {}, lines).outcomes
    assert outcome.applied
    assert outcome.explanation == (
        "applied: set 'Spread' has the 2 products required; set 'Jam' has the 1 product "
        "required; 1.00 off each of 1 product of set 'Coffee'")
