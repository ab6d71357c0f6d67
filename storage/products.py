"""Personalized promotions, customers' product lists and product-set discounts in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from core.errors import AlreadyExists, FailedPrecondition, NotFound
from core.money import plain
from core.products.discounts import DiscountType, ProductSet, ProductSetDiscount
from core.products.promotions import PersonalizedPromotion, ProductList

_PROMOTION_COLUMNS = ("backend_id, name, description, max_distinct_products, "
                      "lock_after_first_apply, create_time, update_time")
_LIST_COLUMNS = ("customer_id, promotion_id, product_ids, default_product_id, "
                 "chosen_product_ids, first_apply_time")


# --- personalized promotions -----------------------------------------------------------------

def _promotion(row: asyncpg.Record, prefix: str = "") -> PersonalizedPromotion:
    return PersonalizedPromotion(
        backend_id=row[f"{prefix}backend_id"], name=row[f"{prefix}name"],
        description=row[f"{prefix}description"],
        max_distinct_products=row[f"{prefix}max_distinct_products"],
        lock_after_first_apply=row[f"{prefix}lock_after_first_apply"],
        create_time=row[f"{prefix}create_time"], update_time=row[f"{prefix}update_time"])


def promotion_not_found(backend_id: str, field: str = "backend_id") -> NotFound:
    return NotFound(f"no personalized promotion with backend_id {backend_id!r}",
                    reason="PERSONALIZED_PROMOTION_NOT_FOUND",
                    metadata={"field": field, "backend_id": backend_id})


async def insert_promotion(conn: asyncpg.Connection,
                           promotion: PersonalizedPromotion) -> PersonalizedPromotion:
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO personalized_promotions (backend_id, name, description,
                       max_distinct_products, lock_after_first_apply)
                VALUES ($1, $2, $3, $4, $5) RETURNING {_PROMOTION_COLUMNS}""",
            promotion.backend_id, promotion.name, promotion.description,
            promotion.max_distinct_products, promotion.lock_after_first_apply)
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(
            f"a personalized promotion with backend_id {promotion.backend_id!r} already exists",
            reason="PERSONALIZED_PROMOTION_EXISTS",
            metadata={"backend_id": promotion.backend_id}) from exc
    assert row is not None
    return _promotion(row)


async def get_promotion(conn: asyncpg.Connection, backend_id: str, *, for_update: bool = False,
                        for_share: bool = False,
                        field: str = "backend_id") -> PersonalizedPromotion:
    """The promotion; ``for_update`` locks it to change it, ``for_share`` keeps it from changing
    until the transaction ends (a selection checked against its maximum)."""
    lock = " FOR UPDATE" if for_update else " FOR SHARE" if for_share else ""
    row = await conn.fetchrow(
        f"SELECT {_PROMOTION_COLUMNS} FROM personalized_promotions WHERE backend_id = $1{lock}",
        backend_id)
    if row is None:
        raise promotion_not_found(backend_id, field)
    return _promotion(row)


async def update_promotion(conn: asyncpg.Connection,
                           promotion: PersonalizedPromotion) -> PersonalizedPromotion:
    row = await conn.fetchrow(
        f"""UPDATE personalized_promotions SET name = $2, description = $3,
                   max_distinct_products = $4, lock_after_first_apply = $5, update_time = now()
             WHERE backend_id = $1 RETURNING {_PROMOTION_COLUMNS}""",
        promotion.backend_id, promotion.name, promotion.description,
        promotion.max_distinct_products, promotion.lock_after_first_apply)
    if row is None:
        raise promotion_not_found(promotion.backend_id)
    return _promotion(row)


async def list_promotions(conn: asyncpg.Connection, *, search: str,
                          lock_after_first_apply: bool | None, after_id: str | None,
                          limit: int) -> list[PersonalizedPromotion]:
    """Up to ``limit`` promotions ordered by backend_id, strictly after ``after_id``."""
    rows = await conn.fetch(
        f"""SELECT {_PROMOTION_COLUMNS} FROM personalized_promotions
             WHERE ($1::text IS NULL OR backend_id > $1)
               AND ($2::text = '' OR strpos(lower(name), lower($2)) > 0
                    OR strpos(lower(backend_id), lower($2)) > 0)
               AND ($3::boolean IS NULL OR lock_after_first_apply = $3)
             ORDER BY backend_id LIMIT $4""",
        after_id, search, lock_after_first_apply, limit)
    return [_promotion(row) for row in rows]


