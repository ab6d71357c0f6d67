"""Personalized promotions, customers' product lists and their product selections.

Decisions:
- ``max_distinct_products`` None means "all of the list" (the seed: a blank field lets the
  customer select every product on the list).
- The default product is named on the list assignment (``default_product_id``); when it is left
  empty, the first product of the list is the default. It is what discounts use while the customer
  has chosen nothing.
- "Lock after first apply" is per customer: the first time a discount linked to the promotion is
  applied to the customer's basket, their selection is frozen (the default too, if they had chosen
  nothing) and can no longer change.
- Selecting the products that are already selected is a no-op, even when locked: a retry of a
  selection that went through must not fail. A locked choice is compared as a set (a client
  may keep the products in a set and resend them in another order); an unlocked one takes the
  new order.
- Replacing a customer's list keeps the chosen products still on the new list; if none are left,
  the default applies again. A recorded first apply survives the replacement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from core.errors import FailedPrecondition, InvalidArgument

BACKEND_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_PRODUCT_ID = 128
MAX_LIST_PRODUCTS = 1000
MAX_CUSTOMERS_PER_CALL = 10_000
UPDATABLE_FIELDS = frozenset(
    {"name", "description", "max_distinct_products", "lock_after_first_apply"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: every Unicode control (Cc)


@dataclass(frozen=True)
class PersonalizedPromotion:
    backend_id: str
    name: str
    description: str = ""
    max_distinct_products: int | None = None
    lock_after_first_apply: bool = False
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class ProductList:
    """One customer's list in one personalized promotion, with their choice and first apply."""

    promotion_id: str
    customer_id: str
    product_ids: tuple[str, ...]
    default_product_id: str
    chosen_product_ids: tuple[str, ...] | None = None
    first_apply_time: datetime | None = None

    @property
    def selected_product_ids(self) -> tuple[str, ...]:
        """What discounts use: the customer's choice, or the default product."""
        if self.chosen_product_ids:
            return self.chosen_product_ids
        return (self.default_product_id,)


def validate_backend_id(value: str, *, field: str = "backend_id") -> str:
    if not BACKEND_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{field} must be 1-100 characters of letters, digits, '_', '-' or '.', starting "
            f"with a letter or digit; got {value!r}",
            reason="INVALID_BACKEND_ID", metadata={"field": field})
    return value


def validate_promotion(promotion: PersonalizedPromotion) -> PersonalizedPromotion:
    """Check every field; returns the value with text fields trimmed."""
    validate_backend_id(promotion.backend_id)
    name = promotion.name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidArgument(f"name is required and at most {MAX_NAME} characters",
                              reason="INVALID_NAME", metadata={"field": "name"})
    description = promotion.description.strip()
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"description must be at most {MAX_DESCRIPTION} characters",
                              reason="INVALID_DESCRIPTION", metadata={"field": "description"})
    maximum = promotion.max_distinct_products
    if maximum is not None and maximum < 1:
        raise InvalidArgument(
            f"max_distinct_products must be at least 1 (or empty for all of the list), "
            f"got {maximum}", reason="INVALID_MAX_DISTINCT_PRODUCTS",
            metadata={"field": "max_distinct_products"})
    return replace(promotion, name=name, description=description)


def apply_update(current: PersonalizedPromotion, patch: PersonalizedPromotion,
                 paths: Sequence[str]) -> PersonalizedPromotion:
    """Copy the masked fields from ``patch`` onto ``current`` and validate the result."""
    if not paths:
        raise InvalidArgument("update_mask must name at least one field",
                              reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
    unknown = sorted(set(paths) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidArgument(
            f"update_mask names fields that cannot be updated: {', '.join(unknown)}; "
            f"updatable fields are {', '.join(sorted(UPDATABLE_FIELDS))}",
            reason="INVALID_UPDATE_MASK", metadata={"field": "update_mask"})
    updated = replace(current, **{path: getattr(patch, path) for path in paths})
    return validate_promotion(updated)


def validate_product_id(value: str, *, field: str) -> str:
    if not value or len(value) > MAX_PRODUCT_ID or _CONTROL.search(value):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_PRODUCT_ID} characters without control characters, "
            f"got {value!r}", reason="INVALID_PRODUCT_ID", metadata={"field": field})
    return value


def validate_product_ids(values: Sequence[str], *, field: str, allow_empty: bool = False,
                         maximum: int = MAX_LIST_PRODUCTS) -> tuple[str, ...]:
    """Distinct, well-formed product ids, in the given order."""
    if not values and not allow_empty:
        raise InvalidArgument(f"{field} must name at least one product",
                              reason="EMPTY_PRODUCT_LIST", metadata={"field": field})
    if len(values) > maximum:
        raise InvalidArgument(f"{field} holds at most {maximum} products, got {len(values)}",
                              reason="TOO_MANY_PRODUCTS", metadata={"field": field})
    seen: set[str] = set()
    for index, value in enumerate(values):
        validate_product_id(value, field=f"{field}[{index}]")
        if value in seen:
            raise InvalidArgument(f"{field}[{index}]: product {value!r} is listed twice",
                                  reason="DUPLICATE_PRODUCT",
                                  metadata={"field": f"{field}[{index}]"})
        seen.add(value)
    return tuple(values)


