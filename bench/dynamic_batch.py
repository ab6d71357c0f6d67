"""One dynamic-bonus batching window end to end against the bare SQL it has to read.

What it measures: 100,000 pending calculation requests (one per customer) in one batching
window of an automatically approved definition with the formula benchmark's formula and 7-day
window; the whole batch (``storage.bonuses.run_batch``: the aggregate pass, one evaluation per
request, writing the results, the ledger entries, the Calculated and Issued events and marking
the requests done) against one plain ``GROUP BY`` computing the same sums and counts over the
same rows (bench/formula_batch.py's "bare SQL"). Interleaved A B A B (DESIGN "Measuring on these
machines"), median of the per-pair ratios; target ratio <= 2 (issue 7). Between pairs the
requests are put back (results, ledger and events deleted, requests pending again), untimed.

Data: bench/formula_batch.py's (100,000 customers, 5,000,000 events over 30 days; ``--quick``
10,000 / 500,000), in a fresh database ``promo_bench_dynamic_<pid>`` dropped at the end.

Usage::

    .venv/bin/python -m bench.dynamic_batch [--quick] [--dsn postgresql://...] [--pairs N]

The last line of output is one JSON object: ratio, batch_s, bare_sql_s, requests, events,
events_read (as the batch recorded it), results_per_s and peak_rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import timedelta
from typing import Any

import asyncpg

from bench.common import dynamic_bench_parser, scratch_database
from bench.formula_batch import (
    DAYS,
    FORMULA,
    T0,
    WINDOW,
    bare_sql,
    customer_ids,
    load,
    paused_gc,
    peak_rss_mb,
)
from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    ResultType,
    validate_definition,
)
from core.periods import FixedPeriod
from core.rounding import RoundingMode
from storage import bonuses as repo
from storage.db import create_pool

WINDOW_SECONDS = 300


async def prepare(pool: asyncpg.Pool, n_customers: int) -> tuple[repo.DefinitionRow, Any, Any]:
    end = T0 + timedelta(days=DAYS)
    start = end - WINDOW
    definition, compiled = validate_definition(BonusDefinition(
        definition_id="bench", display_name="bench", formula=FORMULA,
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.ROUND, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=FixedPeriod(start, end),
        approval_mode=ApprovalMode.AUTOMATIC, batch_window_seconds=WINDOW_SECONDS,
        issued_message="Your bonus of {{event.bonus_amount}} {{event.currency}}"))
    now = end + timedelta(hours=1)
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.insert_definition(conn, definition, compiled, now=now)
        accepted = await repo.add_requests(
            conn, row, [repo.NewRequest(c, f"bench/{c}") for c in customer_ids(n_customers)],
            now=now, default_window=WINDOW_SECONDS)
    return row, accepted.window_start, accepted.due_at


async def reset(pool: asyncpg.Pool) -> None:
    """Put every request back to pending, as if the window had just closed (untimed)."""
    async with pool.acquire() as conn:
        await conn.execute("""TRUNCATE bonus_results, bonus_ledger, webhook_attempts,
                                       webhook_deliveries, webhook_events, outbox_jobs""")
        await conn.execute("UPDATE bonus_requests SET status = 'PENDING'")
        await conn.execute("""UPDATE bonus_batches SET request_count = 0, customer_count = 0,
                                     events_read = 0, duration_ms = 0, finish_time = NULL""")
        await conn.execute("VACUUM (ANALYZE) bonus_requests")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n_customers = args.customers or (10_000 if args.quick else 100_000)
    n_events = args.events or (500_000 if args.quick else 5_000_000)
    pairs = args.pairs or (3 if args.quick else 5)
    async with scratch_database(args.dsn, f"promo_bench_dynamic_{os.getpid()}") as dsn:
        started = time.perf_counter()
        conn = await asyncpg.connect(dsn)
        try:
            await load(conn, n_customers, n_events)
        finally:
            await conn.close()
        generation_s = time.perf_counter() - started
        pool = await create_pool(dsn, min_size=2, max_size=4)
        try:
            return await measure(pool, n_customers, n_events, pairs, generation_s)
        finally:
            await pool.close()


async def measure(pool: asyncpg.Pool, n_customers: int, n_events: int, pairs: int,
                  generation_s: float) -> dict[str, Any]:
    row, window, due = await prepare(pool, n_customers)
    end = T0 + timedelta(days=DAYS)
    start = end - WINDOW
    in_window = await pool.fetchval(
        "SELECT count(*) FROM events WHERE occurred_at >= $1 AND occurred_at < $2", start, end)
    await bare_sql(pool, start, end)  # warm the caches before timing
    batch_times: list[float] = []
    bare_times: list[float] = []
    events_read = 0
    for _ in range(pairs):
        await reset(pool)
        t = time.perf_counter()
        with paused_gc():
            report = await repo.run_batch(pool, row.pk, window, now=due)
        batch_times.append(time.perf_counter() - t)
        assert report.requests == n_customers, report
        events_read = report.events_read
        t = time.perf_counter()
        await bare_sql(pool, start, end)
        bare_times.append(time.perf_counter() - t)
    async with pool.acquire() as conn:
        written = await conn.fetchval("SELECT count(*) FROM bonus_results")
        emitted = await conn.fetchval("SELECT count(*) FROM webhook_events")
    ratios = [a / b for a, b in zip(batch_times, bare_times, strict=True)]

    print(f"requests {n_customers:,}  events {n_events:,} ({in_window:,} in the 7-day window)  "
          f"generation {generation_s:.1f} s  results {written:,}  events emitted {emitted:,}")
    print(f"{'pair':>4}  {'dynamic batch s':>15}  {'bare SQL s':>10}  {'ratio':>6}")
    for i, (a, b, r) in enumerate(zip(batch_times, bare_times, ratios, strict=True), 1):
        print(f"{i:>4}  {a:>15.3f}  {b:>10.3f}  {r:>6.2f}")
    batch_s, bare_s = statistics.median(batch_times), statistics.median(bare_times)
    print(f"median ratio {statistics.median(ratios):.2f} (target <= 2); "
          f"{n_customers / batch_s:,.0f} results/s; peak RSS {peak_rss_mb():.0f} MiB")
    return {"bench": "dynamic_batch", "ratio": round(statistics.median(ratios), 3),
            "batch_s": round(batch_s, 3), "bare_sql_s": round(bare_s, 3),
            "requests": n_customers, "events": n_events, "events_read": events_read,
            "results_per_s": round(n_customers / batch_s), "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    parser = dynamic_bench_parser(__doc__, repeats="pairs",
                                  quick_help="10,000 requests / 500,000 events, 3 pairs")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
