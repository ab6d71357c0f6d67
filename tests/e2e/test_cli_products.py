"""`promo products` against a real server (seed 003): personalized promotions, product lists in
bulk from CSV and JSON files, a customer's view and selection, product-set discounts from a file,
and basket evaluate/apply; errors as one line with the server's reason."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Api
from tests.e2e.test_cli import Cli

BREAKFAST = {
    "discount_id": "breakfast", "name": "Breakfast deal",
    "discount_type": "DISCOUNT_TYPE_PERCENTAGE_OFF", "value": "50",
    "product_sets": [
        {"name": "Breakfast basics", "product_ids": ["bread", "butter"], "required_quantity": 2},
        {"name": "Your coffee", "personalized_promotion_id": "coffee", "required_quantity": 1,
         "gets_discount": True, "discounted_quantity": 1}]}


async def test_personalized_promotions_create_get_list_update_delete(api: Api,
                                                                     tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    created = await cli.json("products", "create", "coffee", "--name", "Your coffee",
                             "--description", "Pick your coffee", "--max-distinct", "1",
                             "--lock", "--request-id", "pp-1")
    assert {k: created[k] for k in ("backend_id", "name", "description",
                                    "max_distinct_products", "lock_after_first_apply")} == {
        "backend_id": "coffee", "name": "Your coffee", "description": "Pick your coffee",
        "max_distinct_products": 1, "lock_after_first_apply": True}
    assert await cli.json("products", "create", "coffee", "--name", "Your coffee",
                          "--description", "Pick your coffee", "--max-distinct", "1", "--lock",
                          "--request-id", "pp-1") == created  # a retry: the first answer
    file = tmp_path / "tea.json"
    file.write_text(json.dumps({"backend_id": "tea", "name": "Your tea",
                                "maxDistinctProducts": 2}))
    tea = await cli.json("products", "create", "--file", str(file))
    assert (tea["backend_id"], tea["max_distinct_products"], tea["lock_after_first_apply"]) == (
        "tea", 2, False)

    assert await cli.json("products", "get", "coffee") == created
    listed = await cli.json("products", "list")
    assert [p["backend_id"] for p in listed["personalized_promotions"]] == ["coffee", "tea"]
    assert [p["backend_id"] for p in (await cli.json("products", "list", "--no-lock"))[
        "personalized_promotions"]] == ["tea"]
    assert [p["backend_id"] for p in (await cli.json("products", "list", "--search", "TEA"))[
        "personalized_promotions"]] == ["tea"]
    page = await cli.json("products", "list", "--page-size", "1")
    assert len(page["personalized_promotions"]) == 1 and page["next_page_token"]
    table = await cli.ok("products", "list")
    assert "Personalized promotions" in table and "Your coffee" in table and "Your tea" in table

    updated = await cli.json("products", "update", "tea", "--name", "Tea time", "--max-distinct",
                             "0", "--lock")
    assert (updated["name"], updated["max_distinct_products"],
            updated["lock_after_first_apply"]) == ("Tea time", 0, True)
    shown = await cli.ok("products", "get", "tea")
    assert "personalized promotion tea" in shown and "Tea time" in shown

    line = await cli.error("products", "update", "tea")
    assert line == ("error: nothing to change: give --name, --description, --max-distinct or "
                    "--lock/--no-lock")
    line = await cli.error("products", "get", "nope")
    assert line == ("error: NOT_FOUND: no personalized promotion with backend_id 'nope' "
                    "(PERSONALIZED_PROMOTION_NOT_FOUND)")
    line = await cli.error("products", "create", "bad id", "--name", "x")
    assert line == ("error: INVALID_ARGUMENT: backend_id must be 1-100 characters of letters, "
                    "digits, '_', '-' or '.', starting with a letter or digit; got 'bad id' "
                    "(INVALID_BACKEND_ID)")

    said = await cli.ok("products", "delete", "tea")
    assert said.strip() == "deleted tea and 0 product list(s)"
    assert [p["backend_id"] for p in (await cli.json("products", "list"))[
        "personalized_promotions"]] == ["coffee"]


async def test_lists_selection_discounts_and_baskets(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    for customer in ("c1", "c2", "c3", "c4"):
        await cli.ok("customers", "upsert", customer)
    await cli.ok("products", "create", "coffee", "--name", "Your coffee", "--max-distinct", "1",
                 "--lock")

    lists = tmp_path / "lists.csv"
    lists.write_text("customer_id,products\n"
                     "c1,espresso,latte,mocha\n"
                     "c2,espresso,latte,mocha\n"
                     "c3,latte,mocha\n")
    assigned = await cli.json("products", "assign", "coffee", "--file", str(lists))
    assert assigned == {"created_count": 3, "replaced_count": 0, "calls": 2}
    again = await cli.ok("products", "assign", "coffee", "--file", str(lists))
    assert again.strip() == "assigned lists in coffee: 3 created, 0 replaced (2 call(s))"
    as_json = tmp_path / "lists.json"
    as_json.write_text(json.dumps([
        {"customer_id": "c3", "product_ids": ["latte", "mocha"], "default_product_id": "mocha"},
        {"customer_id": "c4", "product_ids": ["flat white"]}]))
    assert await cli.json("products", "assign", "coffee", "--file", str(as_json)) == {
        "created_count": 1, "replaced_count": 1, "calls": 2}

    enrolled = await cli.json("products", "lists", "coffee")
    assert [(e["customer_id"], e["product_ids"], e["default_product_id"],
             e["selected_product_ids"]) for e in enrolled["product_lists"]] == [
        ("c1", ["espresso", "latte", "mocha"], "espresso", ["espresso"]),
        ("c2", ["espresso", "latte", "mocha"], "espresso", ["espresso"]),
        ("c3", ["latte", "mocha"], "mocha", ["mocha"]),
        ("c4", ["flat white"], "flat white", ["flat white"])]
    table = await cli.ok("products", "lists", "coffee")
    assert "Product lists of coffee" in table and "espresso, latte, mocha" in table

    removed = await cli.json("products", "remove", "coffee", "c4", "nobody")
    assert removed == {"removed_count": 1}
    ids = tmp_path / "remove.csv"
    ids.write_text("customer_id\nc3\n")
    assert (await cli.ok("products", "remove", "coffee", "--file", str(ids))).strip() == (
        "removed 1 product list(s) from coffee")

    view = await cli.json("products", "customer", "c1")
    [entry] = view["promotions"]
    assert (entry["personalized_promotion"]["backend_id"], entry["selected_product_ids"],
            entry["chosen_product_ids"], entry["selection_locked"]) == (
        "coffee", ["espresso"], [], False)
    chosen = await cli.json("products", "select", "c1", "coffee", "latte")
    assert (chosen["promotion"]["chosen_product_ids"],
            chosen["promotion"]["selected_product_ids"]) == (["latte"], ["latte"])
    said = await cli.ok("products", "select", "c2", "coffee")
    assert said.strip() == "c2 in coffee: chose nothing (default espresso); selected espresso"
    line = await cli.error("products", "select", "c1", "coffee", "latte", "mocha")
    assert line == ("error: INVALID_ARGUMENT: personalized promotion 'coffee' allows at most 1 "
                    "distinct products, 2 were selected (TOO_MANY_PRODUCTS_SELECTED)")

    file = tmp_path / "breakfast.json"
    file.write_text(json.dumps(BREAKFAST))
    discount = await cli.json("products", "discounts", "create", "--file", str(file))
    assert {k: discount[k] for k in ("discount_id", "discount_type", "value")} == {
        "discount_id": "breakfast", "discount_type": "DISCOUNT_TYPE_PERCENTAGE_OFF",
        "value": "50"}
    assert discount["product_sets"][1]["personalized_promotion_id"] == "coffee"
    assert await cli.json("products", "discounts", "get", "breakfast") == discount
    listed = await cli.json("products", "discounts", "list", "--promotion", "coffee")
    assert [d["discount_id"] for d in listed["product_set_discounts"]] == ["breakfast"]
    assert (await cli.json("products", "discounts", "list", "--promotion", "tea"))[
        "product_set_discounts"] == []
    table = await cli.ok("products", "discounts", "list")
    assert "percentage_off" in table and "personalized coffee" in table
    shown = await cli.ok("products", "discounts", "get", "breakfast")
    assert "sets: Breakfast basics [bread, butter] x2; Your coffee [personalized coffee] x1, " \
           "1 discounted" in shown

    preview = await cli.json("products", "basket", "evaluate", "c1", "--line", "bread:1:2.50",
                             "--line", "butter:1:3.20", "--line", "latte:2:7.99")
    evaluation = preview["evaluation"]
    assert (evaluation["basket_total"], evaluation["discount_total"],
            evaluation["total_after_discounts"]) == ("21.68", "4.00", "17.68")
    assert evaluation["discount_lines"] == [{"discount_id": "breakfast", "line_index": 2,
                                             "product_id": "latte", "quantity": 1,
                                             "amount": "4.00"}]
    without_butter = await cli.ok("products", "basket", "evaluate", "c1", "--line",
                                  "bread:1:2.50", "--line", "latte:2:7.99")
    assert "not applied" in without_butter
    assert "basket 18.48 (2 line(s)), discounts 0.00, to pay 18.48" in without_butter

    basket = tmp_path / "basket.json"
    basket.write_text(json.dumps({"lines": [
        {"product_id": "bread", "quantity": 1, "unit_price": "2.50"},
        {"product_id": "butter", "quantity": 1, "unit_price": "3.20"},
        {"productId": "latte", "quantity": 2, "unitPrice": "7.99"}]}))
    applied = await cli.json("products", "basket", "apply", "c1", "--file", str(basket),
                             "--request-id", "order-1001")
    assert applied["first_applied_promotion_ids"] == ["coffee"]
    assert applied["evaluation"] == evaluation
    said = await cli.ok("products", "basket", "apply", "c1", "--file", str(basket),
                        "--request-id", "order-1001")
    assert "Discounts" in said and "breakfast" in said and "applied:" in said
    assert "basket 21.68 (3 line(s)), discounts 4.00, to pay 17.68" in said
    assert "first applied: coffee" in said

    locked = await cli.json("products", "customer", "c1")
    assert locked["promotions"][0]["selection_locked"] is True
    line = await cli.error("products", "select", "c1", "coffee", "mocha")
    assert line == ("error: FAILED_PRECONDITION: the product selection in personalized "
                    "promotion 'coffee' is locked: the promotion locks after first apply and was "
                    "first applied at 2026-11-22T10:00:00+00:00 (SELECTION_LOCKED)")
    line = await cli.error("products", "basket", "evaluate", "c1", "--line", "bread:0:2.50")
    assert line == ("error: INVALID_ARGUMENT: lines[0].quantity must be 1-1000000, got 0 "
                    "(INVALID_QUANTITY)")
    line = await cli.error("products", "basket", "evaluate", "c1", "--line", "bread")
    assert line == ("error: --line takes PRODUCT:QUANTITY:UNIT_PRICE (e.g. espresso:2:7.99), "
                    "got 'bread'")

    line = await cli.error("products", "delete", "coffee")
    assert line == ("error: FAILED_PRECONDITION: personalized promotion 'coffee' is used by "
                    "product-set discounts: breakfast; delete those discounts first "
                    "(PERSONALIZED_PROMOTION_IN_USE)")
    change = tmp_path / "change.json"
    change.write_text(json.dumps({"name": "Breakfast 40", "discountType":
                                  "DISCOUNT_TYPE_AMOUNT_OFF", "value": "0.40"}))
    changed = await cli.json("products", "discounts", "update", "breakfast", "--file",
                             str(change))
    assert (changed["name"], changed["discount_type"], changed["value"],
            changed["product_sets"]) == ("Breakfast 40", "DISCOUNT_TYPE_AMOUNT_OFF", "0.4",
                                         discount["product_sets"])
    said = await cli.ok("products", "discounts", "delete", "breakfast")
    assert said.strip() == "deleted discount breakfast"
    assert (await cli.json("products", "delete", "coffee")) == {"deleted_product_lists": 2}
