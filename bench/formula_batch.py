"""The dynamic-bonus formula batch against the bare SQL it has to read.

What it measures: a formula with three filtered aggregates and tiers, over a 7-day window, for
every customer: ``storage.aggregates.aggregate_for_customers`` (chunked statements over the
covering index) plus ``CompiledFormula.evaluate`` per customer, end to end (the "formula
batch"); against one plain ``GROUP BY`` statement computing the same three sums/counts with the
same filters over the same window, no Python evaluation (the "bare SQL"). Interleaved A B A B
(DESIGN "Measuring on these machines"), median of the per-pair ratios; target ratio <= 1.3.

Data: 100,000 customers and 5,000,000 events over 30 days (``--quick``: 10,000 / 500,000),
written with binary COPY into a fresh database ``promo_bench_formula_<pid>`` that is dropped at
the end; generation is not measured. Customers' activity is skewed (a few are very active, many
are not), events arrive in time order, bets and wins carry game and game_category attributes.

Usage::

    .venv/bin/python -m bench.formula_batch [--quick] [--dsn postgresql://...] [--pairs N]

The last line of output is one JSON object (for scripts): ratio, batch_s, bare_sql_s,
customers, events, events_per_s (events in the window per second of formula batch) and
peak_rss_mb (of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import statistics
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from bench.common import default_database_url, scratch_database
from core.formula.compiler import CompiledFormula, compile_formula
from core.formula.evaluator import Evaluation
from core.formula.model import FormulaInputs
from storage import aggregates
from storage.db import create_pool

FORMULA = """\
net = sum(bet.amount where game_category != "Roulette") -
      sum(win.amount where game_category != "Roulette")
deposits = count(deposit)
if deposits > 5 and net > 500 then net * 5% elif net > 300 then net * 3% else net * 1%
"""

BARE_SQL = """\
SELECT customer_id,
       coalesce(sum(amount) FILTER (WHERE kind = 'bet'
                AND (attributes ->> 'game_category') IS DISTINCT FROM 'Roulette'), 0) AS bets,
       coalesce(sum(amount) FILTER (WHERE kind = 'win'
                AND (attributes ->> 'game_category') IS DISTINCT FROM 'Roulette'), 0) AS wins,
       count(*) FILTER (WHERE kind = 'deposit') AS deposits
  FROM events
 WHERE occurred_at >= $1 AND occurred_at < $2
 GROUP BY customer_id"""

T0 = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 30
WINDOW = timedelta(days=7)
CATEGORIES = ("Slots", "Slots", "Roulette", "Live", "Blackjack")
KINDS = (("bet", 55), ("win", 30), ("deposit", 8), ("withdrawal", 5), ("bonus_credit", 2))


def _jsonb(value: dict[str, str]) -> bytes:
    """jsonb's binary COPY format: version 1, then the JSON text."""
    return b"\x01" + json.dumps(value, separators=(",", ":")).encode()


def customer_ids(count: int) -> list[str]:
    return [f"cust-{i:07d}" for i in range(count)]


