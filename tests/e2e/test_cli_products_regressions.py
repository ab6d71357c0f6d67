"""Regressions of the operator CLI, personalized product promotions and the customers API: file
uploads (derived request ids, byte order marks, errors of multi-call uploads), numbers too large
for their wire field, selections under concurrency and locks, and basket evaluation with
overlapping sets. Real server, real PostgreSQL, pinned clock."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from typer.testing import CliRunner

from cli.main import app
from core.clock import FixedClock
from promo.v1 import products_pb2 as pb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.test_cli import Cli
from tests.e2e.test_products_api import (
    assign,
    customers,
    evaluate,
    line,
    personalized,
    rid,
    select,
    stub,
)

EVENTS_HEADER = "external_id,customer_id,kind,amount,currency,occurred_at\n"


async def _until_a_backend_waits_for_a_lock(pool: asyncpg.Pool, task: asyncio.Task[object]
                                            ) -> None:
    """Poll PostgreSQL (not the clock) until a session of this database waits on a lock."""
    async with pool.acquire() as conn:
        for _ in range(500):
            if task.done() or await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the call never waited on a lock")


def _an_hour_ago(clock: FixedClock) -> str:
    return (clock.now() - timedelta(hours=1)).isoformat().replace("+00:00", "Z")


# --- CLI: derived request ids of file uploads ----------------------------------------------------

async def test_cli_assigns_one_file_to_two_promotions(api: Api, tmp_path: Path) -> None:
    """The request id `promo products assign --file` derives covers the promotion too: the same
    lists file for a second promotion is a new request, and the same command again replays."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1")
    await cli.ok("products", "create", "coffee", "--name", "Your coffee")
    await cli.ok("products", "create", "tea", "--name", "Your tea")
    lists = tmp_path / "lists.csv"
    lists.write_text("customer_id,products\nc1,espresso,latte\n")
    assert await cli.json("products", "assign", "coffee", "--file", str(lists)) == {
        "created_count": 1, "replaced_count": 0, "calls": 1}
    assert await cli.json("products", "assign", "tea", "--file", str(lists)) == {
        "created_count": 1, "replaced_count": 0, "calls": 1}
    # The same command again is the same request: the first answer, nothing replaced.
    assert await cli.json("products", "assign", "tea", "--file", str(lists)) == {
        "created_count": 1, "replaced_count": 0, "calls": 1}


async def test_cli_assigns_a_file_again_with_another_default(api: Api, tmp_path: Path) -> None:
    """`--default` is part of the derived request id: the same file with another default replaces
    the lists with the new default."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1")
    await cli.ok("products", "create", "coffee", "--name", "Your coffee")
    lists = tmp_path / "lists.csv"
    lists.write_text("c1,espresso,latte\n")
    await cli.ok("products", "assign", "coffee", "--file", str(lists))

    assert await cli.json("products", "assign", "coffee", "--file", str(lists), "--default",
                          "latte") == {"created_count": 0, "replaced_count": 1, "calls": 1}
    [entry] = (await cli.json("products", "lists", "coffee"))["product_lists"]
    assert entry["default_product_id"] == "latte"


async def test_cli_removes_one_file_from_two_promotions(api: Api, tmp_path: Path) -> None:
    """`promo products remove --file` derives its request id from the file and the promotion:
    the same file removes the customers from a second promotion, and again changes nothing."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1")
    for promotion in ("coffee", "tea"):
        await cli.ok("products", "create", promotion, "--name", f"Your {promotion}")
        await cli.ok("products", "assign", promotion, "--customer", "c1", "--product", "x")
    ids = tmp_path / "ids.csv"
    ids.write_text("customer_id\nc1\n")
    assert await cli.json("products", "remove", "coffee", "--file", str(ids)) == {
        "removed_count": 1}
    assert await cli.json("products", "remove", "tea", "--file", str(ids)) == {
        "removed_count": 1}
    assert await cli.json("products", "remove", "tea", "--file", str(ids)) == {
        "removed_count": 1}  # the same request: its first answer
    assert (await cli.json("products", "customer", "c1")).get("promotions", []) == []


