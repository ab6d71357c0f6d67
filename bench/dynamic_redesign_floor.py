"""Would the storage redesign reach issue 7's 2x? Its database work alone, as plain SQL.

Why this exists: bench/dynamic_floor.py showed that the current design's writes alone (claim,
result rows, ledger, event rows) cost 2.7x the bare aggregate, so no Python speed-up of it can
reach 2x. docs/benchmarks.md names a redesign: formulas compiled into the aggregate SQL, requests
claimed by writing their result (no UPDATE), slim result rows that the Calculated / Issued
events are derived from (no event rows), explanations derived when a result is read. This
measures the database work of that design before anyone builds it, against the same bare SQL,
in the same run.

Per round (after dynamic_batch's untimed reset), in one transaction on one backend:

- ``aggregate``: the formula benchmark's aggregates AND its formula (tiers, rounding, skip when
  not positive), per pending request, as one SELECT into a temporary table (CREATE TABLE AS, so
  the scan may run in parallel as the bare SQL's does);
- ``results``: INSERT ... SELECT into a slim results table (request key, bonus id, customer,
  status, amount, the formula's raw value and its three inputs, time) with the indexes the
  approval queue needs (primary key, bonus id, queue, customer), ON CONFLICT (request) DO
  NOTHING: writing the result is the claim;
- ``ledger``: the issued results' ledger rows, into the real bonus_ledger;
- ``commit``.

What it leaves out, so the sum is a lower bound for that design too: the Python around it, the
outbox job that would tell the delivery worker to read new results, and the delivery's own work.

Usage::

    .venv/bin/python -m bench.dynamic_redesign_floor [--quick] [--dsn postgresql://...]

The last line is one JSON object: floor_ratio (sum of stages / bare SQL), floor_s, bare_sql_s
and each stage's median seconds.
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

from bench.common import dynamic_bench_parser
from bench.dynamic_batch import prepare, reset
from bench.dynamic_floor import run_floor
from bench.formula_batch import BARE_SQL, DAYS, T0, WINDOW, bare_sql

SLIM_TABLE = """
CREATE TABLE IF NOT EXISTS slim_results (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_pk     bigint        NOT NULL UNIQUE,
    bonus_id       uuid          NOT NULL UNIQUE,
    definition_pk  bigint        NOT NULL,
    customer_id    text          NOT NULL,
    status         text          NOT NULL,
    amount         numeric(20,6),
    raw_value      numeric,
    inputs         numeric[]     NOT NULL,
    calculate_time timestamptz   NOT NULL
);
CREATE INDEX IF NOT EXISTS slim_results_queue ON slim_results (definition_pk, status, id);
CREATE INDEX IF NOT EXISTS slim_results_customer ON slim_results (customer_id, id);
"""

# The formula benchmark's formula (bench/formula_batch.py FORMULA) written as SQL over the bare
# SQL's own aggregate (net of bets and wins outside Roulette, deposits counted), tiers; rounded
# to 2 places, skipped when not positive (the definition's automatic approval issues the rest).
AGGREGATE_SQL = f"""
CREATE TEMPORARY TABLE window_values ON COMMIT DROP AS
SELECT r.id AS request_pk, r.customer_id, a.bets, a.wins, a.deposits,
       CASE WHEN a.deposits > 5 AND a.bets - a.wins > 500 THEN (a.bets - a.wins) * 0.05
            WHEN a.bets - a.wins > 300 THEN (a.bets - a.wins) * 0.03
            ELSE (a.bets - a.wins) * 0.01 END AS raw_value
  FROM bonus_requests r
  LEFT JOIN ({BARE_SQL}) a USING (customer_id)
 WHERE r.definition_pk = $3 AND r.status = 'PENDING'
"""

RESULTS_SQL = """
INSERT INTO slim_results (request_pk, bonus_id, definition_pk, customer_id, status, amount,
                          raw_value, inputs, calculate_time)