def generate_events(n_events: int, n_customers: int, seed: int = 42,
                    chunk: int = 200_000) -> Iterator[list[tuple[Any, ...]]]:
    """Events in time order, in chunks (so memory stays flat), as COPY records."""
    rng = random.Random(seed)
    ids = customer_ids(n_customers)
    kinds = [k for k, weight in KINDS for _ in range(weight)]
    games = [_jsonb({"game": f"game_{g:03d}", "game_category": CATEGORIES[g % len(CATEGORIES)]})
             for g in range(200)]
    methods = [_jsonb({"method": m}) for m in ("card", "bank", "wallet")]
    cents = [Decimal(c).scaleb(-2) for c in range(0, 50_001)]
    span_us = DAYS * 86_400 * 1_000_000
    rows: list[tuple[Any, ...]] = []
    for i in range(n_events):
        kind = kinds[rng.randrange(100)]
        if kind == "bet":
            amount, attributes = cents[rng.randrange(10, 10_001)], games[rng.randrange(200)]
        elif kind == "win":
            amount, attributes = cents[rng.randrange(0, 30_001)], games[rng.randrange(200)]
        elif kind in ("deposit", "withdrawal"):
            amount, attributes = cents[rng.randrange(1_000, 50_001)], methods[rng.randrange(3)]
        else:
            amount, attributes = -cents[rng.randrange(0, 501)], _jsonb({})
        customer = ids[int(n_customers * rng.random() ** 1.5)]
        occurred_at = T0 + timedelta(microseconds=span_us * i // n_events + rng.randrange(1000))
        rows.append((f"ev{i:09d}", customer, kind, amount, "EUR", occurred_at, attributes))
        if len(rows) == chunk:
            yield rows
            rows = []
    if rows:
        yield rows


async def load(conn: asyncpg.Connection, n_customers: int, n_events: int) -> None:
    """COPY customers and events into a migrated database, with the events' secondary indexes
    and constraints dropped meanwhile (re-created afterwards from their own definitions, so the
    schema is exactly the migration's)."""
    await conn.set_type_codec("jsonb", encoder=lambda b: b, decoder=lambda b: b,
                              schema="pg_catalog", format="binary")
    await conn.copy_records_to_table(
        "customers", columns=("customer_id", "time_zone", "currency"),
        records=[(c, "Europe/Malta", "EUR") for c in customer_ids(n_customers)])
    constraints = await conn.fetch(
        """SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
            WHERE conrelid = 'events'::regclass AND contype IN ('u', 'f')""")
    indexes = await conn.fetch(
        """SELECT indexname, indexdef FROM pg_indexes
            WHERE tablename = 'events' AND indexname NOT IN (
                SELECT conname FROM pg_constraint WHERE conrelid = 'events'::regclass)""")
    for row in constraints:
        await conn.execute(f'ALTER TABLE events DROP CONSTRAINT "{row["conname"]}"')
    for row in indexes:
        await conn.execute(f'DROP INDEX "{row["indexname"]}"')
    for rows in generate_events(n_events, n_customers):
        await conn.copy_records_to_table(
            "events", columns=("external_id", "customer_id", "kind", "amount", "currency",
                               "occurred_at", "attributes"), records=rows)
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for row in indexes:
        await conn.execute(row["indexdef"])
    for row in constraints:
        await conn.execute(f'ALTER TABLE events ADD CONSTRAINT "{row["conname"]}" {row["def"]}')
    await conn.execute("VACUUM (ANALYZE) customers")
    await conn.execute("VACUUM (ANALYZE) events")  # all-visible pages: index-only scans


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The batch allocates a few objects per customer and frees none until it ends; Python's
    cyclic GC would otherwise re-scan the growing result over and over (measured: 25-40% of the
    batch's time at 100,000 customers). Nothing in it forms reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def formula_batch(pool: asyncpg.Pool, formula: CompiledFormula, ids: Sequence[str],
                        start: datetime, end: datetime, chunk_size: int
                        ) -> dict[str, Evaluation]:
    """The formula batch: each chunk's aggregates are evaluated while the database computes
    the next chunk; customers without events share one (read-only) aggregates mapping, so they
    share one evaluation too."""
    results: dict[str, Evaluation] = {}
    evaluate = formula.evaluate
    shared: dict[int, Evaluation] = {}  # id of a shared mapping -> its evaluation
    with paused_gc():
        async with pool.acquire() as conn:
            chunks = aggregates.iter_aggregates_for_customers(
                conn, formula.aggregates, ids, start, end, chunk_size=chunk_size)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    for customer_id, values in chunk.items():
                        if type(values) is dict:
                            results[customer_id] = evaluate(FormulaInputs(aggregates=values))
                            continue
                        result = shared.get(id(values))
                        if result is None:
                            result = shared[id(values)] = evaluate(
                                FormulaInputs(aggregates=values))
                        results[customer_id] = result
    return results


async def bare_sql(pool: asyncpg.Pool, start: datetime, end: datetime) -> list[Any]:
    async with pool.acquire() as conn:
        return list(await conn.fetch(BARE_SQL, start, end))


async def check_same(pool: asyncpg.Pool, formula: CompiledFormula, ids: Sequence[str],
                     start: datetime, end: datetime, chunk_size: int) -> None:
    """The two sides must read the same numbers, or the comparison means nothing."""
    async with pool.acquire() as conn:
        values = await aggregates.aggregate_for_customers(
            conn, formula.aggregates, ids, start, end, chunk_size=chunk_size)
    bare = {r["customer_id"]: (r["bets"], r["wins"], r["deposits"])
            for r in await bare_sql(pool, start, end)}
    keys = [s.key for s in formula.aggregates]
    for customer_id, agg in values.items():
        got = tuple(agg[k].value for k in keys)
        want = bare.get(customer_id, (Decimal(0), Decimal(0), 0))
        if got != want:
            raise AssertionError(f"{customer_id}: batch {got} != bare SQL {want}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n_customers = args.customers or (10_000 if args.quick else 100_000)
    n_events = args.events or (500_000 if args.quick else 5_000_000)
    pairs = args.pairs or (3 if args.quick else 5)
    async with scratch_database(args.dsn, f"promo_bench_formula_{os.getpid()}") as dsn:
        started = time.perf_counter()
        conn = await asyncpg.connect(dsn)
        try:
            await load(conn, n_customers, n_events)
        finally:
            await conn.close()
        generation_s = time.perf_counter() - started
        pool = await create_pool(dsn, min_size=2, max_size=4)
        try:
            return await measure(pool, n_customers, n_events, pairs, generation_s, args)
        finally:
            await pool.close()


async def measure(pool: asyncpg.Pool, n_customers: int, n_events: int, pairs: int,
                  generation_s: float, args: argparse.Namespace) -> dict[str, Any]:
    formula = compile_formula(FORMULA)
    ids = customer_ids(n_customers)
    end = T0 + timedelta(days=DAYS)
    start = end - WINDOW
    in_window = await pool.fetchval(
        "SELECT count(*) FROM events WHERE occurred_at >= $1 AND occurred_at < $2", start, end)
    await check_same(pool, formula, ids, start, end, args.chunk_size)
    await bare_sql(pool, start, end)  # warm both paths' caches before timing
    await formula_batch(pool, formula, ids, start, end, args.chunk_size)

    batch_times: list[float] = []
    bare_times: list[float] = []
    for _ in range(pairs):
        t = time.perf_counter()
        results = await formula_batch(pool, formula, ids, start, end, args.chunk_size)
        batch_times.append(time.perf_counter() - t)
        assert len(results) == n_customers
        t = time.perf_counter()
        await bare_sql(pool, start, end)
        bare_times.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(batch_times, bare_times, strict=True)]

    print(f"customers {n_customers:,}  events {n_events:,} ({in_window:,} in the 7-day window)  "
          f"generation {generation_s:.1f} s  chunk {args.chunk_size}")
    print(f"{'pair':>4}  {'formula batch s':>15}  {'bare SQL s':>10}  {'ratio':>6}")
    for i, (a, b, r) in enumerate(zip(batch_times, bare_times, ratios, strict=True), 1):
        print(f"{i:>4}  {a:>15.3f}  {b:>10.3f}  {r:>6.2f}")
    batch_s, bare_s = statistics.median(batch_times), statistics.median(bare_times)
    print(f"median ratio {statistics.median(ratios):.2f} (target <= 1.3); "
          f"{in_window / batch_s:,.0f} window events/s through the formula batch; "
          f"peak RSS {peak_rss_mb():.0f} MiB")
    return {"bench": "formula_batch", "ratio": round(statistics.median(ratios), 3),
            "batch_s": round(batch_s, 3), "bare_sql_s": round(bare_s, 3),
            "customers": n_customers, "events": n_events,
            "events_per_s": round(in_window / batch_s), "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10,000 customers / 500,000 events, 3 pairs")
    parser.add_argument("--dsn", default=default_database_url(),
                        help="a maintenance database of a server where the bench may create "
                             "a database (default: $PROMO_BENCH_DATABASE_URL or local)")
    parser.add_argument("--pairs", type=int, default=0)
    parser.add_argument("--customers", type=int, default=0)
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=aggregates.DEFAULT_CHUNK_SIZE)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