async def largest_choice(conn: asyncpg.Connection, backend_id: str) -> int:
    """The most products any customer has chosen in the promotion (0 if nobody chose)."""
    value = await conn.fetchval(
        """SELECT coalesce(max(cardinality(chosen_product_ids)), 0) FROM customer_product_lists
            WHERE promotion_id = $1""", backend_id)
    return int(value)


async def delete_promotion(conn: asyncpg.Connection, backend_id: str) -> int:
    """Delete the promotion and its lists; returns how many lists went with it.

    The lists are locked before the promotion, the order SelectProducts takes them in, so a
    selection in flight makes the delete wait instead of deadlocking with it."""
    await conn.execute(
        """SELECT 1 FROM customer_product_lists WHERE promotion_id = $1
            ORDER BY customer_id FOR UPDATE""", backend_id)
    await get_promotion(conn, backend_id, for_update=True)
    users = await conn.fetch(
        """SELECT DISTINCT discount_id FROM product_set_discount_sets
            WHERE personalized_promotion_id = $1 ORDER BY discount_id""", backend_id)
    if users:
        raise _in_use(backend_id, [row["discount_id"] for row in users])
    lists = await conn.fetchval(
        "SELECT count(*) FROM customer_product_lists WHERE promotion_id = $1", backend_id)
    try:
        await conn.execute("DELETE FROM personalized_promotions WHERE backend_id = $1",
                           backend_id)
    except asyncpg.ForeignKeyViolationError as exc:  # a discount linked it meanwhile
        raise _in_use(backend_id, []) from exc
    return int(lists)


def _in_use(backend_id: str, discount_ids: list[str]) -> FailedPrecondition:
    named = f": {', '.join(discount_ids)}" if discount_ids else ""
    return FailedPrecondition(
        f"personalized promotion {backend_id!r} is used by product-set discounts{named}; delete "
        "those discounts first", reason="PERSONALIZED_PROMOTION_IN_USE",
        metadata={"backend_id": backend_id, "discount_ids": ",".join(discount_ids)})


# --- customers' product lists ----------------------------------------------------------------

def _list(row: asyncpg.Record) -> ProductList:
    chosen = row["chosen_product_ids"]
    return ProductList(
        promotion_id=row["promotion_id"], customer_id=row["customer_id"],
        product_ids=tuple(row["product_ids"]), default_product_id=row["default_product_id"],
        chosen_product_ids=tuple(chosen) if chosen else None,
        first_apply_time=row["first_apply_time"])


async def lists_for_update(conn: asyncpg.Connection, promotion_id: str,
                           customer_ids: Sequence[str]) -> dict[str, ProductList]:
    """The existing lists of ``customer_ids`` in the promotion, locked, by customer."""
    rows = await conn.fetch(
        f"""SELECT {_LIST_COLUMNS} FROM customer_product_lists
             WHERE promotion_id = $1 AND customer_id = ANY($2::text[])
             ORDER BY customer_id FOR UPDATE""", promotion_id, list(customer_ids))
    return {row["customer_id"]: _list(row) for row in rows}


_LISTS_SQL = """
INSERT INTO customer_product_lists AS l (customer_id, promotion_id, product_ids,
       default_product_id, chosen_product_ids, first_apply_time)
SELECT t.customer_id, t.promotion_id, t.product_ids::text[], t.default_product_id,
       t.chosen::text[], t.first_apply_time
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
       AS t(customer_id, promotion_id, product_ids, default_product_id, chosen,
            first_apply_time)
ON CONFLICT (customer_id, promotion_id) """


def _list_arrays(lists: Sequence[ProductList]) -> list[list[Any]]:
    """save_lists' parameters, in customer order (concurrent writers lock in one order)."""
    ordered = sorted(lists, key=lambda item: (item.customer_id, item.promotion_id))
    return [[item.customer_id for item in ordered], [item.promotion_id for item in ordered],
            [_array_literal(item.product_ids) for item in ordered],
            [item.default_product_id for item in ordered],
            [_array_literal(item.chosen_product_ids) if item.chosen_product_ids else None
             for item in ordered],
            [item.first_apply_time for item in ordered]]