async def test_cli_records_one_events_file_with_and_without_create_missing(
        api: Api, tmp_path: Path, clock: FixedClock) -> None:
    """`--create-missing` is part of the request id `promo customers record-events` derives: the
    same file with the flag toggled is a new request (its events are duplicates by then)."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1")
    events = tmp_path / "events.csv"
    events.write_text(EVENTS_HEADER + f"e1,c1,bet,10,EUR,{_an_hour_ago(clock)}\n")
    assert await cli.json("customers", "record-events", str(events)) == {
        "inserted_count": 1, "duplicate_count": 0, "created_customer_count": 0}
    assert await cli.json("customers", "record-events", str(events), "--create-missing") == {
        "inserted_count": 0, "duplicate_count": 1, "created_customer_count": 0}


# --- CLI: CSV files with a byte order mark -------------------------------------------------------

async def test_cli_reads_a_lists_csv_saved_with_a_byte_order_mark(api: Api,
                                                                  tmp_path: Path) -> None:
    """Spreadsheets save "CSV UTF-8" with a byte order mark: the header `customer_id` is still
    recognised and skipped."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1")
    await cli.ok("products", "create", "coffee", "--name", "Your coffee")
    lists = tmp_path / "lists.csv"
    lists.write_text("customer_id,products\nc1,espresso,latte\n", encoding="utf-8-sig")

    assert await cli.json("products", "assign", "coffee", "--file", str(lists)) == {
        "created_count": 1, "replaced_count": 0, "calls": 1}
    [entry] = (await cli.json("products", "lists", "coffee"))["product_lists"]
    assert (entry["customer_id"], entry["product_ids"]) == ("c1", ["espresso", "latte"])


async def test_cli_reads_an_events_csv_saved_with_a_byte_order_mark(api: Api, tmp_path: Path,
                                                                    clock: FixedClock) -> None:
    """The same for `promo customers record-events`: the first column is `external_id`."""
    cli = Cli(api, tmp_path)
    events = tmp_path / "events.csv"
    events.write_text(EVENTS_HEADER + f"e1,p1,bet,10,EUR,{_an_hour_ago(clock)}\n",
                      encoding="utf-8-sig")

    assert await cli.json("customers", "record-events", str(events), "--create-missing") == {
        "inserted_count": 1, "duplicate_count": 0, "created_customer_count": 1}
    [event] = (await cli.json("customers", "events", "p1"))["events"]
    assert event["external_id"] == "e1"


# --- CLI: numbers too large for the wire -------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("products", "basket", "evaluate", "c1", "--line", "espresso:99999999999:1.00"),
     "error: --line espresso:99999999999:1.00: quantity: 99999999999 is out of range "
     "(at most 2147483647)"),
    (("products", "create", "coffee", "--name", "Your coffee", "--max-distinct", "99999999999"),
     "error: --max-distinct: 99999999999 is out of range (at most 2147483647)"),
    (("products", "update", "coffee", "--max-distinct", "2147483648"),
     "error: --max-distinct: 2147483648 is out of range (at most 2147483647)"),
])
async def test_cli_numbers_beyond_the_wire_type_are_one_line_not_a_traceback(
        api: Api, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """Integers from flags that do not fit their int32 proto field are one error line naming the
    option, exit 1, before anything is sent."""
    cli = Cli(api, tmp_path)
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=cli.env)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [message]


# --- CLI: uploads in several calls ---------------------------------------------------------------

