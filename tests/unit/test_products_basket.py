"""core.products.basket and discounts: the seed's example, unit consumption, amounts, inputs."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.errors import InvalidArgument
from core.products.basket import BasketLine, RawLine, evaluate, money, validate_lines
from core.products.discounts import (
    DiscountType,
    ProductSet,
    ProductSetDiscount,
    apply_update,
    validate_discount,
)

D = Decimal


def breakfast(discount_type: DiscountType = DiscountType.PERCENTAGE_OFF, value: str = "50",
              **kw: object) -> ProductSetDiscount:
    """Seed 003's example: two products from an unmarked set unlock a discount on one product
    of the personalized set (marked: it gets the discount)."""
    fields: dict[str, object] = {
        "discount_id": "breakfast", "name": "Breakfast deal", "discount_type": discount_type,
        "value": D(value), "product_sets": (
            ProductSet(name="Breakfast basics", product_ids=("bread", "butter"),
                       required_quantity=2),
            ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                       required_quantity=1, gets_discount=True, discounted_quantity=1))}
    fields.update(kw)
    return validate_discount(ProductSetDiscount(**fields))  # type: ignore[arg-type]


def line(product: str, quantity: int, price: str) -> BasketLine:
    return BasketLine(product_id=product, quantity=quantity, unit_price=D(price))


SELECTED = {"coffee": ("espresso",)}


def test_seed_example_discounts_one_product_of_the_personalized_set() -> None:
    lines = [line("bread", 1, "2.50"), line("butter", 1, "3.20"), line("espresso", 2, "7.99")]
    result = evaluate([breakfast()], SELECTED, lines)
    assert [(d.line_index, d.product_id, d.quantity, d.amount) for d in result.discount_lines] \
        == [(2, "espresso", 1, D("4.00"))]  # 50% of 7.99 = 3.995, half up
    (outcome,) = result.outcomes
    assert outcome.applied and outcome.amount == D("4.00")
    assert outcome.explanation == (
        "applied: set 'Breakfast basics' has the 2 products required; 50% off 1 product of set "
        "'Your coffee' (selected in personalized promotion 'coffee': espresso)")
    assert result.basket_total == D("21.68")
    assert result.discount_total == D("4.00")
    assert result.total_after_discounts == D("17.68")
    assert result.applied_promotion_ids == ("coffee",)


def test_seed_example_needs_the_required_products_of_the_unmarked_set() -> None:
    result = evaluate([breakfast()], SELECTED, [line("bread", 1, "2.50"),
                                                line("espresso", 1, "7.99")])
    assert result.discount_lines == ()
    (outcome,) = result.outcomes
    assert not outcome.applied
    assert outcome.explanation == ("not applied: set 'Breakfast basics' needs 2 products in the "
                                   "basket, found 1")
    assert result.applied_promotion_ids == ()


def test_two_units_of_one_product_meet_a_required_quantity() -> None:
    result = evaluate([breakfast()], SELECTED, [line("bread", 2, "2.50"),
                                                line("espresso", 1, "7.99")])
    assert result.outcomes[0].applied


def test_no_discount_when_the_selected_product_is_not_bought() -> None:
    result = evaluate([breakfast()], {"coffee": ("latte",)},
                      [line("bread", 2, "2.50"), line("espresso", 1, "7.99")])
    assert result.outcomes[0].explanation == (
        "not applied: set 'Your coffee' (selected in personalized promotion 'coffee': latte) "
        "needs 1 product in the basket, found 0")


def test_customer_without_a_list_gets_no_personalized_discount() -> None:
    result = evaluate([breakfast()], {}, [line("bread", 2, "2.50"), line("espresso", 1, "7.99")])
    assert result.outcomes[0].explanation == (
        "not applied: the customer has no product list in personalized promotion 'coffee'")


def test_minimum_basket_total_condition() -> None:
    discount = breakfast(min_basket_total=D("20.00"))
    lines = [line("bread", 1, "2.50"), line("butter", 1, "3.20"), line("espresso", 1, "7.99")]
    result = evaluate([discount], SELECTED, lines)
    assert result.outcomes[0].explanation == ("not applied: the basket total 13.69 is below the "
                                              "minimum 20.00")
    lines.append(line("jam", 1, "6.31"))
    assert evaluate([discount], SELECTED, lines).outcomes[0].applied


def test_discounted_units_are_the_cheapest_of_the_set() -> None:
    discount = breakfast(product_sets=(
        ProductSet(name="Basics", product_ids=("bread",), required_quantity=1),
        ProductSet(name="Picks", personalized_promotion_id="coffee", required_quantity=1,
                   gets_discount=True, discounted_quantity=2)))
    lines = [line("bread", 1, "1.00"), line("latte", 1, "4.00"), line("espresso", 3, "2.00")]
    result = evaluate([discount], {"coffee": ("latte", "espresso")}, lines)
    assert [(d.line_index, d.quantity, d.amount) for d in result.discount_lines] == [
        (2, 2, D("2.00"))]


def test_a_qualifying_set_does_not_use_up_the_discounted_product() -> None:
    # espresso is in both sets: the qualifying set takes bread first, so espresso stays
    # available for the discount.
    discount = breakfast(product_sets=(
        ProductSet(name="Any", product_ids=("bread", "espresso"), required_quantity=1),
        ProductSet(name="Picks", personalized_promotion_id="coffee", required_quantity=1,
                   gets_discount=True, discounted_quantity=1)))
    result = evaluate([discount], SELECTED, [line("espresso", 1, "8.00"),
                                             line("bread", 1, "2.00")])
    assert [(d.line_index, d.amount) for d in result.discount_lines] == [(0, D("4.00"))]
    alone = evaluate([discount], SELECTED, [line("espresso", 1, "8.00")])
    assert alone.outcomes[0].explanation.startswith("not applied: set 'Picks'")


def test_a_unit_serves_one_discount_only() -> None:
    first = breakfast(discount_id="a-first")
    second = breakfast(discount_id="b-second")
    lines = [line("bread", 2, "2.50"), line("espresso", 1, "7.99")]
    result = evaluate([second, first], SELECTED, lines)
    assert [(o.discount_id, o.applied) for o in result.outcomes] == [
        ("a-first", True), ("b-second", False)]
    assert result.discount_total == D("4.00")


def test_percentage_over_several_lines_loses_no_cent() -> None:
    discount = breakfast(value="10", product_sets=(
        ProductSet(name="Sweets", product_ids=("s1", "s2", "s3"), required_quantity=1,
                   gets_discount=True, discounted_quantity=3),))
    lines = [line("s1", 1, "0.05"), line("s2", 1, "0.05"), line("s3", 1, "0.05")]
    result = evaluate([discount], {}, lines)
    assert [(d.line_index, d.amount) for d in result.discount_lines] == [
        (0, D("0.01")), (1, D("0.01"))]
    assert result.outcomes[0].amount == D("0.02") == result.discount_total
    assert money(result.total_after_discounts) == "0.13"


def test_percentage_spread_exact_cents_on_larger_amounts() -> None:
    discount = breakfast(value="33.33", product_sets=(
        ProductSet(name="All", product_ids=("a", "b", "c"), required_quantity=3,
                   gets_discount=True, discounted_quantity=3),))
    lines = [line("a", 1, "10.00"), line("b", 1, "20.00"), line("c", 1, "0.01")]
    result = evaluate([discount], {}, lines)
    assert [d.amount for d in result.discount_lines] == [D("3.33"), D("6.67")]
    assert result.discount_total == D("10.00")  # 33.33% of 30.01 = 10.002333


def test_amount_off_and_fixed_price_per_unit_never_below_zero() -> None:
    lines = [line("bread", 2, "2.50"), line("espresso", 1, "7.99")]
    amount_off = evaluate([breakfast(DiscountType.AMOUNT_OFF, "1.50")], SELECTED, lines)
    assert amount_off.discount_total == D("1.50")
    assert amount_off.outcomes[0].explanation.endswith(
        "1.50 off each of 1 product of set 'Your coffee' (selected in personalized promotion "
        "'coffee': espresso)")
    too_much = evaluate([breakfast(DiscountType.AMOUNT_OFF, "10")], SELECTED, lines)
    assert too_much.discount_total == D("7.99")
    fixed = evaluate([breakfast(DiscountType.FIXED_PRICE, "1.99")], SELECTED, lines)
    assert fixed.discount_total == D("6.00")
    dearer = evaluate([breakfast(DiscountType.FIXED_PRICE, "9.00")], SELECTED, lines)
    assert not dearer.outcomes[0].applied
    assert dearer.outcomes[0].explanation == (
        "not applied: the discounted products already cost no more than the discounted price")


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (RawLine("p", -1, "1.00"), "lines[0].quantity", "must be 1-1000000, got -1"),
        (RawLine("p", 0, "1.00"), "lines[0].quantity", "got 0"),
        (RawLine("p", 1, "-1.00"), "lines[0].unit_price", "must not be negative"),
        (RawLine("p", 1, "1.001"), "lines[0].unit_price", "at most 2 decimal places"),
        (RawLine("p", 1, "abc"), "lines[0].unit_price", "must be a decimal number"),
        (RawLine("", 1, "1.00"), "lines[0].product_id", "1-128 characters"),
    ],
)
def test_bad_lines_name_the_field(raw: RawLine, field: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_lines([raw])
    assert err.value.metadata["field"] == field
    assert fragment in err.value.message


def test_empty_basket_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="lines must hold 1-1000 basket lines, got 0"):
        validate_lines([])


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"value": D("0")}, "value", "percentage above 0"),
        ({"value": D("100.5")}, "value", "at most 100"),
        ({"discount_type": DiscountType.AMOUNT_OFF, "value": D("1.005")}, "value",
         "at most 2 decimal places"),
        ({"discount_type": DiscountType.FIXED_PRICE, "value": D("-1")}, "value", "not negative"),
        ({"product_sets": ()}, "product_sets", "1-10 sets"),
        ({"product_sets": (ProductSet(name="x", product_ids=("a",), required_quantity=1),)},
         "product_sets", "at least one product set must get the discount"),
        ({"product_sets": (ProductSet(name="x", product_ids=("a",), required_quantity=0,
                                      gets_discount=True, discounted_quantity=1),)},
         "product_sets[0].required_quantity", "must be 1-1000, got 0"),
        ({"product_sets": (ProductSet(name="x", product_ids=("a",), required_quantity=1,
                                      gets_discount=True),)},
         "product_sets[0].discounted_quantity", "must be 1-1000"),
        ({"product_sets": (ProductSet(name="x", product_ids=("a",), required_quantity=1,
                                      personalized_promotion_id="p", gets_discount=True,
                                      discounted_quantity=1),)},
         "product_sets[0].product_ids", "leave product_ids empty"),
        ({"product_sets": (ProductSet(name="x", required_quantity=1, gets_discount=True,
                                      discounted_quantity=1),)},
         "product_sets[0].product_ids", "at least one product"),
        ({"discount_id": "no spaces"}, "discount_id", "discount_id must be"),
        ({"min_basket_total": D("1.001")}, "min_basket_total", "2 decimal places"),
    ],
)
def test_invalid_discounts_name_the_field(change: dict[str, object], field: str,
                                          fragment: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        breakfast(**change)
    assert err.value.metadata["field"] == field
    assert fragment in err.value.message


def test_discount_update_copies_masked_fields_and_validates() -> None:
    current = breakfast()
    patch = breakfast(discount_type=DiscountType.FIXED_PRICE, value="1.99", name="Other")
    updated = apply_update(current, patch, ["discount_type", "value"])
    assert (updated.name, updated.discount_type, updated.value) == (
        "Breakfast deal", DiscountType.FIXED_PRICE, D("1.99"))
    with pytest.raises(InvalidArgument, match="cannot be updated: discount_id"):
        apply_update(current, patch, ["discount_id"])
    with pytest.raises(InvalidArgument, match="at least one field"):
        apply_update(current, patch, [])
    with pytest.raises(InvalidArgument, match="percentage above 0"):
        apply_update(current, breakfast(DiscountType.AMOUNT_OFF, "120"), ["value"])
