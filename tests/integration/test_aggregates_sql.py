"""storage.aggregates against the formula core's reference semantics (core.formula.memory):
SQL and memory must agree exactly (Decimal equality) for generated events and aggregates,
including missing attributes, in / not in, numeric comparisons with text, ties on occurred_at,
empty windows and window edges."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.customers import Event, typed_attributes
from core.formula.memory import EventRecord, aggregate_in_memory_by_customer
from core.formula.model import AGGREGATE_FUNCTIONS, ORDERING_OPS, AggregateSpec, Filter
from storage import aggregates
from storage import events as events_repo

BASE = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CUSTOMERS = ("c0", "c1", "c2", "c3")  # c3 never gets events
KINDS = ("bet", "win", "bonus_fix")
ATTRIBUTES = ("game", "rtp", "cat")
# Text, numeric-looking text (a number for formulas), and text that only nearly looks numeric.
ATTRIBUTE_VALUES = ("Roulette", "Slots", "5", "5.0", "-3.25", "007", "10", "5a", "", " 5",
                    "1e3", "0.000001")
FILTER_TEXTS = ("Roulette", "Slots", "5", "5a", "", "EUR", "USD")
FILTER_NUMBERS = tuple(Decimal(v) for v in ("5", "5.00", "-3.25", "7", "0", "10", "0.000001",
                                            "100.5"))
FILTER_ATTRIBUTES = (*ATTRIBUTES, "amount", "currency", "missing")
FIELDS = ("amount", "rtp", "game", "currency", "missing")


@dataclass(frozen=True)
class GenEvent:
    customer_id: str
    kind: str
    amount: Decimal
    currency: str
    offset_s: int  # seconds after BASE: few distinct values, so ties are common
    attributes: dict[str, str]


amounts = st.decimals(min_value=Decimal("-1000"), max_value=Decimal("1000"), places=6,
                      allow_nan=False, allow_infinity=False)
gen_events = st.builds(
    GenEvent, customer_id=st.sampled_from(CUSTOMERS[:3]), kind=st.sampled_from(KINDS),
    amount=amounts | st.sampled_from([Decimal("0"), Decimal("5"), Decimal("100.5")]),
    currency=st.sampled_from(("EUR", "USD")), offset_s=st.integers(0, 5),
    attributes=st.dictionaries(st.sampled_from(ATTRIBUTES), st.sampled_from(ATTRIBUTE_VALUES),
                               max_size=2))


@st.composite
def filters(draw: st.DrawFn) -> Filter:
    attribute = draw(st.sampled_from(FILTER_ATTRIBUTES))
    # Negations twice as likely: they are where NULL handling goes wrong.
    op = draw(st.sampled_from(("=", "!=", "!=", "in", "not in", "not in", "<", ">", "<=", ">=")))
    if op in ORDERING_OPS:
        return Filter(attribute, op, (draw(st.sampled_from(FILTER_NUMBERS)),))
    values = st.sampled_from(FILTER_TEXTS) | st.sampled_from(FILTER_NUMBERS)
    count = 1 if op in ("=", "!=") else draw(st.integers(1, 3))
    return Filter(attribute, op, tuple(draw(values) for _ in range(count)))


@st.composite
def spec_lists(draw: st.DrawFn) -> list[AggregateSpec]:
    specs = []
    for index in range(draw(st.integers(2, 6))):
        func = draw(st.sampled_from(AGGREGATE_FUNCTIONS))
        field = None if func == "count" else draw(st.sampled_from(FIELDS))
        specs.append(AggregateSpec(key=f"a{index}", func=func, kind=draw(st.sampled_from(KINDS)),
                                   field=field,
                                   filters=tuple(draw(st.lists(filters(), min_size=1,
                                                               max_size=2)))))
    return specs


_external_ids = itertools.count()


async def store(conn: asyncpg.Connection, events: Sequence[GenEvent]
                ) -> list[tuple[str, EventRecord]]:
    """Insert ``events``; the reference records (typed attributes, as core.customers says)."""
    # Zero-padded: one batch goes in sorted by external id, so ids follow the list's order.
    stored = [Event(external_id=f"x{next(_external_ids):09d}", customer_id=g.customer_id,
                    kind=g.kind, amount=g.amount, currency=g.currency,
                    occurred_at=BASE + timedelta(seconds=g.offset_s), attributes=g.attributes)
              for g in events]
    if stored:
        async with conn.transaction():
            await events_repo.insert_batch(conn, stored, create_missing=True)
    ids = {r["external_id"]: r["id"] for r in await conn.fetch(
        "SELECT external_id, id FROM events WHERE external_id = ANY($1::text[])",
        [e.external_id for e in stored])}
    return [(e.customer_id, EventRecord(event_id=ids[e.external_id], kind=e.kind,
                                        amount=e.amount, currency=e.currency,
                                        occurred_at=e.occurred_at,
                                        attributes=typed_attributes(e.attributes)))
            for e in stored]


def reference(specs: Sequence[AggregateSpec], records: Sequence[tuple[str, EventRecord]],
              windows: dict[str, tuple[datetime, datetime]]) -> dict[str, object]:
    inside = [(c, r) for c, r in records
              if c in windows and windows[c][0] <= r.occurred_at < windows[c][1]]
    return aggregate_in_memory_by_customer(specs, inside, customer_ids=list(windows))


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        await connection.execute("INSERT INTO customers (customer_id) SELECT unnest($1::text[])",
                                 list(CUSTOMERS))
        yield connection


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=st.lists(gen_events, min_size=5, max_size=40), specs=spec_lists(),
       start_s=st.integers(0, 3), length_s=st.integers(0, 6),
       per_customer=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6)), min_size=4,
                             max_size=4))
async def test_sql_equals_the_reference(
        conn: asyncpg.Connection, events: list[GenEvent], specs: list[AggregateSpec],
        start_s: int, length_s: int, per_customer: list[tuple[int, int]]) -> None:
    transaction = conn.transaction()
    await transaction.start()
    try:
        records = await store(conn, events)
        start = BASE + timedelta(seconds=start_s)
        end = start + timedelta(seconds=length_s)
        got = await aggregates.aggregate_for_customers(conn, specs, CUSTOMERS, start, end,
                                                       chunk_size=3)
        expected = reference(specs, records, dict.fromkeys(CUSTOMERS, (start, end)))
        assert got == expected

        # The loader gives the same records as what was stored.
        loaded = await aggregates.event_records(conn, CUSTOMERS, start, end)
        assert reference(specs, loaded, dict.fromkeys(CUSTOMERS, (start, end))) == expected

        windows = {c: (BASE + timedelta(seconds=s), BASE + timedelta(seconds=s + n))
                   for c, (s, n) in zip(CUSTOMERS, per_customer, strict=True)}
        got_windows = await aggregates.aggregate_for_windows(
            conn, specs, [(c, s, e) for c, (s, e) in windows.items()], chunk_size=3)
        assert got_windows == reference(specs, records, windows)
    finally:
        await transaction.rollback()


# --- the cases the generator must not miss, spelled out ------------------------------------

def spec(func: str, kind: str = "bet", field: str | None = "amount", *filters: Filter,
         key: str = "k") -> AggregateSpec:
    return AggregateSpec(key=key, func=func, kind=kind, field=field, filters=tuple(filters))


async def run(conn: asyncpg.Connection, specs: list[AggregateSpec], events: list[GenEvent],
              start_s: int = 0, end_s: int = 10) -> dict[str, object]:
    records = await store(conn, events)
    start, end = BASE + timedelta(seconds=start_s), BASE + timedelta(seconds=end_s)
    got = await aggregates.aggregate_for_customers(conn, specs, CUSTOMERS, start, end)
    assert got == reference(specs, records, dict.fromkeys(CUSTOMERS, (start, end)))
    return {c: {k: (v.value, v.count) for k, v in got[c].items()} for c in got}


def g(offset_s: int = 1, amount: str = "10", kind: str = "bet", customer: str = "c0",
      currency: str = "EUR", **attributes: str) -> GenEvent:
    return GenEvent(customer, kind, Decimal(amount), currency, offset_s, attributes)


async def test_missing_attribute_matches_only_negations(conn: asyncpg.Connection) -> None:
    events = [g(amount="1", cat="Roulette"), g(amount="2", cat="Slots"), g(amount="4")]
    cases = {
        Filter("cat", "!=", ("Roulette",)): Decimal(6),
        Filter("cat", "not in", ("Roulette", "Slots")): Decimal(4),
        Filter("cat", "=", ("Slots",)): Decimal(2),
        Filter("cat", "in", ("Roulette", "Slots")): Decimal(3),
        Filter("cat", ">", (Decimal(0),)): Decimal(0),
    }
    specs = [spec("sum", "bet", "amount", f, key=f"k{i}") for i, f in enumerate(cases)]
    got = await run(conn, specs, events)
    assert [got["c0"][f"k{i}"][0] for i in range(len(cases))] == list(cases.values())


async def test_numeric_comparisons_on_text_values(conn: asyncpg.Connection) -> None:
    events = [g(amount="1", rtp="96.5"), g(amount="2", rtp="high"), g(amount="4", rtp="97"),
              g(amount="8", rtp="1e3"), g(amount="16", rtp="097.0")]
    specs = [spec("sum", "bet", "amount", Filter("rtp", ">", (Decimal("96.9"),)), key="gt"),
             spec("sum", "bet", "amount", Filter("rtp", "=", (Decimal("97"),)), key="eq"),
             spec("sum", "bet", "amount", Filter("rtp", "=", ("97",)), key="eq_text"),
             spec("sum", "bet", "amount", Filter("rtp", "!=", ("high",)), key="ne_text"),
             spec("sum", "bet", "rtp", key="sum_rtp"), spec("avg", "bet", "rtp", key="avg_rtp"),
             spec("max", "bet", "rtp", key="max_rtp")]
    got = (await run(conn, specs, events))["c0"]
    assert got["gt"] == (Decimal(20), 2)  # "97" and "097.0"; "high" and "1e3" are not numbers
    assert got["eq"] == (Decimal(20), 2)
    assert got["eq_text"] == (Decimal(0), 0)  # "97" is a number: text never equals it
    assert got["ne_text"] == (Decimal(29), 4)
    assert got["sum_rtp"] == (Decimal("290.5"), 3)
    assert got["avg_rtp"][1] == 3 and got["max_rtp"] == (Decimal(97), 3)


async def test_pseudo_attributes_amount_and_currency(conn: asyncpg.Connection) -> None:
    events = [g(amount="5", currency="EUR"), g(amount="50", currency="USD"),
              g(amount="500", currency="EUR")]
    specs = [spec("count", "bet", None, Filter("amount", ">=", (Decimal("50"),)), key="big"),
             spec("sum", "bet", "amount", Filter("currency", "=", ("EUR",)), key="eur"),
             spec("sum", "bet", "amount", Filter("amount", "in", (Decimal(5), "5")), key="in"),
             spec("sum", "bet", "currency", key="not_a_number")]
    got = (await run(conn, specs, events))["c0"]
    assert got == {"big": (Decimal(2), 2), "eur": (Decimal(505), 2), "in": (Decimal(5), 1),
                   "not_a_number": (Decimal(0), 0)}


async def test_first_and_last_break_ties_by_event_id(conn: asyncpg.Connection) -> None:
    # Two pairs at the same instants; ids follow the list's order (see store).
    events = [g(offset_s=3, amount="2"), g(offset_s=3, amount="1"), g(offset_s=5, amount="4"),
              g(offset_s=5, amount="3"), g(offset_s=1, amount="7", kind="win")]
    specs = [spec("first", key="first"), spec("last", key="last"),
             spec("min", key="min"), spec("max", key="max"), spec("avg", key="avg")]
    got = (await run(conn, specs, events))["c0"]
    assert got["first"] == (Decimal(2), 4)  # the smaller id of the earliest pair
    assert got["last"] == (Decimal(3), 4)  # the larger id of the latest pair
    assert (got["min"][0], got["max"][0]) == (Decimal(1), Decimal(4))
    assert got["avg"] == (Decimal("2.5"), 4)


async def test_window_edges_and_empty_windows(conn: asyncpg.Connection) -> None:
    events = [g(offset_s=2, amount="1"), g(offset_s=5, amount="10"), g(offset_s=6, amount="100")]
    specs = [spec("sum", key="s"), spec("count", field=None, key="n"), spec("first", key="f"),
             spec("avg", key="a")]
    got = await run(conn, specs, events, start_s=2, end_s=6)
    assert got["c0"] == {"s": (Decimal(11), 2), "n": (Decimal(2), 2), "f": (Decimal(1), 2),
                         "a": (Decimal("5.5"), 2)}
    empty = {"s": (Decimal(0), 0), "n": (Decimal(0), 0), "f": (None, 0), "a": (None, 0)}
    assert got["c3"] == empty  # no events at all
    nothing = await aggregates.aggregate_for_customers(
        conn, specs, ["c0"], BASE + timedelta(seconds=3), BASE + timedelta(seconds=3))
    assert {k: (v.value, v.count) for k, v in nothing["c0"].items()} == empty


async def test_per_customer_windows(conn: asyncpg.Connection) -> None:
    await store(conn, [g(offset_s=1, customer="c0"), g(offset_s=5, customer="c0", amount="7"),
                       g(offset_s=1, customer="c1", amount="3")])
    got = await aggregates.aggregate_for_windows(
        conn, [spec("sum", key="s")],
        [("c0", BASE + timedelta(seconds=2), BASE + timedelta(seconds=9)),
         ("c1", BASE, BASE + timedelta(seconds=2)), ("c3", BASE, BASE + timedelta(days=1))])
    assert {c: v["s"].value for c, v in got.items()} == {"c0": Decimal(7), "c1": Decimal(3),
                                                         "c3": Decimal(0)}
    with pytest.raises(ValueError, match="more than one window"):
        await aggregates.aggregate_for_windows(conn, [spec("sum")],
                                               [("c0", BASE, BASE), ("c0", BASE, BASE)])


async def test_one_statement_per_chunk_and_parameters_only(conn: asyncpg.Connection) -> None:
    hostile = "x'); DROP TABLE events; --"
    specs = [spec("sum", "bet", "amount", Filter(attribute="game", op="=", values=(hostile,)),
                  key="s")]
    sql, params = aggregates.customers_sql(specs)
    assert hostile not in sql and "game" not in sql and "'bet'" not in sql
    assert hostile in params and "game" in params
    assert sql.count("FROM events") == 1
    got = await aggregates.aggregate_for_customers(conn, specs, [f"n{i}" for i in range(25)],
                                                   BASE, BASE + timedelta(days=1), chunk_size=10)
    assert len(got) == 25
    assert await conn.fetchval("SELECT count(*) FROM events") == 0
