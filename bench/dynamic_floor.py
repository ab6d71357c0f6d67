"""How fast could a dynamic-bonus window be at all? The database's share alone, without Python.

Why this exists: issue 7 asks for a whole batching window (aggregates, results, events, ledger,
requests marked done) in at most 2x the bare SQL aggregate. bench/dynamic_batch.py measures the
real batch; this measures a floor under it, so that the gap can be told apart into "our code is
slow" and "the writes themselves cost more than the target allows".

What it measures: the real batch (``storage.bonuses.run_batch``) runs once, untimed, to produce
the exact rows a window writes (bonus_results, bonus_ledger, webhook_events); they are copied
aside. Then, per round, after the same untimed reset as bench/dynamic_batch.py, one backend runs
the database work of the window as plain SQL, each stage timed on its own, in one transaction:

- ``aggregate``: the bare ``GROUP BY`` joined to the window's pending requests;
- ``claim``: every pending request of the window marked DONE (one UPDATE);
- ``results`` / ``ledger`` / ``events``: ``INSERT ... SELECT`` of the saved rows into the real
  tables, with their real indexes;
- ``commit``.

No evaluation, no row building, no encoding, no COPY, no round trips per chunk: everything the
batch adds in Python is left out, so the sum is a lower bound for any implementation that writes
one row per result and per event. Interleaved with the bare SQL (A B per round) and the real
batch (C), medians of 3 (``--quick``) or 5 rounds. ``overlap_bound_ratio`` halves the floor's
serial sum (a perfect split over the machine's two cores, which the bare SQL's parallel scan
already uses) but not below its largest stage.

Usage::

    .venv/bin/python -m bench.dynamic_floor [--quick] [--dsn postgresql://...] [--rounds N]

The last line of output is one JSON object: floor_ratio, overlap_bound_ratio, batch_ratio,
floor_s, bare_sql_s, batch_s and the median seconds of each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg

from bench.common import dynamic_bench_parser, scratch_database
from bench.dynamic_batch import prepare, reset
from bench.formula_batch import BARE_SQL, DAYS, T0, WINDOW, bare_sql, load, paused_gc
from storage import bonuses as repo
from storage.db import create_pool

# The saved rows of one real batch, and the statements that write them back.
SAVED = (("bonus_results", "floor_results"), ("bonus_ledger", "floor_ledger"),
         ("webhook_events", "floor_events"))

AGGREGATE_SQL = BARE_SQL.replace(
    "FROM events\n",
    "FROM events JOIN bonus_requests r USING (customer_id)\n").replace(
    "WHERE occurred_at",
    "WHERE r.definition_pk = $3 AND r.status = 'PENDING' AND occurred_at")

CLAIM_SQL = """UPDATE bonus_requests SET status = 'DONE'
                WHERE definition_pk = $1 AND status = 'PENDING'"""

STAGES = ("aggregate", "claim", "results", "ledger", "events", "commit")


async def save_rows(pool: asyncpg.Pool, definition_pk: int, window: Any, due: Any) -> int:
    """Run the real batch once and keep what it wrote; returns the number of results."""
    await reset(pool)
    with paused_gc():
        report = await repo.run_batch(pool, definition_pk, window, now=due)
    async with pool.acquire() as conn:
        for table, saved in SAVED:
            await conn.execute(f"DROP TABLE IF EXISTS {saved}")
            await conn.execute(f"CREATE TABLE {saved} AS SELECT * FROM {table}")
            await conn.execute(f"ANALYZE {saved}")
    return report.requests


async def floor_round(pool: asyncpg.Pool, definition_pk: int, start: Any,
                      end: Any) -> dict[str, float]:
    """The window's database work as plain SQL, one stage at a time, in one transaction."""
    times: dict[str, float] = {}
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            t = time.perf_counter()
            rows = await conn.fetch(AGGREGATE_SQL, start, end, definition_pk)
            times["aggregate"] = time.perf_counter() - t
            assert rows, "the aggregate read nothing: the requests are not pending"
            t = time.perf_counter()
            await conn.execute(CLAIM_SQL, definition_pk)
            times["claim"] = time.perf_counter() - t
            for (table, saved), stage in zip(SAVED, ("results", "ledger", "events"),
                                             strict=True):
                t = time.perf_counter()
                await conn.execute(
                    f"INSERT INTO {table} OVERRIDING SYSTEM VALUE SELECT * FROM {saved}")
                times[stage] = time.perf_counter() - t
        except BaseException:
            await tx.rollback()
            raise
        t = time.perf_counter()
        await tx.commit()
        times["commit"] = time.perf_counter() - t
    return times