async def save_lists(conn: asyncpg.Connection, lists: Sequence[ProductList]) -> None:
    """Insert or replace ``lists`` in one statement, in customer order (no deadlocks)."""
    await conn.execute(
        _LISTS_SQL + """DO UPDATE
              SET product_ids = EXCLUDED.product_ids,
                  default_product_id = EXCLUDED.default_product_id,
                  chosen_product_ids = EXCLUDED.chosen_product_ids,
                  first_apply_time = EXCLUDED.first_apply_time, update_time = now()""",
        *_list_arrays(lists))


async def create_lists(conn: asyncpg.Connection, lists: Sequence[ProductList]) -> set[str]:
    """Insert the lists of customers who have none in the promotion yet; returns those customers.

    A customer whose list exists (or is being created by a transaction in flight, which this
    waits for) keeps it untouched: the caller then locks it and changes it from what it holds.
    Deciding "new" from an earlier read instead would overwrite a list created meanwhile, its
    choice and recorded first apply with it. NOT_FOUND if the promotion was deleted meanwhile."""
    if not lists:
        return set()
    try:
        rows = await conn.fetch(_LISTS_SQL + "DO NOTHING RETURNING l.customer_id",
                                *_list_arrays(lists))
    except asyncpg.ForeignKeyViolationError as exc:  # the only foreign key: the promotion
        raise promotion_not_found(lists[0].promotion_id, "personalized_promotion_id") from exc
    return {row["customer_id"] for row in rows}


def _array_literal(values: Sequence[str]) -> str:
    """A text[] literal (unnest cannot take an array of arrays of different lengths)."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


async def delete_lists(conn: asyncpg.Connection, promotion_id: str,
                       customer_ids: Sequence[str]) -> int:
    result = await conn.execute(
        "DELETE FROM customer_product_lists WHERE promotion_id = $1 AND customer_id = ANY($2)",
        promotion_id, list(customer_ids))
    return int(result.split()[-1])


async def list_lists(conn: asyncpg.Connection, promotion_id: str, *, after_id: str | None,
                     limit: int) -> list[ProductList]:
    """Up to ``limit`` lists of the promotion ordered by customer_id, after ``after_id``."""
    rows = await conn.fetch(
        f"""SELECT {_LIST_COLUMNS} FROM customer_product_lists
             WHERE promotion_id = $1 AND ($2::text IS NULL OR customer_id > $2)
             ORDER BY customer_id LIMIT $3""", promotion_id, after_id, limit)
    return [_list(row) for row in rows]


async def customer_promotions(conn: asyncpg.Connection, customer_id: str, *,
                              for_update: bool = False,
                              ) -> list[tuple[PersonalizedPromotion, ProductList]]:
    """The customer's personalized promotions with their lists, ordered by backend_id."""
    lock = " FOR UPDATE OF l" if for_update else ""
    rows = await conn.fetch(
        f"""SELECT l.customer_id, l.promotion_id, l.product_ids, l.default_product_id,
                   l.chosen_product_ids, l.first_apply_time,
                   p.backend_id AS p_backend_id, p.name AS p_name,
                   p.description AS p_description,
                   p.max_distinct_products AS p_max_distinct_products,
                   p.lock_after_first_apply AS p_lock_after_first_apply,
                   p.create_time AS p_create_time, p.update_time AS p_update_time
              FROM customer_product_lists l
              JOIN personalized_promotions p ON p.backend_id = l.promotion_id
             WHERE l.customer_id = $1 ORDER BY l.promotion_id{lock}""", customer_id)
    return [(_promotion(row, "p_"), _list(row)) for row in rows]


async def customer_list(conn: asyncpg.Connection, customer_id: str, promotion_id: str, *,
                        for_update: bool = False) -> ProductList:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"""SELECT {_LIST_COLUMNS} FROM customer_product_lists
             WHERE customer_id = $1 AND promotion_id = $2{lock}""", customer_id, promotion_id)
    if row is None:
        raise NotFound(f"customer {customer_id!r} has no product list in personalized "
                       f"promotion {promotion_id!r}", reason="PRODUCT_LIST_NOT_FOUND",
                       metadata={"customer_id": customer_id,
                                 "personalized_promotion_id": promotion_id})
    return _list(row)


