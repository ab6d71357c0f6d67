"""core.products.promotions: validation, default product, selection rules and the lock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.errors import FailedPrecondition, InvalidArgument
from core.products.promotions import (
    PersonalizedPromotion,
    ProductList,
    apply_update,
    is_locked,
    reassign,
    record_first_apply,
    select,
    validate_assignment,
    validate_customer_ids,
    validate_promotion,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def promo(max_distinct: int | None = None, lock: bool = False) -> PersonalizedPromotion:
    return PersonalizedPromotion(backend_id="coffee", name="Your coffee",
                                 max_distinct_products=max_distinct, lock_after_first_apply=lock)


def product_list(**kw: object) -> ProductList:
    base: dict[str, object] = {"promotion_id": "coffee", "customer_id": "c1",
                               "product_ids": ("A", "B", "C"), "default_product_id": "B"}
    base.update(kw)
    return ProductList(**base)  # type: ignore[arg-type]


def test_validate_trims_and_checks_fields() -> None:
    valid = validate_promotion(PersonalizedPromotion(backend_id="p-1", name="  Pick  ",
                                                     description=" d "))
    assert (valid.name, valid.description) == ("Pick", "d")
    cases = [
        (PersonalizedPromotion(backend_id="bad id", name="x"), "INVALID_BACKEND_ID"),
        (PersonalizedPromotion(backend_id="p", name=" "), "INVALID_NAME"),
        (PersonalizedPromotion(backend_id="p", name="x", description="d" * 2001),
         "INVALID_DESCRIPTION"),
        (PersonalizedPromotion(backend_id="p", name="x", max_distinct_products=-1),
         "INVALID_MAX_DISTINCT_PRODUCTS"),
    ]
    for value, reason in cases:
        with pytest.raises(InvalidArgument) as err:
            validate_promotion(value)
        assert err.value.reason == reason


def test_update_copies_masked_fields_only() -> None:
    current = promo(2)
    patch = PersonalizedPromotion(backend_id="other", name="New", max_distinct_products=None)
    updated = apply_update(current, patch, ["max_distinct_products"])
    assert updated == PersonalizedPromotion(backend_id="coffee", name="Your coffee")
    with pytest.raises(InvalidArgument, match="cannot be updated: backend_id"):
        apply_update(current, patch, ["backend_id"])
    with pytest.raises(InvalidArgument, match="at least one field"):
        apply_update(current, patch, [])


def test_default_product_is_named_or_the_first_of_the_list() -> None:
    assert validate_assignment(["A", "B"], "").default_product_id == "A"
    assert validate_assignment(["A", "B"], "B").default_product_id == "B"
    with pytest.raises(InvalidArgument) as err:
        validate_assignment(["A", "B"], "Z")
    assert err.value.reason == "DEFAULT_PRODUCT_NOT_ON_LIST"
    assert err.value.metadata == {"field": "default_product_id"}
    with pytest.raises(InvalidArgument) as err:
        validate_assignment(["A", "A"], "")
    assert err.value.metadata == {"field": "product_ids[1]"}
    with pytest.raises(InvalidArgument, match="at least one product"):
        validate_assignment([], "")


def test_customer_ids_are_distinct_and_present() -> None:
    assert validate_customer_ids(["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidArgument, match=r"customer_ids\[1\]: customer 'a' is listed twice"):
        validate_customer_ids(["a", "a"])
    with pytest.raises(InvalidArgument, match="1-10000 customers"):
        validate_customer_ids([])


def test_selected_is_the_default_until_the_customer_chooses() -> None:
    assert product_list().selected_product_ids == ("B",)
    chosen = select(promo(), product_list(), ["C", "A"])
    assert chosen.chosen_product_ids == ("C", "A")
    assert chosen.selected_product_ids == ("C", "A")
    assert select(promo(), chosen, []).selected_product_ids == ("B",)


def test_only_listed_products_can_be_selected() -> None:
    with pytest.raises(InvalidArgument) as err:
        select(promo(), product_list(), ["A", "Z"])
    assert err.value.reason == "PRODUCT_NOT_ON_LIST"
    assert err.value.metadata == {"field": "product_ids[1]", "product_id": "Z"}
    assert "product 'Z' is not on the customer's list" in err.value.message


def test_max_distinct_products_is_enforced_and_empty_means_all() -> None:
    assert select(promo(None), product_list(), ["A", "B", "C"]).chosen_product_ids == (
        "A", "B", "C")
    assert select(promo(2), product_list(), ["A", "C"]).chosen_product_ids == ("A", "C")
    with pytest.raises(InvalidArgument) as err:
        select(promo(2), product_list(), ["A", "B", "C"])
    assert err.value.reason == "TOO_MANY_PRODUCTS_SELECTED"
    assert err.value.message == ("personalized promotion 'coffee' allows at most 2 distinct "
                                 "products, 3 were selected")


def test_lock_after_first_apply_freezes_the_selection() -> None:
    locking = promo(lock=True)
    applied = record_first_apply(locking, product_list(), NOW)
    assert applied.first_apply_time == NOW
    assert applied.chosen_product_ids == ("B",)  # the default, frozen
    assert is_locked(locking, applied)
    with pytest.raises(FailedPrecondition) as err:
        select(locking, applied, ["A"])
    assert err.value.reason == "SELECTION_LOCKED"
    assert err.value.message == (
        "the product selection in personalized promotion 'coffee' is locked: the promotion "
        "locks after first apply and was first applied at 2026-11-22T10:00:00+00:00")
    assert select(locking, applied, ["B"]) is applied  # the same choice again is a no-op


def test_without_lock_the_selection_stays_free_after_apply() -> None:
    applied = record_first_apply(promo(), product_list(), NOW)
    assert applied.chosen_product_ids is None
    assert not is_locked(promo(), applied)
    assert select(promo(), applied, ["A"]).chosen_product_ids == ("A",)


def test_first_apply_is_recorded_once() -> None:
    applied = record_first_apply(promo(lock=True), product_list(), NOW)
    later = datetime(2026, 12, 1, tzinfo=UTC)
    assert record_first_apply(promo(lock=True), applied, later).first_apply_time == NOW


def test_replacing_a_list_keeps_the_choices_still_on_it() -> None:
    assignment = validate_assignment(["C", "D"], "D")
    fresh = reassign(None, "coffee", "c1", assignment)
    assert fresh == ProductList(promotion_id="coffee", customer_id="c1", product_ids=("C", "D"),
                                default_product_id="D")
    current = product_list(chosen_product_ids=("A", "C"), first_apply_time=NOW)
    replaced = reassign(current, "coffee", "c1", assignment)
    assert replaced.chosen_product_ids == ("C",)
    assert replaced.first_apply_time == NOW
    gone = reassign(product_list(chosen_product_ids=("A",)), "coffee", "c1", assignment)
    assert gone.chosen_product_ids is None
    assert gone.selected_product_ids == ("D",)