async def measure(pool: asyncpg.Pool, n_customers: int, rounds: int) -> dict[str, Any]:
    row, window, due = await prepare(pool, n_customers)
    end = T0 + timedelta(days=DAYS)
    start = end - WINDOW
    results = await save_rows(pool, row.pk, window, due)
    counts = {saved: await pool.fetchval(f"SELECT count(*) FROM {saved}") for _, saved in SAVED}
    await bare_sql(pool, start, end)  # warm the caches before timing
    stage_times: dict[str, list[float]] = {s: [] for s in STAGES}
    floor_times: list[float] = []
    bare_times: list[float] = []
    batch_times: list[float] = []
    for _ in range(rounds):
        await reset(pool)
        times = await floor_round(pool, row.pk, start, end)
        for stage, seconds in times.items():
            stage_times[stage].append(seconds)
        floor_times.append(sum(times.values()))
        t = time.perf_counter()
        await bare_sql(pool, start, end)
        bare_times.append(time.perf_counter() - t)
        await reset(pool)
        t = time.perf_counter()
        with paused_gc():
            await repo.run_batch(pool, row.pk, window, now=due)
        batch_times.append(time.perf_counter() - t)

    medians = {s: statistics.median(v) for s, v in stage_times.items()}
    floor_s, bare_s = statistics.median(floor_times), statistics.median(bare_times)
    batch_s = statistics.median(batch_times)
    overlap_s = max(floor_s / 2, max(medians.values()))
    print(f"requests {n_customers:,}  results {results:,}  ledger rows "
          f"{counts['floor_ledger']:,}  events {counts['floor_events']:,}  rounds {rounds}")
    print(f"{'stage':>10}  {'median s':>9}")
    for stage in STAGES:
        print(f"{stage:>10}  {medians[stage]:>9.3f}")
    print(f"floor (serial sum) {floor_s:.3f} s; bare SQL {bare_s:.3f} s; real batch "
          f"{batch_s:.3f} s")
    print(f"floor / bare {floor_s / bare_s:.2f}; with perfect 2-core overlap "
          f"{overlap_s / bare_s:.2f}; real batch / bare {batch_s / bare_s:.2f} (target <= 2)")
    return {"bench": "dynamic_floor", "floor_ratio": round(floor_s / bare_s, 3),
            "overlap_bound_ratio": round(overlap_s / bare_s, 3),
            "batch_ratio": round(batch_s / bare_s, 3), "floor_s": round(floor_s, 3),
            "bare_sql_s": round(bare_s, 3), "batch_s": round(batch_s, 3),
            "requests": n_customers,
            **{f"{stage}_s": round(medians[stage], 3) for stage in STAGES}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    return await run_floor(args, f"promo_bench_floor_{os.getpid()}", measure)


async def run_floor(args: argparse.Namespace, database: str,
                    measure: Callable[[asyncpg.Pool, int, int], Awaitable[dict[str, Any]]]
                    ) -> dict[str, Any]:
    """A floor bench's run (also bench/dynamic_redesign_floor.py's): the formula benchmark's
    data in a scratch database ``database``, then ``measure(pool, requests, rounds)``."""
    n_customers = args.customers or (10_000 if args.quick else 100_000)
    n_events = args.events or (500_000 if args.quick else 5_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    async with scratch_database(args.dsn, database) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await load(conn, n_customers, n_events)
        finally:
            await conn.close()
        pool = await create_pool(dsn, min_size=2, max_size=4)
        try:
            return await measure(pool, n_customers, rounds)
        finally:
            await pool.close()


def main() -> None:
    parser = dynamic_bench_parser(__doc__, repeats="rounds",
                                  quick_help="10,000 requests / 500,000 events, 3 rounds")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