def validate_customer_ids(values: Sequence[str], *, field: str = "customer_ids") -> list[str]:
    if not values or len(values) > MAX_CUSTOMERS_PER_CALL:
        raise InvalidArgument(f"{field} must hold 1-{MAX_CUSTOMERS_PER_CALL} customers, "
                              f"got {len(values)}", reason="INVALID_CUSTOMER_IDS",
                              metadata={"field": field})
    seen: set[str] = set()
    for index, value in enumerate(values):
        if not value:
            raise InvalidArgument(f"{field}[{index}] is empty", reason="INVALID_CUSTOMER_IDS",
                                  metadata={"field": f"{field}[{index}]"})
        if value in seen:
            raise InvalidArgument(f"{field}[{index}]: customer {value!r} is listed twice",
                                  reason="DUPLICATE_CUSTOMER",
                                  metadata={"field": f"{field}[{index}]"})
        seen.add(value)
    return list(values)


@dataclass(frozen=True)
class ListAssignment:
    """A product list to give to customers: the products and the default product."""

    product_ids: tuple[str, ...]
    default_product_id: str


def validate_assignment(product_ids: Sequence[str], default_product_id: str) -> ListAssignment:
    products = validate_product_ids(product_ids, field="product_ids")
    default = default_product_id or products[0]
    if default not in products:
        raise InvalidArgument(
            f"default_product_id {default!r} is not on the list; it must be one of product_ids "
            "(or empty for the first of them)", reason="DEFAULT_PRODUCT_NOT_ON_LIST",
            metadata={"field": "default_product_id"})
    return ListAssignment(product_ids=products, default_product_id=default)


def reassign(current: ProductList | None, promotion_id: str, customer_id: str,
             assignment: ListAssignment) -> ProductList:
    """The customer's list after ``assignment`` replaces ``current`` (see the module notes)."""
    if current is None:
        return ProductList(promotion_id=promotion_id, customer_id=customer_id,
                           product_ids=assignment.product_ids,
                           default_product_id=assignment.default_product_id)
    kept = tuple(p for p in current.chosen_product_ids or () if p in assignment.product_ids)
    return replace(current, product_ids=assignment.product_ids,
                   default_product_id=assignment.default_product_id,
                   chosen_product_ids=kept or None)


def is_locked(promotion: PersonalizedPromotion, product_list: ProductList) -> bool:
    return promotion.lock_after_first_apply and product_list.first_apply_time is not None


def select(promotion: PersonalizedPromotion, product_list: ProductList,
           product_ids: Sequence[str]) -> ProductList:
    """The list with the customer's new choice; empty clears it (back to the default)."""
    chosen = validate_product_ids(product_ids, field="product_ids", allow_empty=True)
    for index, product in enumerate(chosen):
        if product not in product_list.product_ids:
            raise InvalidArgument(
                f"product_ids[{index}]: product {product!r} is not on the customer's list in "
                f"personalized promotion {promotion.backend_id!r}",
                reason="PRODUCT_NOT_ON_LIST",
                metadata={"field": f"product_ids[{index}]", "product_id": product})
    maximum = promotion.max_distinct_products
    if maximum is not None and len(chosen) > maximum:
        raise InvalidArgument(
            f"personalized promotion {promotion.backend_id!r} allows at most {maximum} distinct "
            f"products, {len(chosen)} were selected", reason="TOO_MANY_PRODUCTS_SELECTED",
            metadata={"field": "product_ids", "max_distinct_products": maximum})
    new_choice = chosen or None
    if new_choice == product_list.chosen_product_ids:
        return product_list
    if is_locked(promotion, product_list):
        if set(chosen) == set(product_list.chosen_product_ids or ()):
            return product_list  # the locked choice again, in another order: a retry
        assert product_list.first_apply_time is not None
        raise FailedPrecondition(
            f"the product selection in personalized promotion {promotion.backend_id!r} is "
            f"locked: the promotion locks after first apply and was first applied at "
            f"{product_list.first_apply_time.isoformat()}",
            reason="SELECTION_LOCKED",
            metadata={"personalized_promotion_id": promotion.backend_id,
                      "customer_id": product_list.customer_id})
    return replace(product_list, chosen_product_ids=new_choice)


def record_first_apply(promotion: PersonalizedPromotion, product_list: ProductList,
                       when: datetime) -> ProductList:
    """Mark the first apply; a locking promotion also freezes the selection as it was used (the
    default product included, so a later change of the list's default does not move it)."""
    if product_list.first_apply_time is not None:
        return product_list
    chosen = (product_list.selected_product_ids if promotion.lock_after_first_apply
              else product_list.chosen_product_ids)
    return replace(product_list, first_apply_time=when, chosen_product_ids=chosen)