SELECT v.request_pk, gen_random_uuid(), $1, v.customer_id,
       CASE WHEN round(v.raw_value, 2) > 0 THEN 'ISSUED' ELSE 'SKIPPED' END,
       CASE WHEN round(v.raw_value, 2) > 0 THEN round(v.raw_value, 2) END,
       v.raw_value, ARRAY[v.bets, v.wins, v.deposits], $2
  FROM window_values v
ON CONFLICT (request_pk) DO NOTHING
"""

LEDGER_SQL = """
INSERT INTO bonus_ledger (bonus_id, customer_id, definition_id, result_type, amount, issue_time)
SELECT bonus_id, customer_id, 'bench', 'AMOUNT', amount, $2
  FROM slim_results WHERE definition_pk = $1 AND status = 'ISSUED'
"""

STAGES = ("aggregate", "results", "ledger", "commit")


async def redesign_round(pool: asyncpg.Pool, definition_pk: int, start: Any, end: Any,
                         now: Any) -> dict[str, float]:
    times: dict[str, float] = {}
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE slim_results")
        tx = conn.transaction()
        await tx.start()
        try:
            t = time.perf_counter()
            await conn.execute(AGGREGATE_SQL, start, end, definition_pk)
            times["aggregate"] = time.perf_counter() - t
            t = time.perf_counter()
            await conn.execute(RESULTS_SQL, definition_pk, now)
            times["results"] = time.perf_counter() - t
            t = time.perf_counter()
            await conn.execute(LEDGER_SQL, definition_pk, now)
            times["ledger"] = time.perf_counter() - t
        except BaseException:
            await tx.rollback()
            raise
        t = time.perf_counter()
        await tx.commit()
        times["commit"] = time.perf_counter() - t
    return times


async def measure(pool: asyncpg.Pool, n_customers: int, rounds: int) -> dict[str, Any]:
    row, _window, due = await prepare(pool, n_customers)
    end = T0 + timedelta(days=DAYS)
    start = end - WINDOW
    async with pool.acquire() as conn:
        await conn.execute(SLIM_TABLE)
    await bare_sql(pool, start, end)  # warm the caches before timing
    stage_times: dict[str, list[float]] = {s: [] for s in STAGES}
    floor_times: list[float] = []
    bare_times: list[float] = []
    counts: tuple[int, int] = (0, 0)
    for _ in range(rounds):
        await reset(pool)
        times = await redesign_round(pool, row.pk, start, end, due)
        for stage, seconds in times.items():
            stage_times[stage].append(seconds)
        floor_times.append(sum(times.values()))
        counts = (await pool.fetchval("SELECT count(*) FROM slim_results"),
                  await pool.fetchval("SELECT count(*) FROM bonus_ledger"))
        t = time.perf_counter()
        await bare_sql(pool, start, end)
        bare_times.append(time.perf_counter() - t)
    medians = {s: statistics.median(v) for s, v in stage_times.items()}
    floor_s, bare_s = statistics.median(floor_times), statistics.median(bare_times)
    ratios = [a / b for a, b in zip(floor_times, bare_times, strict=True)]
    print(f"requests {n_customers:,}  results {counts[0]:,}  ledger rows {counts[1]:,}  "
          f"rounds {rounds}")
    for stage in STAGES:
        print(f"{stage:>10}  {medians[stage]:>9.3f} s")
    print(f"redesign floor {floor_s:.3f} s; bare SQL {bare_s:.3f} s; median ratio of rounds "
          f"{statistics.median(ratios):.2f} (target <= 2)")
    return {"bench": "dynamic_redesign_floor", "floor_ratio": round(statistics.median(ratios), 3),
            "floor_s": round(floor_s, 3), "bare_sql_s": round(bare_s, 3),
            "requests": n_customers,
            **{f"{stage}_s": round(medians[stage], 3) for stage in STAGES}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    return await run_floor(args, f"promo_bench_redesign_{os.getpid()}", measure)


def main() -> None:
    parser = dynamic_bench_parser(__doc__, repeats="rounds",
                                  quick_help="10,000 requests / 500,000 events, 3 rounds")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
