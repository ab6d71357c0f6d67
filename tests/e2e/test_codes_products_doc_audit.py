"""Audit of docs/codes.md and docs/products.md (and the comments of codes.proto and
products.proto) against the real server: each test asserts one documented statement."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from core.clock import FixedClock
from promo.v1 import codes_pb2 as cpb
from promo.v1 import codes_pb2_grpc as cpb_grpc
from promo.v1 import products_pb2 as pb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.code_helpers import (
    code_promotion,
    codes_file,
    get_promotion,
    pool_counts,
    until,
    upload,
)
from tests.e2e.promo_helpers import get_reward
from tests.e2e.test_products_api import (
    NOW,
    apply,
    assign,
    customers,
    evaluate,
    field_of,
    line,
    personalized,
    rid,
    select,
    stub,
    view,
)


async def _refused_upload(api: Api, code: str, data: bytes, request_id: str,
                          **kw: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await upload(api, code, data, request_id, **kw)
    return caught.value


def _metadata(exc: grpc.RpcError) -> dict[str, str]:
    info = error_info_of(exc)
    assert info is not None
    return dict(info.metadata)


# --- codes: upload CSV rules ---------------------------------------------------------------------

async def test_upload_message_lists_the_first_10_problem_lines_and_counts_the_rest(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "The message lists the first 10 problem lines and counts the rest; the
    ErrorInfo metadata has error_count and lines"."""
    await code_promotion(api, "MANY")
    data = b"".join(b"GOOD-%d\nBAD-%d,x\n" % (i, i) for i in range(12))
    err = await _refused_upload(api, "MANY", data, "many")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "CODE_FILE_REJECTED"
    bad_lines = [2 * i + 2 for i in range(12)]
    details = err.details() or ""
    for number in bad_lines[:10]:
        assert f"line {number}: has more than one column" in details
    assert f"line {bad_lines[10]}:" not in details
    assert "2 more" in details
    meta = _metadata(err)
    assert meta["error_count"] == "12"
    assert meta["lines"] == ",".join(str(n) for n in bad_lines[:10])
    assert await pool_counts(pool, "MANY") == (0, 0, 0)


async def test_the_file_is_checked_first_then_the_pool(api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "The file is checked on its own first: codes already in the pool are looked
    for (and reported) once the file itself has no problem" (the audit found the pool
    duplicate missing from a message that listed a file problem; the two steps are documented
    now)."""
    await code_promotion(api, "MIXED")
    await upload(api, "MIXED", codes_file("POOL", 3), "u1")
    err = await _refused_upload(api, "MIXED", b"A,B\nPOOL-000002\nNEW-1\n", "mixed")
    assert (err.code(), rpc_error_reason(err)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                   "CODE_FILE_REJECTED")
    assert "line 1: has more than one column" in (err.details() or "")
    assert (_metadata(err)["error_count"], _metadata(err)["lines"]) == ("1", "1")
    err = await _refused_upload(api, "MIXED", b"NEW-0\nPOOL-000002\nNEW-1\n", "fixed")
    assert "line 2: code 'POOL-000002' is already in the pool" in (err.details() or "")
    assert (_metadata(err)["error_count"], _metadata(err)["lines"]) == ("1", "2")
    assert await pool_counts(pool, "MIXED") == (3, 0, 3)


async def test_invalid_utf8_names_the_line_and_the_byte(api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: `line 3: is not valid UTF-8 (byte 4)`."""
    await code_promotion(api, "UTF")
    err = await _refused_upload(api, "UTF", b"AA-1\nBB-2\nOK-\xff9\n", "utf")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "CODE_FILE_REJECTED"
    assert "line 3: is not valid UTF-8 (byte 4)" in (err.details() or "")
    assert await pool_counts(pool, "UTF") == (0, 0, 0)