async def test_cli_record_events_names_the_files_position_and_what_was_written(
        api: Api, tmp_path: Path, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """A file of 10,001 events goes in two calls. When the second is refused, the error names the
    file's position of the bad event (events[10000]) and says that the first 10,000 events were
    recorded; the same command on the fixed file continues (the recorded ones are duplicates)."""
    cli = Cli(api, tmp_path)
    at = _an_hour_ago(clock)
    rows = [f"e{i},p1,bet,1,EUR,{at}" for i in range(10_000)]
    events = tmp_path / "events.csv"
    events.write_text(EVENTS_HEADER + "\n".join([*rows, f"bad,p1,bet,-1,EUR,{at}"]) + "\n")

    line_ = await cli.error("customers", "record-events", str(events), "--create-missing")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events") == 10_000
    assert line_.startswith(
        "error: INVALID_ARGUMENT: 1 problem in events: events[10000]: amount must not be "
        "negative"), line_
    assert "nothing was written" not in line_
    assert line_.endswith(
        "(INVALID_EVENTS); events[0] to events[9999] went in 1 earlier call(s) and were recorded "
        "(10,000 new, 0 duplicates), events from events[10000] on were not; run the same command "
        "again to continue (recorded events count as duplicates)"), line_

    events.write_text(EVENTS_HEADER + "\n".join([*rows, f"good,p1,bet,1,EUR,{at}"]) + "\n")
    assert await cli.json("customers", "record-events", str(events), "--create-missing") == {
        "inserted_count": 1, "duplicate_count": 10_000, "created_customer_count": 0}


async def test_cli_assign_names_the_files_line_and_what_earlier_calls_assigned(
        api: Api, tmp_path: Path) -> None:
    """Lists for 10,001 customers go in two calls; when the second is refused, the error says
    what the first assigned instead of the server's "nothing was written" for that call."""
    cli = Cli(api, tmp_path)
    people = tmp_path / "customers.json"
    people.write_text(json.dumps([{"customer_id": f"c{i}"} for i in range(10_000)]))
    await cli.ok("customers", "upsert", "--file", str(people))
    await cli.ok("products", "create", "coffee", "--name", "Your coffee")
    lists = tmp_path / "lists.csv"
    lists.write_text("".join(f"c{i},espresso\n" for i in range(10_000)) + "ghost,espresso\n")

    line_ = await cli.error("products", "assign", "coffee", "--file", str(lists))
    assert line_ == (
        "error: NOT_FOUND: unknown customer: 'ghost' (CUSTOMER_NOT_FOUND); 1 earlier call(s) "
        "assigned lists (10000 created, 0 replaced); the lists of this call and later ones were "
        "not assigned; run the same command again to continue (a list assigned again stays as "
        "it is)")
    assert len((await cli.json("products", "lists", "coffee", "--all"))["product_lists"]) \
        == 10_000


# --- product promotions: selection under concurrency ---------------------------------------------

async def test_select_racing_a_lower_maximum_is_checked_against_the_new_maximum(
        api: Api, pool: asyncpg.Pool) -> None:
    """SelectProducts checks max_distinct_products as committed once it holds the customer's
    list row, and holds the promotion FOR SHARE until it commits: a selection of 3 waiting for
    the row while the maximum goes down to 1 is refused (TOO_MANY_PRODUCTS_SELECTED)."""
    await customers(api, "c1")
    await personalized(api, max_distinct=3)
    await assign(api, ["c1"], ["espresso", "latte", "mocha"])
    async with pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        try:
            # Stands for any transaction holding the customer's list row (an ApplyBasket, an
            # assignment): the selection waits for the row.
            await holder.execute("SELECT 1 FROM customer_product_lists WHERE customer_id = 'c1'"
                                 " FOR UPDATE")
            selection = asyncio.create_task(select(api, "c1", ["espresso", "latte", "mocha"]))
            await _until_a_backend_waits_for_a_lock(pool, selection)
            assert not selection.done()
            lowered = await stub(api).UpdatePersonalizedPromotion(
                pb.UpdatePersonalizedPromotionRequest(
                    request_id=rid(), personalized_promotion=pb.PersonalizedPromotion(
                        backend_id="coffee", max_distinct_products=1),
                    update_mask=field_mask_pb2.FieldMask(paths=["max_distinct_products"])),
                metadata=api.key())
        finally:
            await tx.commit()
    assert lowered.personalized_promotion.max_distinct_products == 1
    with pytest.raises(grpc.RpcError) as refused:
        await selection
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(refused.value) == "TOO_MANY_PRODUCTS_SELECTED"
    async with pool.acquire() as conn:
        chosen = await conn.fetchval(
            "SELECT chosen_product_ids FROM customer_product_lists WHERE customer_id = 'c1'")
    assert chosen is None


# --- product promotions: selection lock ----------------------------------------------------------

async def test_a_locked_selection_sent_again_in_another_order_is_accepted(api: Api) -> None:
    """A locked choice is compared as a set: the same products in another order (a retry from a
    client that keeps them in a set) is accepted and keeps the stored order; another set of
    products is still SELECTION_LOCKED."""
    await customers(api, "c1")
    await personalized(api, lock=True)
    await assign(api, ["c1"], ["espresso", "latte", "mocha"])
    await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id="coffee-10", name="10% off your coffee",
            discount_type=pb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="10", product_sets=[
                pb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                              required_quantity=1, gets_discount=True,
                              discounted_quantity=1)])), metadata=api.key())
    await select(api, "c1", ["latte", "mocha"])
    applied = await stub(api).ApplyBasket(pb.ApplyBasketRequest(
        request_id=rid(), customer_id="c1", lines=[line("latte", 1, "4.00")]),
        metadata=api.key("runtime"))
    assert list(applied.first_applied_promotion_ids) == ["coffee"]

    again = await select(api, "c1", ["latte", "mocha"])
    assert list(again.chosen_product_ids) == ["latte", "mocha"]
    reordered = await select(api, "c1", ["mocha", "latte"])
    assert list(reordered.chosen_product_ids) == ["latte", "mocha"]
    assert reordered.selection_locked
    for other in (["latte"], ["latte", "mocha", "espresso"]):
        with pytest.raises(grpc.RpcError) as locked:
            await select(api, "c1", other)
        assert locked.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error_reason(locked.value) == "SELECTION_LOCKED"


