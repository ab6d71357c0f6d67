"""Product-set discounts: the discount action that personalized promotions plug into.

A discount has 1-10 product sets. Each set names its products, or is a personalized set whose
products are, per customer, what they selected in a personalized promotion. Every set needs
``required_quantity`` units in the basket; the sets marked ``gets_discount`` then discount up to
``discounted_quantity`` of their units with the discount type. Seed 003's example: an unmarked
set of two required products and a marked personalized set discounting one product.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from core.errors import InvalidArgument
from core.products.allocation import CENT
from core.products.promotions import validate_backend_id, validate_product_ids

DISCOUNT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
MAX_SETS = 10
MAX_QUANTITY = 1000
MAX_NAME = 200


class DiscountType(enum.Enum):
    PERCENTAGE_OFF = "PERCENTAGE_OFF"
    AMOUNT_OFF = "AMOUNT_OFF"
    FIXED_PRICE = "FIXED_PRICE"


@dataclass(frozen=True)
class ProductSet:
    name: str
    required_quantity: int
    product_ids: tuple[str, ...] = ()
    personalized_promotion_id: str | None = None
    gets_discount: bool = False
    discounted_quantity: int = 0

    @property
    def personalized(self) -> bool:
        return self.personalized_promotion_id is not None


@dataclass(frozen=True)
class ProductSetDiscount:
    discount_id: str
    name: str
    discount_type: DiscountType
    value: Decimal
    product_sets: tuple[ProductSet, ...]
    min_basket_total: Decimal | None = None
    create_time: datetime | None = None

    @property
    def personalized_promotion_ids(self) -> tuple[str, ...]:
        return tuple(s.personalized_promotion_id for s in self.product_sets
                     if s.personalized_promotion_id is not None)


def has_cents_only(value: Decimal) -> bool:
    return value == value.quantize(CENT)


def _validate_set(product_set: ProductSet, index: int) -> ProductSet:
    prefix = f"product_sets[{index}]"
    name = product_set.name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidArgument(f"{prefix}.name is required and at most {MAX_NAME} characters",
                              reason="INVALID_NAME", metadata={"field": f"{prefix}.name"})
    if product_set.personalized_promotion_id is not None:
        validate_backend_id(product_set.personalized_promotion_id,
                            field=f"{prefix}.personalized_promotion_id")
        if product_set.product_ids:
            raise InvalidArgument(
                f"{prefix}: a personalized set takes its products from the customer's selection; "
                "leave product_ids empty", reason="INVALID_PRODUCT_SET",
                metadata={"field": f"{prefix}.product_ids"})
    else:
        validate_product_ids(product_set.product_ids, field=f"{prefix}.product_ids")
    if not 1 <= product_set.required_quantity <= MAX_QUANTITY:
        raise InvalidArgument(
            f"{prefix}.required_quantity must be 1-{MAX_QUANTITY}, got "
            f"{product_set.required_quantity}", reason="INVALID_QUANTITY",
            metadata={"field": f"{prefix}.required_quantity"})
    if product_set.gets_discount:
        if not 1 <= product_set.discounted_quantity <= MAX_QUANTITY:
            raise InvalidArgument(
                f"{prefix}.discounted_quantity must be 1-{MAX_QUANTITY} for a set that gets the "
                f"discount, got {product_set.discounted_quantity}", reason="INVALID_QUANTITY",
                metadata={"field": f"{prefix}.discounted_quantity"})
    elif product_set.discounted_quantity != 0:
        raise InvalidArgument(
            f"{prefix}.discounted_quantity must be 0 for a set that does not get the discount",
            reason="INVALID_QUANTITY", metadata={"field": f"{prefix}.discounted_quantity"})
    return replace(product_set, name=name)


def validate_discount(discount: ProductSetDiscount) -> ProductSetDiscount:
    """Check every field; returns the value with names trimmed."""
    if not DISCOUNT_ID_PATTERN.fullmatch(discount.discount_id):
        raise InvalidArgument(
            "discount_id must be 1-100 characters of letters, digits, '_', '-' or '.', starting "
            f"with a letter or digit; got {discount.discount_id!r}",
            reason="INVALID_DISCOUNT_ID", metadata={"field": "discount_id"})
    name = discount.name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidArgument(f"name is required and at most {MAX_NAME} characters",
                              reason="INVALID_NAME", metadata={"field": "name"})
    value = discount.value
    if discount.discount_type is DiscountType.PERCENTAGE_OFF:
        if not Decimal(0) < value <= Decimal(100):
            raise InvalidArgument(
                f"value must be a percentage above 0 and at most 100, got {value}",
                reason="INVALID_VALUE", metadata={"field": "value"})
    elif not has_cents_only(value) or (
            value <= 0 if discount.discount_type is DiscountType.AMOUNT_OFF else value < 0):
        raise InvalidArgument(
            f"value must be an amount with at most 2 decimal places, "
            f"{'above 0' if discount.discount_type is DiscountType.AMOUNT_OFF else 'not negative'}"
            f", got {value}", reason="INVALID_VALUE", metadata={"field": "value"})
    if discount.min_basket_total is not None and not has_cents_only(discount.min_basket_total):
        raise InvalidArgument("min_basket_total must have at most 2 decimal places",
                              reason="INVALID_DECIMAL", metadata={"field": "min_basket_total"})
    if not 1 <= len(discount.product_sets) <= MAX_SETS:
        raise InvalidArgument(f"product_sets must hold 1-{MAX_SETS} sets, got "
                              f"{len(discount.product_sets)}", reason="INVALID_PRODUCT_SET",
                              metadata={"field": "product_sets"})
    sets = tuple(_validate_set(s, i) for i, s in enumerate(discount.product_sets))
    if not any(s.gets_discount for s in sets):
        raise InvalidArgument("at least one product set must get the discount (gets_discount)",
                              reason="NO_DISCOUNTED_SET", metadata={"field": "product_sets"})
    return replace(discount, name=name, product_sets=sets)



UPDATABLE_FIELDS = frozenset(
    {"name", "discount_type", "value", "min_basket_total", "product_sets"})


def check_update_mask(paths: Sequence[str]) -> list[str]:
    """The mask's paths, or InvalidArgument when it is empty or names a fixed field."""
    if not paths:
        raise InvalidArgument("update_mask must name at least one field",
                              reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
    unknown = sorted(set(paths) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidArgument(
            f"update_mask names fields that cannot be updated: {', '.join(unknown)}; "
            f"updatable fields are {', '.join(sorted(UPDATABLE_FIELDS))}",
            reason="INVALID_UPDATE_MASK", metadata={"field": "update_mask"})
    return list(paths)


def apply_update(current: ProductSetDiscount, patch: ProductSetDiscount,
                 paths: Sequence[str]) -> ProductSetDiscount:
    """Copy the masked fields from ``patch`` onto ``current`` and validate the result."""
    check_update_mask(paths)
    return validate_discount(replace(current, **{path: getattr(patch, path) for path in paths}))