async def test_whitespace_is_trimmed_and_blank_lines_skipped(api: Api,
                                                             pool: asyncpg.Pool) -> None:
    """codes.md: "Whitespace around a code is trimmed and blank lines are skipped"."""
    await code_promotion(api, "TRIM")
    added = await upload(api, "TRIM", b"  T-1  \r\n\n\t T-2\r\n   \n\nT-3", "trim", chunk=3)
    assert added.codes_added == 3
    assert (added.inventory.total, added.inventory.available) == (3, 3)
    got = [(await get_reward(api, f"c{i}", "TRIM")).grant.promo_code for i in range(3)]
    assert got == ["T-1", "T-2", "T-3"]


@pytest.mark.parametrize("bad", [b"IN SIDE", b"TAB\tIN", b'QU"OTE', b"CTRL\x01X"])
async def test_spaces_quotes_and_control_characters_inside_a_code_are_rejected(
        api: Api, pool: asyncpg.Pool, bad: bytes) -> None:
    """codes.md: a code "with spaces, quotes or control characters inside" rejects the upload
    with CODE_FILE_REJECTED and adds nothing."""
    await code_promotion(api, "INSIDE")
    err = await _refused_upload(api, "INSIDE", b"OK-1\n" + bad + b"\nOK-2\n", "inside")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "CODE_FILE_REJECTED"
    assert "line 2:" in (err.details() or "")
    assert await pool_counts(pool, "INSIDE") == (0, 0, 0)


async def test_64_characters_are_allowed_and_counted_as_characters(api: Api) -> None:
    """codes.md: "a code over 64 characters" is rejected: 64 characters (even 2-byte ones) are
    accepted, 65 give `code is 65 characters long, at most 64 allowed`."""
    await code_promotion(api, "LEN")
    ok = await upload(api, "LEN", ("é" * 64 + "\n" + "A" * 64 + "\n").encode(), "len-ok")
    assert ok.codes_added == 2
    err = await _refused_upload(api, "LEN", ("B" * 65 + "\n").encode(), "len-bad")
    assert rpc_error_reason(err) == "CODE_FILE_REJECTED"
    assert "line 1: code is 65 characters long, at most 64 allowed" in (err.details() or "")


