"""ProductPromotionService through a real server (seed 003): personalized promotions, product
lists per customer, selections, product-set discounts and basket evaluation."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import products_pb2 as pb
from promo.v1 import products_pb2_grpc as pb_grpc
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)  # the clock fixture's time


def stub(api: Api) -> pb_grpc.ProductPromotionServiceStub:
    return pb_grpc.ProductPromotionServiceStub(api.channel)


def rid() -> str:
    return uuid.uuid4().hex


async def customers(api: Api, *ids: str) -> None:
    await cpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(
        cpb.UpsertCustomersRequest(request_id=rid(), customers=[
            cpb.Customer(customer_id=i) for i in ids]), metadata=api.key("runtime"))


async def personalized(api: Api, backend_id: str = "coffee", *, max_distinct: int = 0,
                       lock: bool = False, name: str = "Your coffee") -> pb.PersonalizedPromotion:
    response = await stub(api).CreatePersonalizedPromotion(
        pb.CreatePersonalizedPromotionRequest(
            request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                backend_id=backend_id, name=name, description="Pick your coffee",
                max_distinct_products=max_distinct, lock_after_first_apply=lock)),
        metadata=api.key())
    return response.personalized_promotion


async def assign(api: Api, customer_ids: list[str], products: list[str], default: str = "",
                 promotion: str = "coffee") -> pb.AssignProductListsResponse:
    return await stub(api).AssignProductLists(pb.AssignProductListsRequest(
        request_id=rid(), personalized_promotion_id=promotion, customer_ids=customer_ids,
        product_ids=products, default_product_id=default), metadata=api.key())


async def breakfast_discount(api: Api, *, discount_type: int = pb.DISCOUNT_TYPE_PERCENTAGE_OFF,
                             value: str = "50", discount_id: str = "breakfast",
                             min_basket_total: str = "") -> pb.ProductSetDiscount:
    """Seed 003's example: two products from the unmarked set unlock a discount on one product
    of the personalized set, which is marked as the set that gets the discount."""
    response = await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id=discount_id, name="Breakfast deal", discount_type=discount_type,
            value=value, min_basket_total=min_basket_total, product_sets=[
                pb.ProductSet(name="Breakfast basics", product_ids=["bread", "butter"],
                              required_quantity=2),
                pb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                              required_quantity=1, gets_discount=True,
                              discounted_quantity=1)])), metadata=api.key())
    return response.product_set_discount


def line(product: str, quantity: int, price: str) -> pb.BasketLine:
    return pb.BasketLine(product_id=product, quantity=quantity, unit_price=price)


BASKET = [line("bread", 1, "2.50"), line("butter", 1, "3.20"), line("espresso", 2, "7.99")]


async def evaluate(api: Api, customer: str, lines: list[pb.BasketLine]) -> pb.BasketEvaluation:
    response = await stub(api).EvaluateBasket(
        pb.EvaluateBasketRequest(customer_id=customer, lines=lines), metadata=api.key("runtime"))
    return response.evaluation


async def apply(api: Api, customer: str, lines: list[pb.BasketLine],
                request_id: str | None = None) -> pb.ApplyBasketResponse:
    return await stub(api).ApplyBasket(pb.ApplyBasketRequest(
        request_id=request_id or rid(), customer_id=customer, lines=lines),
        metadata=api.key("runtime"))


async def select(api: Api, customer: str, products: list[str],
                 promotion: str = "coffee") -> pb.CustomerProductPromotion:
    response = await stub(api).SelectProducts(pb.SelectProductsRequest(
        request_id=rid(), customer_id=customer, personalized_promotion_id=promotion,
        product_ids=products), metadata=api.key("runtime"))
    return response.promotion


async def view(api: Api, customer: str) -> list[pb.CustomerProductPromotion]:
    response = await stub(api).GetCustomerProductPromotions(
        pb.GetCustomerProductPromotionsRequest(customer_id=customer), metadata=api.key("runtime"))
    return list(response.promotions)


def field_of(exc: grpc.RpcError) -> str:
    info = error_info_of(exc)
    assert info is not None
    return info.metadata.get("field", "")


# --- personalized promotions -----------------------------------------------------------------

async def test_create_get_update_list_with_filters_and_pages(api: Api) -> None:
    created = await personalized(api, "coffee", max_distinct=2, lock=True)
    assert (created.backend_id, created.name, created.max_distinct_products,
            created.lock_after_first_apply) == ("coffee", "Your coffee", 2, True)
    assert created.create_time.seconds > 0
    got = await stub(api).GetPersonalizedPromotion(
        pb.GetPersonalizedPromotionRequest(backend_id="coffee"), metadata=api.key())
    assert got.personalized_promotion == created

    updated = await stub(api).UpdatePersonalizedPromotion(pb.UpdatePersonalizedPromotionRequest(
        request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
            backend_id="coffee", name="Coffee of the month", max_distinct_products=0),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "max_distinct_products"])),
        metadata=api.key())
    promotion = updated.personalized_promotion
    assert (promotion.name, promotion.max_distinct_products, promotion.lock_after_first_apply,
            promotion.description) == ("Coffee of the month", 0, True, "Pick your coffee")

    for backend_id, name in (("tea", "Your tea"), ("snack-1", "Snacks"), ("snack-2", "Snacks")):
        await personalized(api, backend_id, name=name)
    service = stub(api)
    everything = await service.ListPersonalizedPromotions(
        pb.ListPersonalizedPromotionsRequest(), metadata=api.key())
    assert [p.backend_id for p in everything.personalized_promotions] == [
        "coffee", "snack-1", "snack-2", "tea"]
    searched = await service.ListPersonalizedPromotions(
        pb.ListPersonalizedPromotionsRequest(search="SNACK"), metadata=api.key())
    assert [p.backend_id for p in searched.personalized_promotions] == ["snack-1", "snack-2"]
    locking = await service.ListPersonalizedPromotions(
        pb.ListPersonalizedPromotionsRequest(lock_after_first_apply=True), metadata=api.key())
    assert [p.backend_id for p in locking.personalized_promotions] == ["coffee"]
    not_locking = await service.ListPersonalizedPromotions(
        pb.ListPersonalizedPromotionsRequest(lock_after_first_apply=False), metadata=api.key())
    assert len(not_locking.personalized_promotions) == 3

    seen: list[str] = []
    token = ""
    while True:
        page = await service.ListPersonalizedPromotions(
            pb.ListPersonalizedPromotionsRequest(page_size=3, page_token=token),
            metadata=api.key())
        seen += [p.backend_id for p in page.personalized_promotions]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["coffee", "snack-1", "snack-2", "tea"]
    with pytest.raises(grpc.RpcError) as err:
        await service.ListPersonalizedPromotions(pb.ListPersonalizedPromotionsRequest(
            page_size=1, search="x", page_token=(await service.ListPersonalizedPromotions(
                pb.ListPersonalizedPromotionsRequest(page_size=1),
                metadata=api.key())).next_page_token), metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"


async def test_promotion_errors(api: Api) -> None:
    await personalized(api)
    service = stub(api)
    with pytest.raises(grpc.RpcError) as err:
        await personalized(api)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_error_reason(err.value) == "PERSONALIZED_PROMOTION_EXISTS"
    with pytest.raises(grpc.RpcError) as err:
        await service.GetPersonalizedPromotion(
            pb.GetPersonalizedPromotionRequest(backend_id="nope"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no personalized promotion with backend_id 'nope'"
    with pytest.raises(grpc.RpcError) as err:
        await personalized(api, "other", max_distinct=-2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == "max_distinct_products"
    with pytest.raises(grpc.RpcError) as err:
        await personalized(api, "has space")
    assert rpc_error_reason(err.value) == "INVALID_BACKEND_ID"


async def test_delete_is_refused_while_a_discount_uses_the_promotion(api: Api) -> None:
    await customers(api, "c1", "c2")
    await personalized(api)
    await assign(api, ["c1", "c2"], ["espresso", "latte"])
    await breakfast_discount(api)
    service = stub(api)
    with pytest.raises(grpc.RpcError) as err:
        await service.DeletePersonalizedPromotion(pb.DeletePersonalizedPromotionRequest(
            request_id=rid(), backend_id="coffee"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "PERSONALIZED_PROMOTION_IN_USE"
    assert err.value.details() == ("personalized promotion 'coffee' is used by product-set "
                                   "discounts: breakfast; delete those discounts first")
    assert len(await view(api, "c1")) == 1

    await service.DeleteProductSetDiscount(pb.DeleteProductSetDiscountRequest(
        request_id=rid(), discount_id="breakfast"), metadata=api.key())
    deleted = await service.DeletePersonalizedPromotion(pb.DeletePersonalizedPromotionRequest(
        request_id=rid(), backend_id="coffee"), metadata=api.key())
    assert deleted.deleted_product_lists == 2
    assert await view(api, "c1") == []
    with pytest.raises(grpc.RpcError) as err:
        await service.DeletePersonalizedPromotion(pb.DeletePersonalizedPromotionRequest(
            request_id=rid(), backend_id="coffee"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_lowering_max_below_a_customers_choice_is_refused(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api, max_distinct=3)
    await assign(api, ["c1"], ["a", "b", "c"])
    await select(api, "c1", ["a", "b", "c"])
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).UpdatePersonalizedPromotion(pb.UpdatePersonalizedPromotionRequest(
            request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                backend_id="coffee", max_distinct_products=2),
            update_mask=field_mask_pb2.FieldMask(paths=["max_distinct_products"])),
            metadata=api.key())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == ("max_distinct_products cannot go down to 2: a customer has "
                                   "chosen 3 products in personalized promotion 'coffee'")


# --- product lists and the customer's view ---------------------------------------------------

async def test_assign_in_bulk_replace_remove_and_the_customer_view(api: Api) -> None:
    await customers(api, "c1", "c2", "c3")
    await personalized(api, lock=True)
    await personalized(api, "tea", name="Your tea")
    first = await assign(api, ["c1", "c2", "c3"], ["espresso", "latte", "mocha"], "latte")
    assert (first.created_count, first.replaced_count) == (3, 0)
    await assign(api, ["c1"], ["green", "black"], promotion="tea")

    (coffee, tea) = await view(api, "c1")
    assert coffee.personalized_promotion.backend_id == "coffee"
    assert list(coffee.product_ids) == ["espresso", "latte", "mocha"]
    assert coffee.default_product_id == "latte"
    assert list(coffee.chosen_product_ids) == []
    assert list(coffee.selected_product_ids) == ["latte"]
    assert not coffee.HasField("first_apply_time") and not coffee.selection_locked
    assert tea.default_product_id == "green"  # no default given: the first of the list

    await select(api, "c1", ["mocha", "espresso"])
    replaced = await assign(api, ["c1", "c2"], ["mocha", "cortado"])
    assert (replaced.created_count, replaced.replaced_count) == (0, 2)
    (coffee, _) = await view(api, "c1")
    assert list(coffee.product_ids) == ["mocha", "cortado"]
    assert list(coffee.chosen_product_ids) == ["mocha"]  # espresso left the list
    assert (await view(api, "c2"))[0].selected_product_ids == ["mocha"]

    removed = await stub(api).RemoveProductLists(pb.RemoveProductListsRequest(
        request_id=rid(), personalized_promotion_id="coffee", customer_ids=["c1", "c3", "c2"]),
        metadata=api.key())
    assert removed.removed_count == 3
    assert [p.personalized_promotion.backend_id for p in await view(api, "c1")] == ["tea"]
    assert await view(api, "c2") == []


async def test_assignment_is_all_or_nothing(api: Api, pool: asyncpg.Pool) -> None:
    await customers(api, "c1")
    await personalized(api)
    service = stub(api)
    cases = [
        (pb.AssignProductListsRequest(personalized_promotion_id="coffee",
                                      customer_ids=["c1", "ghost"], product_ids=["a"]),
         grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "customer_ids",
         "unknown customer: 'ghost'"),
        (pb.AssignProductListsRequest(personalized_promotion_id="nope", customer_ids=["c1"],
                                      product_ids=["a"]),
         grpc.StatusCode.NOT_FOUND, "PERSONALIZED_PROMOTION_NOT_FOUND",
         "personalized_promotion_id", "no personalized promotion with backend_id 'nope'"),
        (pb.AssignProductListsRequest(personalized_promotion_id="coffee", customer_ids=["c1"],
                                      product_ids=["a", "b"], default_product_id="z"),
         grpc.StatusCode.INVALID_ARGUMENT, "DEFAULT_PRODUCT_NOT_ON_LIST", "default_product_id",
         "default_product_id 'z' is not on the list"),
        (pb.AssignProductListsRequest(personalized_promotion_id="coffee", customer_ids=["c1"],
                                      product_ids=[]),
         grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_PRODUCT_LIST", "product_ids",
         "product_ids must name at least one product"),
    ]
    for request, code, reason, field, fragment in cases:
        request.request_id = rid()
        with pytest.raises(grpc.RpcError) as err:
            await service.AssignProductLists(request, metadata=api.key())
        assert (err.value.code(), rpc_error_reason(err.value)) == (code, reason)
        assert field_of(err.value) == field
        assert fragment in (err.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM customer_product_lists") == 0


# --- selection -------------------------------------------------------------------------------

async def test_default_product_is_selected_when_nothing_was_chosen(api: Api) -> None:
    await customers(api, "c1", "c2")
    await personalized(api)
    await assign(api, ["c1"], ["latte", "espresso"], default="espresso")
    await assign(api, ["c2"], ["latte", "espresso"])
    await breakfast_discount(api)
    (entry,) = await view(api, "c1")
    assert list(entry.selected_product_ids) == ["espresso"]
    evaluation = await evaluate(api, "c1", BASKET)
    assert [(d.product_id, d.amount) for d in evaluation.discount_lines] == [("espresso", "4.00")]
    # c2 has no named default: the first product of the list (latte) is selected.
    (entry,) = await view(api, "c2")
    assert list(entry.selected_product_ids) == ["latte"]
    assert [o.applied for o in (await evaluate(api, "c2", BASKET)).outcomes] == [False]
    # Choosing and then clearing the choice brings the default back.
    assert list((await select(api, "c1", ["latte"])).selected_product_ids) == ["latte"]
    cleared = await select(api, "c1", [])
    assert (list(cleared.chosen_product_ids), list(cleared.selected_product_ids)) == (
        [], ["espresso"])


async def test_max_distinct_products(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api, max_distinct=2)
    await personalized(api, "all", name="All of the list")
    await assign(api, ["c1"], ["a", "b", "c"])
    await assign(api, ["c1"], ["a", "b", "c"], promotion="all")
    assert list((await select(api, "c1", ["c", "a"])).selected_product_ids) == ["c", "a"]
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "c1", ["a", "b", "c"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "TOO_MANY_PRODUCTS_SELECTED"
    assert err.value.details() == ("personalized promotion 'coffee' allows at most 2 distinct "
                                   "products, 3 were selected")
    assert list((await view(api, "c1"))[1].chosen_product_ids) == ["c", "a"]  # unchanged
    # 0 (empty) means all of the list.
    assert len((await select(api, "c1", ["a", "b", "c"], promotion="all")).chosen_product_ids) \
        == 3


async def test_selection_bad_input(api: Api) -> None:
    await customers(api, "c1", "c2")
    await personalized(api)
    await assign(api, ["c1"], ["a", "b"])
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "c1", ["a", "zzz"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "PRODUCT_NOT_ON_LIST"
    assert field_of(err.value) == "product_ids[1]"
    assert err.value.details() == ("product_ids[1]: product 'zzz' is not on the customer's list "
                                   "in personalized promotion 'coffee'")
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "ghost", ["a"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(err.value) == "CUSTOMER_NOT_FOUND"
    assert field_of(err.value) == "customer_id"
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "c2", ["a"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(err.value) == "PRODUCT_LIST_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as err:
        await view(api, "ghost")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "unknown customer: 'ghost'"


# --- discounts and baskets -------------------------------------------------------------------

async def test_discount_create_get_list_and_validation(api: Api) -> None:
    await personalized(api)
    created = await breakfast_discount(api, min_basket_total="10.00")
    assert created.value == "50" and created.min_basket_total == "10"
    assert [s.personalized_promotion_id for s in created.product_sets] == ["", "coffee"]
    service = stub(api)
    got = await service.GetProductSetDiscount(
        pb.GetProductSetDiscountRequest(discount_id="breakfast"), metadata=api.key())
    assert got.product_set_discount == created
    await breakfast_discount(api, discount_id="brunch", discount_type=pb.DISCOUNT_TYPE_FIXED_PRICE,
                             value="1.99")
    listed = await service.ListProductSetDiscounts(
        pb.ListProductSetDiscountsRequest(page_size=1), metadata=api.key())
    assert [d.discount_id for d in listed.product_set_discounts] == ["breakfast"]
    rest = await service.ListProductSetDiscounts(
        pb.ListProductSetDiscountsRequest(page_size=1, page_token=listed.next_page_token),
        metadata=api.key())
    assert [d.discount_id for d in rest.product_set_discounts] == ["brunch"]
    assert rest.next_page_token == ""
    by_promotion = await service.ListProductSetDiscounts(
        pb.ListProductSetDiscountsRequest(personalized_promotion_id="tea"), metadata=api.key())
    assert list(by_promotion.product_set_discounts) == []

    with pytest.raises(grpc.RpcError) as err:
        await service.CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
            request_id=rid(), product_set_discount=pb.ProductSetDiscount(
                discount_id="x", name="X", discount_type=pb.DISCOUNT_TYPE_AMOUNT_OFF, value="1",
                product_sets=[pb.ProductSet(name="P", personalized_promotion_id="nope",
                                            required_quantity=1, gets_discount=True,
                                            discounted_quantity=1)])), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert field_of(err.value) == "product_sets[0].personalized_promotion_id"
    with pytest.raises(grpc.RpcError) as err:
        await service.CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
            request_id=rid(), product_set_discount=pb.ProductSetDiscount(
                discount_id="x", name="X", value="1", product_sets=[])), metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_DISCOUNT_TYPE"
    with pytest.raises(grpc.RpcError) as err:
        await breakfast_discount(api)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_seed_example_preview_then_apply(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api)
    await assign(api, ["c1"], ["espresso", "latte"])
    await breakfast_discount(api)

    evaluation = await evaluate(api, "c1", BASKET)
    assert [(d.discount_id, d.line_index, d.product_id, d.quantity, d.amount)
            for d in evaluation.discount_lines] == [("breakfast", 2, "espresso", 1, "4.00")]
    (outcome,) = evaluation.outcomes
    assert (outcome.applied, outcome.amount) == (True, "4.00")
    assert outcome.explanation == (
        "applied: set 'Breakfast basics' has the 2 products required; 50% off 1 product of set "
        "'Your coffee' (selected in personalized promotion 'coffee': espresso)")
    assert (evaluation.basket_total, evaluation.discount_total,
            evaluation.total_after_discounts) == ("21.68", "4.00", "17.68")
    assert not (await view(api, "c1"))[0].HasField("first_apply_time")  # preview wrote nothing

    without_butter = await evaluate(api, "c1", [BASKET[0], BASKET[2]])
    assert list(without_butter.discount_lines) == []
    assert without_butter.outcomes[0].explanation == (
        "not applied: set 'Breakfast basics' needs 2 products in the basket, found 1")
    assert without_butter.discount_total == "0.00"

    applied = await apply(api, "c1", BASKET)
    assert applied.evaluation == evaluation
    assert list(applied.first_applied_promotion_ids) == ["coffee"]
    (entry,) = await view(api, "c1")
    assert entry.first_apply_time.ToDatetime(tzinfo=UTC) == NOW
    assert not entry.selection_locked  # this promotion does not lock


async def test_lock_after_first_apply(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api, lock=True)
    await assign(api, ["c1"], ["espresso", "latte"])
    await breakfast_discount(api)
    await select(api, "c1", ["latte"])
    await select(api, "c1", ["espresso"])  # free to change before the first apply

    # An apply in which the discount does not apply records nothing.
    missed = await apply(api, "c1", [BASKET[0], BASKET[2]])
    assert list(missed.first_applied_promotion_ids) == []
    await select(api, "c1", ["espresso"])

    request_id = rid()
    first = await apply(api, "c1", BASKET, request_id)
    assert list(first.first_applied_promotion_ids) == ["coffee"]
    assert await apply(api, "c1", BASKET, request_id) == first  # a retry: the same answer
    assert list((await apply(api, "c1", BASKET)).first_applied_promotion_ids) == []

    (entry,) = await view(api, "c1")
    assert entry.selection_locked
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "c1", ["latte"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "SELECTION_LOCKED"
    assert err.value.details() == (
        "the product selection in personalized promotion 'coffee' is locked: the promotion "
        "locks after first apply and was first applied at 2026-11-22T10:00:00+00:00")
    assert list((await view(api, "c1"))[0].selected_product_ids) == ["espresso"]


async def test_concurrent_applies_record_one_first_apply(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api, lock=True)
    await assign(api, ["c1"], ["espresso", "latte"])
    await breakfast_discount(api)
    lines = [*BASKET, line("latte", 1, "3.60")]
    answers = await asyncio.gather(*(apply(api, "c1", lines) for _ in range(8)),
                                   select(api, "c1", ["latte"]), return_exceptions=True)
    applies = answers[:8]
    assert all(isinstance(a, pb.ApplyBasketResponse) for a in applies)
    firsts = [a for a in applies
              if isinstance(a, pb.ApplyBasketResponse) and a.first_applied_promotion_ids]
    assert len(firsts) == 1
    (entry,) = await view(api, "c1")
    # The selection either changed before the first apply (and was frozen with it) or was
    # refused after it; either way the frozen selection is what the first apply used.
    (used,) = firsts[0].evaluation.discount_lines
    assert entry.selection_locked
    assert list(entry.selected_product_ids) == [used.product_id]
    if isinstance(answers[8], grpc.RpcError):
        assert rpc_error_reason(answers[8]) == "SELECTION_LOCKED"
        assert used.product_id == "espresso"
    else:
        assert used.product_id == "latte"


async def test_lock_freezes_the_default_product_too(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api, lock=True)
    await assign(api, ["c1"], ["espresso", "latte"])
    await breakfast_discount(api)
    await apply(api, "c1", BASKET)
    await assign(api, ["c1"], ["espresso", "latte"], default="latte")
    (entry,) = await view(api, "c1")
    assert list(entry.selected_product_ids) == ["espresso"]
    with pytest.raises(grpc.RpcError) as err:
        await select(api, "c1", [])
    assert rpc_error_reason(err.value) == "SELECTION_LOCKED"


async def test_percentage_spread_over_lines_loses_no_cent(api: Api) -> None:
    await customers(api, "c1")
    await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id="sweets", name="Sweets", discount_type=pb.DISCOUNT_TYPE_PERCENTAGE_OFF,
            value="10", product_sets=[pb.ProductSet(
                name="Sweets", product_ids=["s1", "s2", "s3"], required_quantity=1,
                gets_discount=True, discounted_quantity=3)])), metadata=api.key())
    evaluation = await evaluate(api, "c1", [line("s1", 1, "0.05"), line("s2", 1, "0.05"),
                                            line("s3", 1, "0.05")])
    assert [(d.line_index, d.amount) for d in evaluation.discount_lines] == [
        (0, "0.01"), (1, "0.01")]
    assert (evaluation.discount_total, evaluation.total_after_discounts) == ("0.02", "0.13")


async def test_basket_bad_input(api: Api) -> None:
    await customers(api, "c1")
    cases = [
        ("c1", [line("a", -1, "1.00")], grpc.StatusCode.INVALID_ARGUMENT, "lines[0].quantity",
         "lines[0].quantity must be 1-1000000, got -1"),
        ("c1", [line("a", 1, "1.00"), line("b", 0, "1.00")], grpc.StatusCode.INVALID_ARGUMENT,
         "lines[1].quantity", "lines[1].quantity must be 1-1000000, got 0"),
        ("c1", [line("a", 1, "-0.50")], grpc.StatusCode.INVALID_ARGUMENT, "lines[0].unit_price",
         "lines[0].unit_price must not be negative, got '-0.50'"),
        ("c1", [], grpc.StatusCode.INVALID_ARGUMENT, "lines",
         "lines must hold 1-1000 basket lines, got 0"),
        ("", [line("a", 1, "1.00")], grpc.StatusCode.INVALID_ARGUMENT, "customer_id",
         "customer_id is required"),
        ("ghost", [line("a", 1, "1.00")], grpc.StatusCode.NOT_FOUND, "customer_id",
         "unknown customer: 'ghost'"),
    ]
    for customer, lines, code, field, message in cases:
        for call in (evaluate(api, customer, lines), apply(api, customer, lines)):
            with pytest.raises(grpc.RpcError) as err:
                await call
            assert err.value.code() == code
            assert field_of(err.value) == field
            assert err.value.details() == message


async def test_roles(api: Api) -> None:
    await customers(api, "c1")
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).CreatePersonalizedPromotion(pb.CreatePersonalizedPromotionRequest(
            request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                backend_id="x", name="X")), metadata=api.key("runtime"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).EvaluateBasket(pb.EvaluateBasketRequest(
            customer_id="c1", lines=[line("a", 1, "1")]), metadata=api.key("listener"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin_view = await stub(api).GetCustomerProductPromotions(
        pb.GetCustomerProductPromotionsRequest(customer_id="c1"), metadata=api.key())
    assert list(admin_view.promotions) == []


async def test_list_enrolled_customers_of_a_promotion(api: Api) -> None:
    await customers(api, "c1", "c2", "c3")
    await personalized(api)
    await assign(api, ["c3", "c1", "c2"], ["a", "b"], default="b")
    await select(api, "c2", ["a"])
    service = stub(api)
    first = await service.ListProductLists(pb.ListProductListsRequest(
        personalized_promotion_id="coffee", page_size=2), metadata=api.key())
    assert [(e.customer_id, list(e.selected_product_ids)) for e in first.product_lists] == [
        ("c1", ["b"]), ("c2", ["a"])]
    rest = await service.ListProductLists(pb.ListProductListsRequest(
        personalized_promotion_id="coffee", page_size=2, page_token=first.next_page_token),
        metadata=api.key())
    assert [e.customer_id for e in rest.product_lists] == ["c3"]
    assert rest.next_page_token == ""
    with pytest.raises(grpc.RpcError) as err:
        await service.ListProductLists(pb.ListProductListsRequest(
            personalized_promotion_id="tea"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_discount_replaces_sets_and_frees_the_promotion(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api)
    await assign(api, ["c1"], ["espresso"])
    await breakfast_discount(api)
    service = stub(api)
    updated = await service.UpdateProductSetDiscount(pb.UpdateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id="breakfast", discount_type=pb.DISCOUNT_TYPE_AMOUNT_OFF, value="1.25",
            product_sets=[pb.ProductSet(name="Coffee", product_ids=["espresso"],
                                        required_quantity=1, gets_discount=True,
                                        discounted_quantity=2)]),
        update_mask=field_mask_pb2.FieldMask(paths=["discount_type", "value", "product_sets"])),
        metadata=api.key())
    discount = updated.product_set_discount
    assert (discount.name, discount.discount_type, discount.value) == (
        "Breakfast deal", pb.DISCOUNT_TYPE_AMOUNT_OFF, "1.25")
    assert [s.name for s in discount.product_sets] == ["Coffee"]
    evaluation = await evaluate(api, "c1", [line("espresso", 3, "7.99")])
    assert [(d.quantity, d.amount) for d in evaluation.discount_lines] == [(2, "2.50")]
    # No set links "coffee" any more: it can be deleted.
    await service.DeletePersonalizedPromotion(pb.DeletePersonalizedPromotionRequest(
        request_id=rid(), backend_id="coffee"), metadata=api.key())

    for paths, reason in ((["discount_id"], "INVALID_UPDATE_MASK"), ([], "EMPTY_UPDATE_MASK"),
                          (["discount_type"], "INVALID_DISCOUNT_TYPE"),
                          (["value"], "MISSING_FIELD")):
        with pytest.raises(grpc.RpcError) as err:
            await service.UpdateProductSetDiscount(pb.UpdateProductSetDiscountRequest(
                request_id=rid(), product_set_discount=pb.ProductSetDiscount(
                    discount_id="breakfast"),
                update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=api.key())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error_reason(err.value) == reason
    with pytest.raises(grpc.RpcError) as err:
        await service.UpdateProductSetDiscount(pb.UpdateProductSetDiscountRequest(
            request_id=rid(), product_set_discount=pb.ProductSetDiscount(
                discount_id="nope", name="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_product_ids_with_array_syntax_characters_round_trip(api: Api) -> None:
    await customers(api, "c1")
    await personalized(api)
    odd = ["x,y", 'q"uote', "back\\slash", "{brace}", "NULL", " spaced "]
    await assign(api, ["c1"], odd, default="NULL")
    await select(api, "c1", ["x,y", "{brace}"])
    (entry,) = await view(api, "c1")
    assert (list(entry.product_ids), entry.default_product_id,
            list(entry.chosen_product_ids)) == (odd, "NULL", ["x,y", "{brace}"])
