"""storage.events and storage.customers against real PostgreSQL: batch ingestion (COPY + one
INSERT), duplicates, the unknown-customer policy, concurrency, exact values, newest-first paging."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from core.customers import Customer, Event
from core.errors import NotFound
from storage import customers as customers_repo
from storage import events as events_repo

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def ev(external_id: str, customer_id: str = "c1", *, kind: str = "bet", amount: str = "1",
       at: datetime = T0, **attributes: str) -> Event:
    return Event(external_id=external_id, customer_id=customer_id, kind=kind,
                 amount=Decimal(amount), currency="EUR", occurred_at=at, attributes=attributes)


async def insert(pool: asyncpg.Pool, events: list[Event], *,
                 create_missing: bool = False) -> events_repo.InsertOutcome:
    async with pool.acquire() as conn, conn.transaction():
        return await events_repo.insert_batch(conn, events, create_missing=create_missing)


async def test_insert_counts_duplicates_and_keeps_values_exact(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await customers_repo.upsert(conn, [Customer(customer_id="c1")])
    first = await insert(pool, [ev("a", amount="12345678901234.123456", game="g1"),
                                ev("b", amount="0.000001", kind="withdrawal")])
    assert (first.inserted, first.duplicates, first.created_customers) == (2, 0, 0)
    again = await insert(pool, [ev("a", amount="999"), ev("c")])
    assert (again.inserted, again.duplicates) == (1, 1)
    async with pool.acquire() as conn:
        rows = await events_repo.list_for_customer(conn, "c1", kinds=[], before=None, limit=10)
    by_id = {e.external_id: e for e in rows}
    assert by_id["a"].amount == Decimal("12345678901234.123456")  # the first one is kept
    assert by_id["a"].attributes == {"game": "g1"}
    assert by_id["b"].amount == Decimal("0.000001")


async def test_ids_follow_external_id_order_within_a_batch(pool: asyncpg.Pool) -> None:
    names = [f"e{i:03d}" for i in range(200)]
    await insert(pool, [ev(n) for n in reversed(names)], create_missing=True)
    ordered = [r["external_id"] for r in await pool.fetch(
        "SELECT external_id FROM events ORDER BY id")]
    assert ordered == names


async def test_missing_customers_are_reported_and_nothing_is_inserted(
        pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await customers_repo.upsert(conn, [Customer(customer_id="known")])
    outcome = await insert(pool, [ev("a", "known"), ev("b", "x"), ev("c", "y"), ev("d", "x")])
    assert outcome.missing_customers == {"x", "y"}
    assert outcome.inserted == 0
    assert await pool.fetchval("SELECT count(*) FROM events") == 0


async def test_create_missing_customers_in_the_same_statement(pool: asyncpg.Pool) -> None:
    outcome = await insert(pool, [ev("a", "x"), ev("b", "y"), ev("c", "x")],
                           create_missing=True)
    assert (outcome.inserted, outcome.created_customers) == (3, 2)
    assert outcome.missing_customers == frozenset()
    async with pool.acquire() as conn:
        created = await customers_repo.get(conn, "x")
    assert (created.time_zone, created.currency, created.properties) == (None, None, {})


async def test_needs_a_transaction_and_may_run_twice_in_one(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="needs a transaction"):
            await events_repo.insert_batch(conn, [ev("a")], create_missing=True)
        async with conn.transaction():
            first = await events_repo.insert_batch(conn, [ev("a"), ev("b")], create_missing=True)
            second = await events_repo.insert_batch(conn, [ev("b"), ev("c")],
                                                    create_missing=True)
    assert (first.inserted, second.inserted, second.duplicates) == (2, 1, 1)


async def test_concurrent_overlapping_batches_insert_each_event_once(pool: asyncpg.Pool) -> None:
    batches = [[ev(f"e{i}", f"c{i % 7}") for i in range(start, start + 300)]
               for start in (0, 100, 200, 0)]
    outcomes = await asyncio.gather(*(insert(pool, b, create_missing=True) for b in batches))
    assert sum(o.inserted for o in outcomes) == 500
    assert sum(o.inserted + o.duplicates for o in outcomes) == 1200
    assert sum(o.created_customers for o in outcomes) == 7
    assert await pool.fetchval("SELECT count(*) FROM events") == 500


async def test_overlapping_batches_in_opposite_orders_do_not_deadlock(pool: asyncpg.Pool) -> None:
    # Each batch holds its row locks until commit; sorted inserts make them queue, not deadlock.
    forward = [ev(f"e{i:04d}", f"c{i % 50:02d}") for i in range(2000)]
    for _ in range(3):
        await pool.execute("TRUNCATE events, customers")
        outcomes = await asyncio.gather(
            *(insert(pool, batch, create_missing=True)
              for batch in (forward, forward[::-1], forward[1000:] + forward[:1000])))
        assert sum(o.inserted for o in outcomes) == 2000
        assert sum(o.created_customers for o in outcomes) == 50


async def test_newest_first_paging_with_ties_and_kinds(pool: asyncpg.Pool) -> None:
    events = [ev(f"e{i:02d}", at=T0 + timedelta(minutes=i // 3),
                 kind="deposit" if i % 2 else "bet") for i in range(12)]
    await insert(pool, events, create_missing=True)
    await insert(pool, [ev("other", "c2")], create_missing=True)
    seen: list[str] = []
    before = None
    async with pool.acquire() as conn:
        while True:
            page = await events_repo.list_for_customer(conn, "c1", kinds=[], before=before,
                                                       limit=5)
            seen += [e.external_id for e in page]
            if len(page) < 5:
                break
            assert page[-1].event_id is not None
            before = (page[-1].occurred_at, page[-1].event_id)
        deposits = await events_repo.list_for_customer(conn, "c1", kinds=["deposit"],
                                                       before=None, limit=100)
    assert seen == [f"e{i:02d}" for i in reversed(range(12))]
    assert [e.external_id for e in deposits] == [f"e{i:02d}" for i in reversed(range(12))
                                                 if i % 2]


async def test_customers_upsert_get_list_and_missing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        first = await customers_repo.upsert(conn, [
            Customer(customer_id="b", time_zone="Europe/Malta", currency="EUR",
                     properties={"balance": Decimal("-0.000001"), "big": Decimal("1E+3"),
                                 "vip": False, "name": 'quote " and \\ slash'}),
            Customer(customer_id="a")])
        assert (first.created, first.updated) == (2, 0)
        second = await customers_repo.upsert(conn, [Customer(customer_id="a", currency="USD"),
                                                    Customer(customer_id="c")])
        assert (second.created, second.updated) == (1, 1)
        b = await customers_repo.get(conn, "b")
        assert b.properties == {"balance": Decimal("-0.000001"), "big": Decimal("1000"),
                                "vip": False, "name": 'quote " and \\ slash'}
        assert isinstance(b.properties["big"], Decimal)
        a = await customers_repo.get(conn, "a")
        assert a.currency == "USD"
        assert a.update_time is not None and a.create_time is not None
        page = await customers_repo.list_page(conn, after_id="a", limit=10)
        assert [c.customer_id for c in page] == ["b", "c"]
        assert await customers_repo.missing(conn, ["a", "zz", "zz", "c", "yy"]) == {"zz", "yy"}
        with pytest.raises(NotFound):
            await customers_repo.get(conn, "nobody")


async def test_schema_refuses_what_validation_refuses(pool: asyncpg.Pool) -> None:
    # The checks in the table are a last line of defence behind core.customers.
    await pool.execute("INSERT INTO customers (customer_id) VALUES ('c1')")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency, occurred_at)
               VALUES ('x', 'c1', 'Bet', 1, 'EUR', now())""")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency, occurred_at)
               VALUES ('x', 'c1', 'bet', 1, 'eur', now())""")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency, occurred_at)
               VALUES ('x', 'nobody', 'bet', 1, 'EUR', now())""")
