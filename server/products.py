"""ProductPromotionService: personalized product promotions (seed 003), thin translation between
protobuf and core.products / storage.products.

Operators (``admin``) manage personalized promotions, product lists and product-set discounts;
promotion systems (``runtime``) read a customer's view, set selections and evaluate or apply
baskets. Every mutating call is idempotent on its request_id and runs in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from grpc import aio

from core.clock import Clock
from core.errors import FailedPrecondition, InvalidArgument
from core.money import format_decimal, parse_decimal
from core.pagination import effective_page_size
from core.products import basket
from core.products import discounts as discount_domain
from core.products import promotions as domain
from promo.v1 import products_pb2 as pb
from promo.v1 import products_pb2_grpc as pb_grpc
from server.convert import required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from storage import products as repo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProductPromotionService"].full_name
_ADMIN_METHODS = (
    "CreatePersonalizedPromotion", "GetPersonalizedPromotion", "ListPersonalizedPromotions",
    "UpdatePersonalizedPromotion", "DeletePersonalizedPromotion", "AssignProductLists",
    "RemoveProductLists", "ListProductLists", "CreateProductSetDiscount",
    "GetProductSetDiscount", "ListProductSetDiscounts", "UpdateProductSetDiscount",
    "DeleteProductSetDiscount")
_RUNTIME_METHODS = ("GetCustomerProductPromotions", "SelectProducts", "EvaluateBasket",
                    "ApplyBasket")
ROLES = {**{f"/{SERVICE_NAME}/{m}": {"admin"} for m in _ADMIN_METHODS},
         **{f"/{SERVICE_NAME}/{m}": {"runtime"} for m in _RUNTIME_METHODS}}

_TYPE_FROM_PB = {pb.DISCOUNT_TYPE_PERCENTAGE_OFF: discount_domain.DiscountType.PERCENTAGE_OFF,
                 pb.DISCOUNT_TYPE_AMOUNT_OFF: discount_domain.DiscountType.AMOUNT_OFF,
                 pb.DISCOUNT_TYPE_FIXED_PRICE: discount_domain.DiscountType.FIXED_PRICE}
_TYPE_TO_PB = {v: k for k, v in _TYPE_FROM_PB.items()}


# --- protobuf <-> core -----------------------------------------------------------------------

def promotion_to_domain(message: pb.PersonalizedPromotion) -> domain.PersonalizedPromotion:
    return domain.PersonalizedPromotion(
        backend_id=message.backend_id, name=message.name, description=message.description,
        max_distinct_products=message.max_distinct_products or None,
        lock_after_first_apply=message.lock_after_first_apply)


def promotion_to_pb(value: domain.PersonalizedPromotion) -> pb.PersonalizedPromotion:
    return pb.PersonalizedPromotion(
        backend_id=value.backend_id, name=value.name, description=value.description,
        max_distinct_products=value.max_distinct_products or 0,
        lock_after_first_apply=value.lock_after_first_apply,
        create_time=timestamp(value.create_time), update_time=timestamp(value.update_time))


def entry_to_pb(promotion: domain.PersonalizedPromotion,
                product_list: domain.ProductList) -> pb.CustomerProductPromotion:
    return pb.CustomerProductPromotion(
        personalized_promotion=promotion_to_pb(promotion),
        product_ids=product_list.product_ids,
        default_product_id=product_list.default_product_id,
        chosen_product_ids=product_list.chosen_product_ids or (),
        selected_product_ids=product_list.selected_product_ids,
        first_apply_time=timestamp(product_list.first_apply_time),
        selection_locked=domain.is_locked(promotion, product_list),
        customer_id=product_list.customer_id)


def discount_to_domain(message: pb.ProductSetDiscount) -> discount_domain.ProductSetDiscount:
    discount_type = _TYPE_FROM_PB.get(message.discount_type)
    if discount_type is None:
        raise InvalidArgument(
            "discount_type is required: DISCOUNT_TYPE_PERCENTAGE_OFF, DISCOUNT_TYPE_AMOUNT_OFF "
            "or DISCOUNT_TYPE_FIXED_PRICE", reason="INVALID_DISCOUNT_TYPE",
            metadata={"field": "discount_type"})
    value = parse_decimal(message.value, field="value")
    assert value is not None
    return discount_domain.ProductSetDiscount(
        discount_id=message.discount_id, name=message.name, discount_type=discount_type,
        value=value,
        min_basket_total=parse_decimal(message.min_basket_total, field="min_basket_total",
                                       allow_empty=True),
        product_sets=tuple(discount_domain.ProductSet(
            name=s.name, required_quantity=s.required_quantity,
            product_ids=tuple(s.product_ids),
            personalized_promotion_id=s.personalized_promotion_id or None,
            gets_discount=s.gets_discount, discounted_quantity=s.discounted_quantity)
            for s in message.product_sets))


def discount_to_pb(value: discount_domain.ProductSetDiscount) -> pb.ProductSetDiscount:
    return pb.ProductSetDiscount(
        discount_id=value.discount_id, name=value.name,
        discount_type=_TYPE_TO_PB[value.discount_type], value=format_decimal(value.value),
        min_basket_total=format_decimal(value.min_basket_total),
        create_time=timestamp(value.create_time),
        product_sets=[pb.ProductSet(
            name=s.name, product_ids=s.product_ids,
            personalized_promotion_id=s.personalized_promotion_id or "",
            required_quantity=s.required_quantity, gets_discount=s.gets_discount,
            discounted_quantity=s.discounted_quantity) for s in value.product_sets])


def lines_to_domain(lines: Sequence[pb.BasketLine]) -> tuple[basket.BasketLine, ...]:
    return basket.validate_lines([
        basket.RawLine(product_id=line.product_id, quantity=line.quantity,
                       unit_price=line.unit_price) for line in lines])


def evaluation_to_pb(value: basket.Evaluation) -> pb.BasketEvaluation:
    return pb.BasketEvaluation(
        discount_lines=[pb.DiscountLine(
            discount_id=line.discount_id, line_index=line.line_index,
            product_id=line.product_id, quantity=line.quantity,
            amount=basket.money(line.amount)) for line in value.discount_lines],
        outcomes=[pb.DiscountOutcome(
            discount_id=o.discount_id, applied=o.applied, amount=basket.money(o.amount),
            explanation=o.explanation) for o in value.outcomes],
        basket_total=basket.money(value.basket_total),
        discount_total=basket.money(value.discount_total),
        total_after_discounts=basket.money(value.total_after_discounts))


def _customer_id(value: str) -> str:
    if not value:
        raise InvalidArgument("customer_id is required", reason="MISSING_FIELD",
                              metadata={"field": "customer_id"})
    return value


def _promotion_id(value: str) -> str:
    if not value:
        raise InvalidArgument("personalized_promotion_id is required", reason="MISSING_FIELD",
                              metadata={"field": "personalized_promotion_id"})
    return domain.validate_backend_id(value, field="personalized_promotion_id")


async def _evaluate(conn: asyncpg.Connection, customer_id: str,
                    lines: tuple[basket.BasketLine, ...], *, for_update: bool,
                    ) -> tuple[basket.Evaluation,
                               list[tuple[domain.PersonalizedPromotion, domain.ProductList]]]:
    await repo.ensure_customers(conn, [customer_id], field="customer_id")
    enrolled = await repo.customer_promotions(conn, customer_id, for_update=for_update)
    selections = {p.backend_id: lst.selected_product_ids for p, lst in enrolled}
    discounts = await repo.candidate_discounts(
        conn, sorted({line.product_id for line in lines}), sorted(selections))
    return basket.evaluate(discounts, selections, lines), enrolled


# --- the service -----------------------------------------------------------------------------

class ProductPromotionServicer(pb_grpc.ProductPromotionServiceServicer):
    def __init__(self, pool: asyncpg.Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    # personalized promotions

    async def CreatePersonalizedPromotion(
            self, request: pb.CreatePersonalizedPromotionRequest,
            context: aio.ServicerContext) -> pb.CreatePersonalizedPromotionResponse:
        promotion = domain.validate_promotion(
            promotion_to_domain(request.personalized_promotion))

        async def work(conn: asyncpg.Connection) -> bytes:
            created = await repo.insert_promotion(conn, promotion)
            return pb.CreatePersonalizedPromotionResponse(
                personalized_promotion=promotion_to_pb(created)).SerializeToString()

        raw = await run_request_once(self._pool, "CreatePersonalizedPromotion", request, work)
        return pb.CreatePersonalizedPromotionResponse.FromString(raw)

    async def GetPersonalizedPromotion(
            self, request: pb.GetPersonalizedPromotionRequest,
            context: aio.ServicerContext) -> pb.GetPersonalizedPromotionResponse:
        required_id(request.backend_id, "backend_id")
        async with self._pool.acquire() as conn:
            found = await repo.get_promotion(conn, request.backend_id)
        return pb.GetPersonalizedPromotionResponse(personalized_promotion=promotion_to_pb(found))

    async def ListPersonalizedPromotions(
            self, request: pb.ListPersonalizedPromotionsRequest,
            context: aio.ServicerContext) -> pb.ListPersonalizedPromotionsResponse:
        size = effective_page_size(request.page_size)
        lock = (request.lock_after_first_apply if request.HasField("lock_after_first_apply")
                else None)
        filters = {"search": request.search, "lock": lock}
        cursor = decode_page_token(request.page_token, filters, key=(str,))
        async with self._pool.acquire() as conn:
            rows = await repo.list_promotions(
                conn, search=request.search, lock_after_first_apply=lock,
                after_id=str(cursor.after[0]) if cursor else None, limit=size + 1)
        page, promotions, more = fit_page(rows[:size], len(rows) > size, promotion_to_pb)
        token = encode_page_token([page[-1].backend_id], filters) if more else ""
        return pb.ListPersonalizedPromotionsResponse(
            personalized_promotions=promotions, next_page_token=token)

    async def UpdatePersonalizedPromotion(
            self, request: pb.UpdatePersonalizedPromotionRequest,
            context: aio.ServicerContext) -> pb.UpdatePersonalizedPromotionResponse:
        required_id(request.personalized_promotion.backend_id,
                    "personalized_promotion.backend_id")
        paths = list(request.update_mask.paths)
        patch = promotion_to_domain(request.personalized_promotion)

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await repo.get_promotion(conn, patch.backend_id, for_update=True)
            updated = domain.apply_update(current, patch, paths)
            maximum = updated.max_distinct_products
            if maximum is not None and maximum != current.max_distinct_products:
                largest = await repo.largest_choice(conn, updated.backend_id)
                if largest > maximum:
                    raise FailedPrecondition(
                        f"max_distinct_products cannot go down to {maximum}: a customer has "
                        f"chosen {largest} products in personalized promotion "
                        f"{updated.backend_id!r}", reason="SELECTIONS_EXCEED_MAXIMUM",
                        metadata={"field": "max_distinct_products"})
            saved = await repo.update_promotion(conn, updated)
            return pb.UpdatePersonalizedPromotionResponse(
                personalized_promotion=promotion_to_pb(saved)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdatePersonalizedPromotion", request, work)
        return pb.UpdatePersonalizedPromotionResponse.FromString(raw)

    async def DeletePersonalizedPromotion(
            self, request: pb.DeletePersonalizedPromotionRequest,
            context: aio.ServicerContext) -> pb.DeletePersonalizedPromotionResponse:
        required_id(request.backend_id, "backend_id")
        async def work(conn: asyncpg.Connection) -> bytes:
            lists = await repo.delete_promotion(conn, request.backend_id)
            return pb.DeletePersonalizedPromotionResponse(
                deleted_product_lists=lists).SerializeToString()

        raw = await run_request_once(self._pool, "DeletePersonalizedPromotion", request, work)
        return pb.DeletePersonalizedPromotionResponse.FromString(raw)

    # product lists

    async def AssignProductLists(self, request: pb.AssignProductListsRequest,
                                 context: aio.ServicerContext) -> pb.AssignProductListsResponse:
        promotion_id = _promotion_id(request.personalized_promotion_id)
        customer_ids = domain.validate_customer_ids(request.customer_ids)
        assignment = domain.validate_assignment(request.product_ids, request.default_product_id)

        async def work(conn: asyncpg.Connection) -> bytes:
            await repo.get_promotion(conn, promotion_id, field="personalized_promotion_id")
            await repo.ensure_customers(conn, customer_ids, field="customer_ids")
            # New lists first (waiting for any created concurrently), then the others locked
            # and changed from what they hold now: a choice or first apply recorded meanwhile
            # is kept, and each customer counts once as created or replaced.
            created = await repo.create_lists(conn, [
                domain.reassign(None, promotion_id, c, assignment) for c in customer_ids])
            existing = [c for c in customer_ids if c not in created]
            current = await repo.lists_for_update(conn, promotion_id, existing)
            await repo.save_lists(conn, [
                domain.reassign(current.get(c), promotion_id, c, assignment)
                for c in existing])
            return pb.AssignProductListsResponse(
                created_count=len(customer_ids) - len(current),
                replaced_count=len(current)).SerializeToString()

        raw = await run_request_once(self._pool, "AssignProductLists", request, work)
        return pb.AssignProductListsResponse.FromString(raw)

    async def RemoveProductLists(self, request: pb.RemoveProductListsRequest,
                                 context: aio.ServicerContext) -> pb.RemoveProductListsResponse:
        promotion_id = _promotion_id(request.personalized_promotion_id)
        customer_ids = domain.validate_customer_ids(request.customer_ids)

        async def work(conn: asyncpg.Connection) -> bytes:
            await repo.get_promotion(conn, promotion_id, field="personalized_promotion_id")
            removed = await repo.delete_lists(conn, promotion_id, customer_ids)
            return pb.RemoveProductListsResponse(removed_count=removed).SerializeToString()

        raw = await run_request_once(self._pool, "RemoveProductLists", request, work)
        return pb.RemoveProductListsResponse.FromString(raw)

    async def ListProductLists(self, request: pb.ListProductListsRequest,
                               context: aio.ServicerContext) -> pb.ListProductListsResponse:
        promotion_id = _promotion_id(request.personalized_promotion_id)
        size = effective_page_size(request.page_size)
        filters = {"promotion": promotion_id}
        cursor = decode_page_token(request.page_token, filters, key=(str,))
        async with self._pool.acquire() as conn:
            promotion = await repo.get_promotion(conn, promotion_id,
                                                 field="personalized_promotion_id")
            rows = await repo.list_lists(conn, promotion_id,
                                         after_id=str(cursor.after[0]) if cursor else None,
                                         limit=size + 1)
        page, lists, more = fit_page(rows[:size], len(rows) > size,
                                     lambda lst: entry_to_pb(promotion, lst))
        token = encode_page_token([page[-1].customer_id], filters) if more else ""
        return pb.ListProductListsResponse(product_lists=lists, next_page_token=token)

    # product-set discounts

    async def CreateProductSetDiscount(
            self, request: pb.CreateProductSetDiscountRequest,
            context: aio.ServicerContext) -> pb.CreateProductSetDiscountResponse:
        discount = discount_domain.validate_discount(
            discount_to_domain(request.product_set_discount))

        async def work(conn: asyncpg.Connection) -> bytes:
            created = await repo.insert_discount(conn, discount)
            return pb.CreateProductSetDiscountResponse(
                product_set_discount=discount_to_pb(created)).SerializeToString()

        raw = await run_request_once(self._pool, "CreateProductSetDiscount", request, work)
        return pb.CreateProductSetDiscountResponse.FromString(raw)

    async def GetProductSetDiscount(
            self, request: pb.GetProductSetDiscountRequest,
            context: aio.ServicerContext) -> pb.GetProductSetDiscountResponse:
        required_id(request.discount_id, "discount_id")
        async with self._pool.acquire() as conn:
            found = await repo.get_discount(conn, request.discount_id)
        return pb.GetProductSetDiscountResponse(product_set_discount=discount_to_pb(found))

    async def ListProductSetDiscounts(
            self, request: pb.ListProductSetDiscountsRequest,
            context: aio.ServicerContext) -> pb.ListProductSetDiscountsResponse:
        size = effective_page_size(request.page_size)
        filters = {"promotion": request.personalized_promotion_id}
        cursor = decode_page_token(request.page_token, filters, key=(str,))
        async with self._pool.acquire() as conn:
            rows = await repo.list_discounts(
                conn, promotion_id=request.personalized_promotion_id,
                after_id=str(cursor.after[0]) if cursor else None, limit=size + 1)
        page, discounts, more = fit_page(rows[:size], len(rows) > size, discount_to_pb)
        token = encode_page_token([page[-1].discount_id], filters) if more else ""
        return pb.ListProductSetDiscountsResponse(product_set_discounts=discounts,
                                                  next_page_token=token)

    async def UpdateProductSetDiscount(
            self, request: pb.UpdateProductSetDiscountRequest,
            context: aio.ServicerContext) -> pb.UpdateProductSetDiscountResponse:
        required_id(request.product_set_discount.discount_id, "product_set_discount.discount_id")
        paths = discount_domain.check_update_mask(request.update_mask.paths)

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await repo.get_discount(conn, request.product_set_discount.discount_id,
                                              for_update=True)
            merged = discount_to_pb(current)
            for path in paths:
                if path == "product_sets":
                    del merged.product_sets[:]
                    merged.product_sets.extend(request.product_set_discount.product_sets)
                else:
                    setattr(merged, path, getattr(request.product_set_discount, path))
            updated = discount_domain.apply_update(current, discount_to_domain(merged), paths)
            saved = await repo.update_discount(conn, updated)
            return pb.UpdateProductSetDiscountResponse(
                product_set_discount=discount_to_pb(saved)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdateProductSetDiscount", request, work)
        return pb.UpdateProductSetDiscountResponse.FromString(raw)

    async def DeleteProductSetDiscount(
            self, request: pb.DeleteProductSetDiscountRequest,
            context: aio.ServicerContext) -> pb.DeleteProductSetDiscountResponse:
        required_id(request.discount_id, "discount_id")
        async def work(conn: asyncpg.Connection) -> bytes:
            await repo.delete_discount(conn, request.discount_id)
            return pb.DeleteProductSetDiscountResponse().SerializeToString()

        raw = await run_request_once(self._pool, "DeleteProductSetDiscount", request, work)
        return pb.DeleteProductSetDiscountResponse.FromString(raw)

    # the customer's side

    async def GetCustomerProductPromotions(
            self, request: pb.GetCustomerProductPromotionsRequest,
            context: aio.ServicerContext) -> pb.GetCustomerProductPromotionsResponse:
        customer_id = _customer_id(request.customer_id)
        async with self._pool.acquire() as conn:
            await repo.ensure_customers(conn, [customer_id], field="customer_id")
            enrolled = await repo.customer_promotions(conn, customer_id)
        return pb.GetCustomerProductPromotionsResponse(
            promotions=[entry_to_pb(p, lst) for p, lst in enrolled])

    async def SelectProducts(self, request: pb.SelectProductsRequest,
                             context: aio.ServicerContext) -> pb.SelectProductsResponse:
        customer_id = _customer_id(request.customer_id)
        promotion_id = _promotion_id(request.personalized_promotion_id)

        async def work(conn: asyncpg.Connection) -> bytes:
            await repo.ensure_customers(conn, [customer_id], field="customer_id")
            # An unknown promotion is reported before a missing list.
            await repo.get_promotion(conn, promotion_id, field="personalized_promotion_id")
            current = await repo.customer_list(conn, customer_id, promotion_id, for_update=True)
            # Read again FOR SHARE once the list row is ours (waiting for it may take a while):
            # the maximum checked is the one committed now, and UpdatePersonalizedPromotion
            # (FOR UPDATE) waits for this selection before it counts the customers' choices.
            # The list row first, then the promotion: the order delete_promotion locks in too.
            promotion = await repo.get_promotion(conn, promotion_id, for_share=True,
                                                 field="personalized_promotion_id")
            updated = domain.select(promotion, current, request.product_ids)
            if updated != current:
                await repo.save_lists(conn, [updated])
            return pb.SelectProductsResponse(
                promotion=entry_to_pb(promotion, updated)).SerializeToString()

        raw = await run_request_once(self._pool, "SelectProducts", request, work)
        return pb.SelectProductsResponse.FromString(raw)

    async def EvaluateBasket(self, request: pb.EvaluateBasketRequest,
                             context: aio.ServicerContext) -> pb.EvaluateBasketResponse:
        customer_id = _customer_id(request.customer_id)
        lines = lines_to_domain(request.lines)
        async with self._pool.acquire() as conn:
            evaluation, _ = await _evaluate(conn, customer_id, lines, for_update=False)
        return pb.EvaluateBasketResponse(evaluation=evaluation_to_pb(evaluation))

    async def ApplyBasket(self, request: pb.ApplyBasketRequest,
                          context: aio.ServicerContext) -> pb.ApplyBasketResponse:
        customer_id = _customer_id(request.customer_id)
        lines = lines_to_domain(request.lines)

        async def work(conn: asyncpg.Connection) -> bytes:
            evaluation, enrolled = await _evaluate(conn, customer_id, lines, for_update=True)
            applied = set(evaluation.applied_promotion_ids)
            now = self._clock.now()
            first = [domain.record_first_apply(p, lst, now) for p, lst in enrolled
                     if p.backend_id in applied and lst.first_apply_time is None]
            if first:
                await repo.save_lists(conn, first)
            return pb.ApplyBasketResponse(
                evaluation=evaluation_to_pb(evaluation),
                first_applied_promotion_ids=[lst.promotion_id for lst in first],
            ).SerializeToString()

        raw = await run_request_once(self._pool, "ApplyBasket", request, work)
        return pb.ApplyBasketResponse.FromString(raw)


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_ProductPromotionServiceServicer_to_server(
        ProductPromotionServicer(deps.pool, deps.clock), server)