# --- product-set discounts -------------------------------------------------------------------

_DISCOUNT_COLUMNS = "discount_id, name, discount_type, value, min_basket_total, create_time"


def discount_not_found(discount_id: str) -> NotFound:
    return NotFound(f"no product-set discount with discount_id {discount_id!r}",
                    reason="PRODUCT_SET_DISCOUNT_NOT_FOUND",
                    metadata={"field": "discount_id", "discount_id": discount_id})


async def _with_sets(conn: asyncpg.Connection,
                     rows: Sequence[asyncpg.Record]) -> list[ProductSetDiscount]:
    ids = [row["discount_id"] for row in rows]
    set_rows = await conn.fetch(
        """SELECT discount_id, name, product_ids, personalized_promotion_id, required_quantity,
                  gets_discount, discounted_quantity
             FROM product_set_discount_sets WHERE discount_id = ANY($1::text[])
            ORDER BY discount_id, position""", ids)
    sets: dict[str, list[ProductSet]] = {i: [] for i in ids}
    for row in set_rows:
        sets[row["discount_id"]].append(ProductSet(
            name=row["name"], required_quantity=row["required_quantity"],
            product_ids=tuple(row["product_ids"]),
            personalized_promotion_id=row["personalized_promotion_id"],
            gets_discount=row["gets_discount"], discounted_quantity=row["discounted_quantity"]))
    return [ProductSetDiscount(
        discount_id=row["discount_id"], name=row["name"],
        discount_type=DiscountType(row["discount_type"]), value=plain(row["value"]),
        product_sets=tuple(sets[row["discount_id"]]),
        min_basket_total=_plain_or_none(row["min_basket_total"]),
        create_time=row["create_time"]) for row in rows]


def _plain_or_none(value: Decimal | None) -> Decimal | None:
    return None if value is None else plain(value)


async def _check_linked(conn: asyncpg.Connection, discount: ProductSetDiscount) -> None:
    """NOT_FOUND for a set linking a personalized promotion that does not exist; the found ones
    are key-share locked so they cannot be deleted before this transaction commits."""
    linked = sorted(set(discount.personalized_promotion_ids))
    if not linked:
        return
    found = await conn.fetch(
        """SELECT backend_id FROM personalized_promotions
            WHERE backend_id = ANY($1::text[]) FOR KEY SHARE""", linked)
    missing = sorted(set(linked) - {row["backend_id"] for row in found})
    if missing:
        field = next(f"product_sets[{i}].personalized_promotion_id"
                     for i, s in enumerate(discount.product_sets)
                     if s.personalized_promotion_id == missing[0])
        raise promotion_not_found(missing[0], field)


async def _insert_sets(conn: asyncpg.Connection, discount: ProductSetDiscount) -> None:
    sets = discount.product_sets
    await conn.execute(
        """INSERT INTO product_set_discount_sets (discount_id, position, name, product_ids,
                  personalized_promotion_id, required_quantity, gets_discount,
                  discounted_quantity)
           SELECT $1, t.position, t.name, t.product_ids::text[], t.promotion_id, t.required,
                  t.gets, t.discounted
             FROM unnest($2::smallint[], $3::text[], $4::text[], $5::text[], $6::integer[],
                         $7::boolean[], $8::integer[])
                  AS t(position, name, product_ids, promotion_id, required, gets, discounted)""",
        discount.discount_id, list(range(len(sets))), [s.name for s in sets],
        [_array_literal(s.product_ids) for s in sets],
        [s.personalized_promotion_id for s in sets], [s.required_quantity for s in sets],
        [s.gets_discount for s in sets], [s.discounted_quantity for s in sets])