async def test_a_message_over_1_mb_is_refused_and_adds_nothing(api: Api,
                                                              pool: asyncpg.Pool) -> None:
    """codes.proto: "The next bytes of the file, at most 1 MB per message"."""
    await code_promotion(api, "CHUNK")
    data = codes_file("CH", 1024 * 1024 // 10 + 10)
    assert len(data) > 1024 * 1024
    err = await _refused_upload(api, "CHUNK", data, "chunk", chunk=len(data))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await pool_counts(pool, "CHUNK") == (0, 0, 0)


async def test_a_retry_with_the_same_bytes_in_other_chunks_returns_the_first_answer(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "Retrying with the same request id and the same bytes returns the first answer
    and adds nothing" (the chunking is not part of the bytes)."""
    await code_promotion(api, "RECHUNK")
    data = codes_file("RC", 50)
    first = await upload(api, "RECHUNK", data, "rc", chunk=100)
    again = await upload(api, "RECHUNK", data, "rc", chunk=37)
    assert again == first
    assert await pool_counts(pool, "RECHUNK") == (50, 0, 50)


async def test_inventory_lists_the_most_recent_uploads_first(api: Api) -> None:
    """codes.proto: GetCodeInventoryResponse.uploads "The most recent uploads first"; the
    inventory has total, used, available (codes.md)."""
    await code_promotion(api, "INV", fallback="FB-INV")
    sizes = [3, 1, 2]
    for n, size in enumerate(sizes):
        await upload(api, "INV", codes_file(f"I{n}", size), f"inv-{n}")
    for i in range(4):
        await get_reward(api, f"c{i}", "INV")
    inv = await cpb_grpc.CodePoolServiceStub(api.channel).GetCodeInventory(
        cpb.GetCodeInventoryRequest(promotion_code="INV"), metadata=api.key())
    assert [u.codes for u in inv.uploads] == [2, 1, 3]
    assert (inv.inventory.total, inv.inventory.used, inv.inventory.available,
            inv.inventory.fallback_grants) == (6, 4, 2, 0)
    assert not inv.fallback_active
    shown = await get_promotion(api, "INV")
    assert (shown.code_inventory.total, shown.code_inventory.used,
            shown.code_inventory.available) == (6, 4, 2)


# --- codes: allocation -------------------------------------------------------------------------

async def test_one_customer_asking_many_times_at_once_gets_one_code(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "never two codes to one customer for the same promotion and campaign"."""
    await code_promotion(api, "ONE", fallback="FB-ONE")
    await upload(api, "ONE", codes_file("ONE", 20), "u1")
    replies = await asyncio.gather(*(get_reward(api, "alice", "ONE") for _ in range(15)))
    assert {r.grant.promo_code for r in replies} == {"ONE-000001"}
    assert sum(not r.existing for r in replies) == 1
    assert await pool_counts(pool, "ONE") == (20, 1, 20)


async def test_a_retry_gets_its_code_again_after_the_pool_ran_out(api: Api) -> None:
    """codes.md: "the same code again on a retry (same request id, or the same customer)",
    also once the pool is empty and the promotion paused."""
    await code_promotion(api, "AGAIN")
    await upload(api, "AGAIN", b"ONLY-1\n", "u1")
    first = await get_reward(api, "alice", "AGAIN", request_id="r-alice")
    assert first.grant.promo_code == "ONLY-1"
    denied = await get_reward(api, "bob", "AGAIN")
    assert denied.denial_reason == rpb.DENIAL_REASON_OUT_OF_CODES
    retry = await get_reward(api, "alice", "AGAIN", request_id="r-alice")
    same_customer = await get_reward(api, "alice", "AGAIN")
    assert retry.grant.promo_code == same_customer.grant.promo_code == "ONLY-1"
    assert retry.existing and same_customer.existing
    assert not retry.grant.fallback_code


async def test_the_fallback_flag_is_kept_on_a_retry(api: Api) -> None:
    """codes.md: "grant.fallback_code is true when the pool was empty and the code is the
    fallback" - the retry returns the first answer."""
    await code_promotion(api, "FBRETRY", fallback="FB-R")
    await upload(api, "FBRETRY", b"ONLY-1\n", "u1")
    first = await get_reward(api, "alice", "FBRETRY")
    assert (first.grant.promo_code, first.grant.fallback_code) == ("ONLY-1", False)
    fb = await get_reward(api, "bob", "FBRETRY", request_id="r-bob")
    assert (fb.grant.promo_code, fb.grant.fallback_code) == ("FB-R", True)
    retry = await get_reward(api, "bob", "FBRETRY", request_id="r-bob")
    assert retry.existing
    assert (retry.grant.promo_code, retry.grant.fallback_code) == ("FB-R", True)
    shown = await get_promotion(api, "FBRETRY")
    assert shown.fallback_active
    assert shown.code_inventory.fallback_grants == 1


async def test_the_fallback_code_and_the_personal_codes_never_overlap(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "grant.fallback_code is true when the pool was empty and the code is the
    fallback". A grant is told apart as a fallback by its code, so the two sets never overlap
    (the audit found a pool code equal to the fallback text reported as a fallback grant): an
    upload holding the fallback code is refused, and so is a fallback code already in the
    pool."""
    await code_promotion(api, "SAMEFB", fallback="LOYALTY10")
    err = await _refused_upload(api, "SAMEFB", b"OTHER-1\nLOYALTY10\n", "u1")
    assert rpc_error_reason(err) == "CODE_FILE_REJECTED"
    assert ("line 2: code 'LOYALTY10' is the promotion's fallback code (given once the pool "
            "is empty); a personal code must differ from it") in (err.details() or "")
    assert await pool_counts(pool, "SAMEFB") == (0, 0, 0)
    await upload(api, "SAMEFB", b"OTHER-1\nOTHER-2\n", "u2")
    promotions = ppb_grpc.PromotionServiceStub(api.channel)
    await promotions.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="off", promotion_code="SAMEFB"), metadata=api.key())
    with pytest.raises(grpc.RpcError) as caught:
        await promotions.UpdatePromotion(
            ppb.UpdatePromotionRequest(
                request_id="fb", promotion=ppb.Promotion(promotion_code="SAMEFB",
                                                         fallback_code="OTHER-2"),
                update_mask=field_mask_pb2.FieldMask(paths=["fallback_code"])),
            metadata=api.key())
    assert (caught.value.code(), rpc_error_reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FALLBACK_CODE")
    await promotions.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="on", promotion_code="SAMEFB"), metadata=api.key())
    assert (await get_promotion(api, "SAMEFB")).fallback_code == "LOYALTY10"
    got = await get_reward(api, "alice", "SAMEFB")
    assert (got.grant.promo_code, got.grant.fallback_code) == ("OTHER-1", False)


# --- codes: alerts -----------------------------------------------------------------------------

async def _alerts(pool: asyncpg.Pool) -> list[tuple[str, int]]:
    rows = await pool.fetch("SELECT kind, remaining FROM code_pool_alerts ORDER BY id")
    return [(r["kind"], r["remaining"]) for r in rows]


async def test_replenishment_rearms_the_depletion_and_fallback_alerts(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: "a replenished pool re-arms the depletion and fallback alerts"."""
    await code_promotion(api, "CYCLE", fallback="FB-C")
    await upload(api, "CYCLE", codes_file("C", 2), "u1")
    for i in range(4):  # 2 codes, then 2 fallbacks
        await get_reward(api, f"a{i}", "CYCLE")
    assert await _alerts(pool) == [("DEPLETED", 0), ("FALLBACK_ACTIVE", 0)]
    await upload(api, "CYCLE", codes_file("C", 2, start=3), "u2")
    for i in range(4):
        await get_reward(api, f"b{i}", "CYCLE")
    assert await _alerts(pool) == [("DEPLETED", 0), ("FALLBACK_ACTIVE", 0),
                                   ("DEPLETED", 0), ("FALLBACK_ACTIVE", 0)]


async def test_a_percentage_threshold_alert_carries_the_documented_data(
        api: Api, pool: asyncpg.Pool) -> None:
    """codes.md: a threshold alert's data has promotion_code, alert THRESHOLD, threshold "10%",
    level, remaining, used, total and raised_at; once per breach."""
    await code_promotion(api, "PCT", fallback="FB-P", alerts=[
        ppb.CodeAlertThreshold(remaining_percent="10")])
    await upload(api, "PCT", codes_file("P", 50), "u1")
    for i in range(46):  # remaining 4, level 5 reached at remaining 5
        await get_reward(api, f"c{i}", "PCT")

    async def dispatched() -> bool:
        return await pool.fetchval(
            "SELECT count(*) FROM code_pool_alerts WHERE emitted_at IS NULL") == 0

    await until(dispatched)
    rows = await pool.fetch("SELECT body FROM webhook_events WHERE event_type = 101")
    assert len(rows) == 1
    data = json.loads(rows[0]["body"])["data"]
    raised_at = data.pop("raised_at")
    assert raised_at.startswith("2026-11-22T10:00:00")
    assert data == {"promotion_code": "PCT", "alert": "THRESHOLD", "threshold": "10%",
                    "level": 5, "remaining": 5, "used": 45, "total": 50}


# --- products: identifiers and lists -------------------------------------------------------------

@pytest.mark.parametrize("product", ["caf\x85e", "tab\u009fx", "nul\x00x"])
async def test_product_ids_with_control_characters_are_refused(api: Api, product: str) -> None:
    """products.proto: product ids are "1-128 characters, no control characters"."""
    await customers(api, "c1")
    await personalized(api)
    with pytest.raises(grpc.RpcError) as err:
        await assign(api, ["c1"], ["espresso", product])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == "product_ids[1]"
    assert await view(api, "c1") == []


async def test_assign_takes_at_most_10000_customers(api: Api) -> None:
    """products.md: "AssignProductLists gives one list to 1-10,000 customers at once"."""
    await personalized(api)
    with pytest.raises(grpc.RpcError) as err:
        await assign(api, [f"c{i}" for i in range(10_001)], ["espresso"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == "customer_ids"


async def test_replacing_a_list_keeps_chosen_products_still_on_it_and_the_first_apply(
        api: Api) -> None:
    """products.md: "A replaced list keeps the customer's chosen products that are still on it
    (none left: the default applies again); a recorded first apply stays"."""
    await customers(api, "c1", "c2")
    await personalized(api, lock=True)
    await assign(api, ["c1", "c2"], ["espresso", "latte", "mocha"])
    await _discount(api, "coffee-10", [pb.ProductSet(
        name="Your coffee", personalized_promotion_id="coffee", required_quantity=1,
        gets_discount=True, discounted_quantity=1)])
    await select(api, "c1", ["latte", "mocha"])
    await select(api, "c2", ["mocha"])
    applied = await apply(api, "c1", [line("latte", 1, "4.00")])
    assert list(applied.first_applied_promotion_ids) == ["coffee"]

    replaced = await assign(api, ["c1", "c2"], ["tea", "latte"], default="tea")
    assert (replaced.created_count, replaced.replaced_count) == (0, 2)
    c1, = await view(api, "c1")
    assert list(c1.chosen_product_ids) == ["latte"]
    assert c1.first_apply_time.ToDatetime().replace(tzinfo=NOW.tzinfo) == NOW
    assert c1.selection_locked
    c2, = await view(api, "c2")
    assert list(c2.chosen_product_ids) == []
    assert list(c2.selected_product_ids) == ["tea"]
    assert not c2.HasField("first_apply_time")


async def test_remove_ignores_customers_without_a_list_and_delete_counts_lists(
        api: Api) -> None:
    """products.proto: RemoveProductLists "ones without a list in the promotion are ignored";
    DeletePersonalizedPromotionResponse.deleted_product_lists counts the lists deleted."""
    await customers(api, "c1", "c2", "c3")
    await personalized(api)
    await assign(api, ["c1", "c2", "c3"], ["espresso"])
    removed = await stub(api).RemoveProductLists(pb.RemoveProductListsRequest(
        request_id=rid(), personalized_promotion_id="coffee", customer_ids=["c1", "nobody"]),
        metadata=api.key())
    assert removed.removed_count == 1
    deleted = await stub(api).DeletePersonalizedPromotion(pb.DeletePersonalizedPromotionRequest(
        request_id=rid(), backend_id="coffee"), metadata=api.key())
    assert deleted.deleted_product_lists == 2
    assert await view(api, "c2") == []


async def test_search_is_case_insensitive_on_name_and_backend_id(api: Api) -> None:
    """products.proto: search is a "Case-insensitive substring of the name or the backend_id"."""
    await personalized(api, "coffee", name="Café Crème")
    await personalized(api, "Tea-Time", name="Afternoon")
    await personalized(api, "other", name="Nothing")

    async def search(text: str) -> list[str]:
        page = await stub(api).ListPersonalizedPromotions(
            pb.ListPersonalizedPromotionsRequest(search=text), metadata=api.key())
        return [p.backend_id for p in page.personalized_promotions]

    assert await search("CRÈME") == ["coffee"]
    assert await search("tea-t") == ["Tea-Time"]
    assert await search("OFF") == ["coffee"]


async def test_lowering_the_maximum_to_all_or_to_what_was_chosen_is_accepted(api: Api) -> None:
    """products.md: the update refuses only "to lower max_distinct_products below what a customer
    has already chosen"; 0 means all of the list."""
    await customers(api, "c1")
    await personalized(api, max_distinct=3)
    await assign(api, ["c1"], ["espresso", "latte", "mocha"])
    await select(api, "c1", ["latte", "mocha"])
    for value in (2, 0):
        updated = await stub(api).UpdatePersonalizedPromotion(
            pb.UpdatePersonalizedPromotionRequest(
                request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                    backend_id="coffee", max_distinct_products=value),
                update_mask={"paths": ["max_distinct_products"]}), metadata=api.key())
        assert updated.personalized_promotion.max_distinct_products == value
    chosen = await select(api, "c1", ["espresso", "latte", "mocha"])
    assert list(chosen.chosen_product_ids) == ["espresso", "latte", "mocha"]


async def test_an_unlocked_selection_in_another_order_takes_the_new_order(api: Api) -> None:
    """products.md: only "while the selection is locked" does another order count as the current
    choice with the stored order kept; unlocked, the new choice is stored."""
    await customers(api, "c1")
    await personalized(api)
    await assign(api, ["c1"], ["espresso", "latte", "mocha"])
    await select(api, "c1", ["latte", "mocha"])
    again = await select(api, "c1", ["mocha", "latte"])
    assert list(again.chosen_product_ids) == ["mocha", "latte"]
    cleared = await select(api, "c1", [])
    assert list(cleared.chosen_product_ids) == []
    assert list(cleared.selected_product_ids) == ["espresso"]


# --- products: basket evaluation -----------------------------------------------------------------

async def _discount(api: Api, discount_id: str, sets: list[pb.ProductSet], *,
                    discount_type: int = pb.DISCOUNT_TYPE_PERCENTAGE_OFF, value: str = "50",
                    min_basket_total: str = "") -> pb.ProductSetDiscount:
    response = await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id=discount_id, name=f"Discount {discount_id}", discount_type=discount_type,
            value=value, min_basket_total=min_basket_total, product_sets=sets)),
        metadata=api.key())
    return response.product_set_discount


def _marked(products: list[str], discounted: int = 1, required: int = 1) -> pb.ProductSet:
    return pb.ProductSet(name="Deal", product_ids=products, required_quantity=required,
                         gets_discount=True, discounted_quantity=discounted)


def _lines(evaluation: pb.BasketEvaluation) -> list[tuple[str, int, str, int, str]]:
    return [(d.discount_id, d.line_index, d.product_id, d.quantity, d.amount)
            for d in evaluation.discount_lines]


async def test_each_unit_serves_one_discount_in_discount_id_order(api: Api) -> None:
    """products.md: "Discounts are evaluated in discount_id order, and each basket unit serves one
    discount at most"."""
    await customers(api, "c1")
    await _discount(api, "b-second", [_marked(["cake"])], value="10")
    await _discount(api, "a-first", [_marked(["cake"])], value="50")
    result = await evaluate(api, "c1", [line("cake", 1, "4.00")])
    assert _lines(result) == [("a-first", 0, "cake", 1, "2.00")]
    assert [(o.discount_id, o.applied) for o in result.outcomes] == [
        ("a-first", True), ("b-second", False)]
    assert result.outcomes[1].explanation == (
        "not applied: set 'Deal' needs 1 product in the basket, found 0")
    assert (result.basket_total, result.discount_total, result.total_after_discounts) == (
        "4.00", "2.00", "2.00")


async def test_the_cheapest_units_get_the_discount_ties_the_earlier_line(api: Api) -> None:
    """products.md: "The discounted units are the cheapest of the set (ties: the earlier line)"."""
    await customers(api, "c1")
    await _discount(api, "cheap", [_marked(["a", "b", "c"], discounted=2, required=3)],
                    discount_type=pb.DISCOUNT_TYPE_AMOUNT_OFF, value="1.00")
    result = await evaluate(api, "c1", [line("a", 1, "5.00"), line("b", 1, "3.00"),
                                        line("c", 2, "3.00")])
    assert _lines(result) == [("cheap", 1, "b", 1, "1.00"), ("cheap", 2, "c", 1, "1.00")]


async def test_unmarked_sets_prefer_products_outside_the_discounted_sets(api: Api) -> None:
    """products.md: "the unmarked sets are matched first and prefer units of products that are
    not in a discounted set, then take them in line order"."""
    await customers(api, "c1")
    await _discount(api, "pref", [
        pb.ProductSet(name="Any", product_ids=["coffee", "bread"], required_quantity=1),
        pb.ProductSet(name="Coffee", product_ids=["coffee"], required_quantity=1,
                      gets_discount=True, discounted_quantity=1)])
    result = await evaluate(api, "c1", [line("coffee", 1, "3.00"), line("bread", 1, "2.00")])
    assert _lines(result) == [("pref", 0, "coffee", 1, "1.50")]


async def test_amount_off_is_at_most_the_price_and_fixed_price_keeps_cheaper_units(
        api: Api) -> None:
    """products.md: AMOUNT_OFF "value off each discounted unit, at most its price";
    FIXED_PRICE "a unit already cheaper keeps its price"; "a fixed price no lower than the
    units' prices does not [apply] (the discounted products already cost no more than the
    discounted price)"."""
    await customers(api, "c1")
    await _discount(api, "d-amount", [_marked(["x"], discounted=2)],
                    discount_type=pb.DISCOUNT_TYPE_AMOUNT_OFF, value="5.00")
    await _discount(api, "d-fixed", [_marked(["y", "z"], discounted=2)],
                    discount_type=pb.DISCOUNT_TYPE_FIXED_PRICE, value="2.00")
    await _discount(api, "d-fixed-high", [_marked(["w"])],
                    discount_type=pb.DISCOUNT_TYPE_FIXED_PRICE, value="9.00")
    result = await evaluate(api, "c1", [
        line("x", 2, "3.00"), line("y", 1, "1.50"), line("z", 1, "6.00"), line("w", 1, "9.00")])
    assert _lines(result) == [("d-amount", 0, "x", 2, "6.00"), ("d-fixed", 2, "z", 1, "4.00")]
    outcomes = {o.discount_id: o for o in result.outcomes}
    assert not outcomes["d-fixed-high"].applied
    assert outcomes["d-fixed-high"].explanation == (
        "not applied: the discounted products already cost no more than the discounted price")
    assert result.discount_total == "10.00"


async def test_percentages_round_half_up_and_below_a_cent_do_not_apply(api: Api) -> None:
    """products.md: "the total rounded half up to the cent"; "A percentage that rounds to less
    than a cent does not apply (1% off the discounted products rounds to less than a cent)"."""
    await customers(api, "c1")
    await _discount(api, "half", [_marked(["h"])], value="10")
    await _discount(api, "tiny", [_marked(["t"])], value="1")
    result = await evaluate(api, "c1", [line("h", 1, "0.05"), line("t", 1, "0.40")])
    assert _lines(result) == [("half", 0, "h", 1, "0.01")]
    tiny = next(o for o in result.outcomes if o.discount_id == "tiny")
    assert not tiny.applied
    assert tiny.explanation == (
        "not applied: 1% off the discounted products rounds to less than a cent")


async def test_min_basket_total_is_the_total_before_discounts(api: Api) -> None:
    """products.md: min_basket_total is "the basket total before discounts"."""
    await customers(api, "c1")
    await _discount(api, "a-big", [_marked(["x"])], value="50")
    await _discount(api, "b-min", [_marked(["y"])], value="10", min_basket_total="20.00")
    await _discount(api, "c-min", [_marked(["z"])], value="10", min_basket_total="20.01")
    result = await evaluate(api, "c1", [line("x", 1, "10.00"), line("y", 1, "5.00"),
                                        line("z", 1, "5.00")])
    outcomes = {o.discount_id: o for o in result.outcomes}
    assert outcomes["a-big"].applied and outcomes["b-min"].applied
    assert not outcomes["c-min"].applied
    assert outcomes["c-min"].explanation == (
        "not applied: the basket total 20.00 is below the minimum 20.01")


async def test_outcomes_list_discounts_of_the_customers_promotions_and_unenrolled_get_nothing(
        api: Api) -> None:
    """products.md: the outcomes list every discount that concerns the basket or the customer (a
    set links a promotion they are enrolled in); "A customer with no list in a personalized
    set's promotion gets nothing from that discount"."""
    await customers(api, "c1", "c2")
    await personalized(api)
    await assign(api, ["c1"], ["espresso", "latte"])
    await _discount(api, "mine", [
        pb.ProductSet(name="Bread", product_ids=["bread"], required_quantity=1),
        pb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                      required_quantity=1, gets_discount=True, discounted_quantity=1)])
    await _discount(api, "unrelated", [_marked(["caviar"])])
    enrolled = await evaluate(api, "c1", [line("tea", 1, "1.00")])
    assert [o.discount_id for o in enrolled.outcomes] == ["mine"]
    assert not enrolled.outcomes[0].applied
    stranger = await evaluate(api, "c2", [line("bread", 1, "2.00"), line("espresso", 1, "3.00")])
    assert [(o.discount_id, o.applied) for o in stranger.outcomes] == [("mine", False)]
    assert stranger.outcomes[0].explanation == (
        "not applied: the customer has no product list in personalized promotion 'coffee'")
    assert stranger.discount_total == "0.00"


async def test_apply_records_the_first_apply_once_at_the_clock_time(
        api: Api, clock: FixedClock) -> None:
    """products.md: "ApplyBasket records the first apply for every personalized promotion linked
    to a discount that applied" (also without the lock); later applies record nothing new."""
    await customers(api, "c1")
    await personalized(api, lock=False)
    await assign(api, ["c1"], ["espresso", "latte"])
    await _discount(api, "coffee-10", [pb.ProductSet(
        name="Your coffee", personalized_promotion_id="coffee", required_quantity=1,
        gets_discount=True, discounted_quantity=1)], value="10")
    not_applied = await apply(api, "c1", [line("latte", 1, "4.00")])
    assert list(not_applied.first_applied_promotion_ids) == []
    first = await apply(api, "c1", [line("espresso", 1, "4.00")])
    assert list(first.first_applied_promotion_ids) == ["coffee"]
    clock.set(NOW + timedelta(hours=1))
    second = await apply(api, "c1", [line("espresso", 1, "4.00")])
    assert list(second.first_applied_promotion_ids) == []
    entry, = await view(api, "c1")
    assert entry.first_apply_time.ToDatetime().replace(tzinfo=NOW.tzinfo) == NOW
    assert not entry.selection_locked
    changed = await select(api, "c1", ["latte"])
    assert list(changed.chosen_product_ids) == ["latte"]


async def test_basket_prices_have_at_most_two_decimal_places(api: Api) -> None:
    """products.md: "basket prices ... have at most 2 decimal places (cents)"; bad basket input
    is INVALID_ARGUMENT naming the field."""
    await customers(api, "c1")
    with pytest.raises(grpc.RpcError) as err:
        await evaluate(api, "c1", [line("a", 1, "1.00"), line("b", 1, "1.005")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == "lines[1].unit_price"


async def test_concurrent_selections_never_exceed_a_lowered_maximum(api: Api) -> None:
    """products.md: "nobody ends with more products chosen than the maximum" when a lowering
    races selections."""
    ids = [f"c{i}" for i in range(12)]
    await customers(api, *ids)
    await personalized(api, max_distinct=3)
    await assign(api, ids, ["espresso", "latte", "mocha"])

    async def choose(customer: str) -> None:
        try:
            await select(api, customer, ["espresso", "latte", "mocha"])
        except grpc.RpcError as exc:
            assert rpc_error_reason(exc) == "TOO_MANY_PRODUCTS_SELECTED"

    async def lower() -> bool:
        try:
            await stub(api).UpdatePersonalizedPromotion(pb.UpdatePersonalizedPromotionRequest(
                request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                    backend_id="coffee", max_distinct_products=1),
                update_mask={"paths": ["max_distinct_products"]}), metadata=api.key())
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False

    results = await asyncio.gather(lower(), *(choose(c) for c in ids))
    lowered = results[0]
    promotion = await stub(api).GetPersonalizedPromotion(
        pb.GetPersonalizedPromotionRequest(backend_id="coffee"), metadata=api.key())
    maximum = promotion.personalized_promotion.max_distinct_products
    assert maximum == (1 if lowered else 3)
    sizes = [len((await view(api, c))[0].chosen_product_ids) for c in ids]
    assert max(sizes) <= maximum