# --- product promotions: basket evaluation -------------------------------------------------------

async def test_overlapping_unmarked_sets_still_find_a_qualifying_basket(api: Api) -> None:
    """Unmarked sets sharing products are assigned exactly when taking units in line order
    fails: set 'Spread' {jam, bread} takes the bread and set 'Jam' {jam} the jam, so the
    discount applies."""
    await customers(api, "c1")
    await personalized(api)
    await assign(api, ["c1"], ["espresso"])
    await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id="jam-deal", name="Jam deal", discount_type=pb.DISCOUNT_TYPE_AMOUNT_OFF,
            value="1.00", product_sets=[
                pb.ProductSet(name="Spread", product_ids=["jam", "bread"], required_quantity=1),
                pb.ProductSet(name="Jam", product_ids=["jam"], required_quantity=1),
                pb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                              required_quantity=1, gets_discount=True,
                              discounted_quantity=1)])), metadata=api.key())

    evaluation = await evaluate(api, "c1", [line("jam", 1, "3.00"), line("bread", 1, "2.00"),
                                            line("espresso", 1, "2.50")])
    [outcome] = evaluation.outcomes
    assert outcome.applied, outcome.explanation
    assert outcome.explanation == (
        "applied: set 'Spread' has the 1 product required; set 'Jam' has the 1 product "
        "required; 1.00 off each of 1 product of set 'Your coffee' (selected in personalized "
        "promotion 'coffee': espresso)")
    assert evaluation.discount_total == "1.00"
    assert [(d.line_index, d.product_id, d.amount) for d in evaluation.discount_lines] == [
        (2, "espresso", "1.00")]

    # Without the bread no assignment serves both sets: the shortage is named.
    [short] = (await evaluate(api, "c1", [line("jam", 1, "3.00"),
                                          line("espresso", 1, "2.50")])).outcomes
    assert not short.applied
    assert short.explanation == (
        "not applied: set 'Jam' needs 1 product in the basket, found 0")


async def test_a_percentage_that_rounds_to_no_cent_says_so(api: Api) -> None:
    """1% of 0.40 is 0.004, which rounds to 0.00: the discount does not apply, and the outcome
    says that the percentage rounds to less than a cent."""
    await customers(api, "c1")
    await personalized(api)
    await assign(api, ["c1"], ["candy"])
    await stub(api).CreateProductSetDiscount(pb.CreateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=pb.ProductSetDiscount(
            discount_id="one-percent", name="1% off", discount_type=pb.DISCOUNT_TYPE_PERCENTAGE_OFF,
            value="1", product_sets=[
                pb.ProductSet(name="Your pick", personalized_promotion_id="coffee",
                              required_quantity=1, gets_discount=True,
                              discounted_quantity=1)])), metadata=api.key())

    [outcome] = (await evaluate(api, "c1", [line("candy", 1, "0.40")])).outcomes
    assert not outcome.applied
    assert outcome.amount == "0.00"
    assert outcome.explanation == (
        "not applied: 1% off the discounted products rounds to less than a cent")


# --- the customers API ---------------------------------------------------------------------------

async def test_an_event_id_reused_by_another_customer_is_refused_not_dropped(
        api: Api, tmp_path: Path, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """RecordEvents is idempotent on each external_id (proto), which is global. An event of
    another customer, or with another amount, under an existing external_id used to be counted
    as a duplicate and dropped without an error; now the file is refused naming the event, and
    nothing of it is kept (not even the customer it would have created)."""
    cli = Cli(api, tmp_path)
    at = _an_hour_ago(clock)
    first = tmp_path / "first.csv"
    first.write_text(EVENTS_HEADER + f"1,p1,deposit,100,EUR,{at}\n")
    second = tmp_path / "second.csv"
    second.write_text(EVENTS_HEADER + f"1,p2,deposit,250,EUR,{at}\n")
    assert await cli.json("customers", "record-events", str(first), "--create-missing") == {
        "inserted_count": 1, "duplicate_count": 0, "created_customer_count": 1}
    line_ = await cli.error("customers", "record-events", str(second), "--create-missing")
    assert line_.startswith(
        "error: INVALID_ARGUMENT: 1 problem in events, nothing was written: events[0]: "
        "external_id '1' is already stored for a different event (customer 'p1', deposit 100 "
        "EUR at "), line_
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events WHERE customer_id = 'p2'") == 0
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE customer_id = 'p2'") == 0