async def insert_discount(conn: asyncpg.Connection,
                          discount: ProductSetDiscount) -> ProductSetDiscount:
    await _check_linked(conn, discount)
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO product_set_discounts (discount_id, name, discount_type, value,
                       min_basket_total)
                VALUES ($1, $2, $3, $4, $5) RETURNING {_DISCOUNT_COLUMNS}""",
            discount.discount_id, discount.name, discount.discount_type.value, discount.value,
            discount.min_basket_total)
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(
            f"a product-set discount with discount_id {discount.discount_id!r} already exists",
            reason="PRODUCT_SET_DISCOUNT_EXISTS",
            metadata={"discount_id": discount.discount_id}) from exc
    assert row is not None
    await _insert_sets(conn, discount)
    return (await _with_sets(conn, [row]))[0]


async def update_discount(conn: asyncpg.Connection,
                          discount: ProductSetDiscount) -> ProductSetDiscount:
    """Replace the discount's fields and all its sets."""
    await _check_linked(conn, discount)
    row = await conn.fetchrow(
        f"""UPDATE product_set_discounts SET name = $2, discount_type = $3, value = $4,
                   min_basket_total = $5
             WHERE discount_id = $1 RETURNING {_DISCOUNT_COLUMNS}""",
        discount.discount_id, discount.name, discount.discount_type.value, discount.value,
        discount.min_basket_total)
    if row is None:
        raise discount_not_found(discount.discount_id)
    await conn.execute("DELETE FROM product_set_discount_sets WHERE discount_id = $1",
                       discount.discount_id)
    await _insert_sets(conn, discount)
    return (await _with_sets(conn, [row]))[0]


async def get_discount(conn: asyncpg.Connection, discount_id: str, *,
                       for_update: bool = False) -> ProductSetDiscount:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_DISCOUNT_COLUMNS} FROM product_set_discounts WHERE discount_id = $1{lock}",
        discount_id)
    if row is None:
        raise discount_not_found(discount_id)
    return (await _with_sets(conn, [row]))[0]


async def list_discounts(conn: asyncpg.Connection, *, promotion_id: str, after_id: str | None,
                         limit: int) -> list[ProductSetDiscount]:
    """Up to ``limit`` discounts ordered by discount_id, strictly after ``after_id``."""
    rows = await conn.fetch(
        f"""SELECT {_DISCOUNT_COLUMNS} FROM product_set_discounts d
             WHERE ($1::text IS NULL OR discount_id > $1)
               AND ($2::text = '' OR EXISTS (
                    SELECT 1 FROM product_set_discount_sets s
                     WHERE s.discount_id = d.discount_id
                       AND s.personalized_promotion_id = $2))
             ORDER BY discount_id LIMIT $3""", after_id, promotion_id, limit)
    return await _with_sets(conn, rows)


async def delete_discount(conn: asyncpg.Connection, discount_id: str) -> None:
    result = await conn.execute("DELETE FROM product_set_discounts WHERE discount_id = $1",
                                discount_id)
    if result.split()[-1] == "0":
        raise discount_not_found(discount_id)


async def candidate_discounts(conn: asyncpg.Connection, product_ids: Sequence[str],
                              promotion_ids: Sequence[str]) -> list[ProductSetDiscount]:
    """The discounts that concern a basket of ``product_ids`` or a customer enrolled in
    ``promotion_ids``: a set names one of the products or links one of the promotions."""
    rows = await conn.fetch(
        f"""SELECT {_DISCOUNT_COLUMNS} FROM product_set_discounts d
             WHERE EXISTS (SELECT 1 FROM product_set_discount_sets s
                            WHERE s.discount_id = d.discount_id
                              AND (s.product_ids && $1::text[]
                                   OR s.personalized_promotion_id = ANY($2::text[])))
             ORDER BY discount_id""", list(product_ids), list(promotion_ids))
    return await _with_sets(conn, rows)


async def ensure_customers(conn: asyncpg.Connection, customer_ids: Sequence[str], *,
                           field: str) -> None:
    """NOT_FOUND naming the unknown customers (at most 10 of them)."""
    rows = await conn.fetch(
        """SELECT t.id FROM unnest($1::text[]) WITH ORDINALITY AS t(id, n)
            WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = t.id)
            ORDER BY t.n LIMIT 10""", list(customer_ids))
    if rows:
        unknown = [row["id"] for row in rows]
        noun = "customer" if len(unknown) == 1 else "customers"
        raise NotFound(f"unknown {noun}: {', '.join(repr(u) for u in unknown)}",
                       reason="CUSTOMER_NOT_FOUND",
                       metadata={"field": field, "customer_id": unknown[0]})
