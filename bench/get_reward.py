"""GetReward benchmark: the real server against a bare baseline through the same gRPC stack.

    .venv/bin/python -m bench.get_reward            # full: 5 pairs, c64 runs of 5 s (~95 s)
    .venv/bin/python -m bench.get_reward --quick    # 3 pairs, c64 runs of 2 s (< 1 min)
    .venv/bin/python -m bench.get_reward --profile /tmp/prof   # and py-spy the servers after

What is measured. A: GetReward on the real server (``server.app.start_server``): an ACTIVE
promotion with one SINGLE reward of 1, a DAILY and a LIFETIME budget cap and a customer cap that
are never reached, every call a new customer and request id, so every call is a real grant.
B: the baseline, a grpc.aio server with the same interceptor (API-key auth, request id, the
per-call log line at WARNING) whose one handler runs one atomic
``UPDATE ... WHERE used + $1 <= cap RETURNING used`` through an asyncpg pool of the same size.
Both take the same pre-encoded request bodies from the same closed-loop asyncio client.

How. One fresh database (migrated, dropped at the end); first a throwaway server creates the
promotion and makes --prime grants (so that no measured server plans its SQL against an empty
grants table: see docs/benchmarks.md); then pairs A B A B ..., a fresh server process for every
run, each warmed up, then 1 call in flight (latency) and 64 (throughput).
Headline: the median of the per-pair RPS ratios at 64 in flight, and GetReward's median p50 at
1 in flight. The client is a Python process on the same 2 cores as the server and PostgreSQL.
At the end the database is checked: one grant per successful call, every cap counter within
its limit. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc import aio

from bench.common import (
    ADMIN_METADATA,
    PY_SPY_RATE,
    LoadResult,
    PgCpu,
    Requests,
    ServerProcess,
    close_channels,
    closed_loop,
    default_database_url,
    inclusive_ms_per_call,
    median,
    open_channels,
    py_spy_record,
    scratch_database,
    top_frames,
)
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb

PROJECT = "GetReward"
BASELINE = "baseline"
GET_REWARD = "/promo.v1.RewardService/GetReward"
BASELINE_SERVICE = "bench.v1.BaselineService"
BASELINE_METHOD = f"/{BASELINE_SERVICE}/Charge"
CHARGE_SQL = ("UPDATE bench_counter SET used = used + $1 WHERE id = $2 AND used + $1 <= cap "
              "RETURNING used")
PROMOTION_CODE = "BENCH"
REWARD_TYPE = "cashback"
DAILY_LIMIT = Decimal("1000000000000")
LIFETIME_LIMIT = Decimal("10000000000000")
CUSTOMER_CAP = 2_000_000_000
BASELINE_CAP = 10**15
# Rough ceilings on calls per second, to pre-encode enough request bodies before a timed run.
MAX_RPS = {1: 3000, 64: 8000}


# --- the servers (child processes) ------------------------------------------------------------


async def _start_project(dsn: str, log_level: str) -> tuple[int, Any]:
    from server.app import Dependencies, start_server

    settings: Any = _settings(dsn, log_level)
    pool = await _pool(settings)
    running = await start_server(settings, Dependencies(pool=pool))

    async def stop() -> None:
        await running.stop(settings.shutdown_grace_seconds)
        await pool.close()

    return running.port, stop


async def _start_baseline(dsn: str, log_level: str) -> tuple[int, Any]:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from server.auth import Authenticator
    from server.interceptors import ServiceInterceptor

    settings: Any = _settings(dsn, log_level)
    pool = await _pool(settings)
    authenticator = Authenticator(settings.api_keys, {BASELINE_METHOD: {"runtime"}})
    # The same server options and interceptor as server.app.start_server.
    server = aio.server(interceptors=[ServiceInterceptor(authenticator)],
                        options=[("grpc.so_reuseport", 0)])

    async def charge(request: bytes, context: aio.ServicerContext) -> bytes:
        used = await pool.fetchval(CHARGE_SQL, 1, 1)
        return b"" if used is None else str(used).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        BASELINE_SERVICE, {"Charge": grpc.unary_unary_rpc_method_handler(charge)}),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop() -> None:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_seconds)
        await pool.close()

    return port, stop


def _settings(dsn: str, log_level: str) -> object:
    from bench.common import bench_settings
    from server.logs import configure_logging

    settings: Any = bench_settings(dsn, log_level)
    configure_logging(settings.log_level, settings.log_format)
    return settings


async def _pool(settings: Any) -> asyncpg.Pool:
    from storage.db import create_pool

    # As cli.runtime.run_server makes it, for both servers.
    return await create_pool(settings.database_url, min_size=settings.db_pool_min_size,
                             max_size=settings.db_pool_max_size,
                             command_timeout=settings.db_command_timeout_seconds)


def serve_child(kind: str, dsn: str, log_level: str) -> None:
    from bench.common import serve

    starter = _start_project if kind == PROJECT else _start_baseline
    serve(lambda: starter(dsn, log_level))


# --- the client -------------------------------------------------------------------------------


def _get_reward_body(i: int) -> bytes:
    return rpb.GetRewardRequest(promotion_code=PROMOTION_CODE, customer_id=f"cust-{i:09d}",
                                request_id=f"req-{i:09d}").SerializeToString()


async def _set_up_promotion(address: str) -> None:
    async with aio.insecure_channel(address) as channel:
        await rtpb_grpc.RewardTypeServiceStub(channel).CreateRewardType(
            rtpb.CreateRewardTypeRequest(request_id="bench-rt", reward_type=rtpb.RewardType(
                name=REWARD_TYPE, display_name="Cashback",
                category=rtpb.REWARD_CATEGORY_AMOUNT)), metadata=ADMIN_METADATA)
        await ppb_grpc.PromotionServiceStub(channel).CreatePromotion(ppb.CreatePromotionRequest(
            request_id="bench-promotion", activate=True, promotion=ppb.Promotion(
                promotion_code=PROMOTION_CODE, name="GetReward benchmark", time_zone="UTC",
                rewards=[ppb.PromotionReward(reward_type=REWARD_TYPE,
                                             kind=ppb.REWARD_KIND_SINGLE, value="1")],
                budget_caps=[
                    ppb.BudgetCap(reward_type=REWARD_TYPE, period=ppb.CAP_PERIOD_DAILY,
                                  limit=str(DAILY_LIMIT)),
                    ppb.BudgetCap(reward_type=REWARD_TYPE, period=ppb.CAP_PERIOD_LIFETIME,
                                  limit=str(LIFETIME_LIMIT))],
                customer_cap=CUSTOMER_CAP)), metadata=ADMIN_METADATA)


@dataclass
class Tally:
    """What the replies said, for the correctness check."""

    granted: int = 0
    existing: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    baseline_ok: int = 0
    baseline_capped: int = 0

    def add(self, kind: str, result: LoadResult) -> None:
        self.errors.update({f"{kind}:{code}": n for code, n in result.errors.items()})
        if kind == BASELINE:
            capped = sum(1 for reply in result.replies if not reply)
            self.baseline_capped += capped
            self.baseline_ok += len(result.replies) - capped
            return
        for reply in result.replies:
            response = rpb.GetRewardResponse.FromString(reply)
            if response.HasField("grant"):
                if response.existing:
                    self.existing += 1
                else:
                    self.granted += 1
            else:
                self.denied[rpb.DenialReason.Name(response.denial_reason)] += 1


@dataclass
class Run:
    kind: str
    pair: int
    c1: LoadResult
    cn: LoadResult


class Bench:
    def __init__(self, args: argparse.Namespace, dsn: str, database: str) -> None:
        self.args = args
        self.dsn = dsn
        self.pg = PgCpu(dsn, database)
        self.tally = Tally()
        self.promotion_ready = False
        self.bodies = {PROJECT: Requests(_get_reward_body),
                       # The same bodies (and sizes) as GetReward's; the baseline ignores them.
                       BASELINE: Requests(_get_reward_body)}

    async def server(self, kind: str) -> ServerProcess:
        server = await ServerProcess.start("bench.get_reward", [
            "--serve", kind, "--dsn", self.dsn, "--server-log-level", self.args.server_log_level],
            quiet=self.args.server_log_level in ("DEBUG", "INFO"))
        if kind == PROJECT and not self.promotion_ready:
            await _set_up_promotion(server.address)
            self.promotion_ready = True
        return server

    async def load(self, kind: str, server: ServerProcess, concurrency: int, *,
                   seconds: float | None = None, calls: int | None = None,
                   cpu: bool = True) -> LoadResult:
        method = GET_REWARD if kind == PROJECT else BASELINE_METHOD
        bodies = self.bodies[kind]
        bodies.prebuild(calls if calls is not None else
                        math.ceil(MAX_RPS.get(concurrency, 8000) * (seconds or 0)))
        channels = open_channels(server.address, concurrency)
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 10)
            result = await closed_loop(channels, method, bodies, concurrency=concurrency,
                                       seconds=seconds, calls=calls,
                                       server_pid=server.pid if cpu else None,
                                       pg=self.pg if cpu else None)
        finally:
            await close_channels(channels)
        self.tally.add(kind, result)
        return result

    async def warm_up(self, kind: str, server: ServerProcess) -> None:
        await self.load(kind, server, self.args.concurrency, calls=self.args.warmup, cpu=False)
        await self.pg.refresh()  # the pool has opened its connections by now

    async def one_run(self, kind: str, pair: int) -> Run:
        server = await self.server(kind)
        try:
            await self.warm_up(kind, server)
            c1 = await self.load(kind, server, 1, seconds=self.args.c1_seconds)
            cn = await self.load(kind, server, self.args.concurrency, seconds=self.args.seconds)
        finally:
            await server.stop()
        return Run(kind, pair, c1, cn)

    async def profile(self, out_dir: Path) -> dict[str, Any]:
        """py-spy the server (not counted in the results): c64 and c1, both kinds."""
        found: dict[str, Any] = {}
        seconds = self.args.profile_seconds
        for kind in (PROJECT, BASELINE):
            server = await self.server(kind)
            try:
                await self.warm_up(kind, server)
                for concurrency in (self.args.concurrency, 1):
                    path = out_dir / f"get_reward_{kind.lower()}_c{concurrency}.txt"
                    spy = await py_spy_record(server.pid, seconds + 1, path)
                    await asyncio.sleep(0.5)
                    result = await self.load(kind, server, concurrency, seconds=seconds)
                    _, err = await spy.communicate()
                    if spy.returncode != 0 or not path.exists():
                        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
                        continue
                    found[path.name] = {"rps": round(result.rps), "path": str(path)}
                    print(f"\nprofile {kind} c{concurrency}: {result.rps:,.0f} calls/s under "
                          f"py-spy, {path}; server CPU ms per call, inclusive:")
                    for label, ms in inclusive_ms_per_call(path, PROFILE_KEYS, calls=result.calls,
                                                           rate=PY_SPY_RATE):
                        if ms or not label.startswith(" "):
                            print(f"  {ms:6.3f}  {label}")
                    print("  top self frames (share of samples):")
                    for frame, share in top_frames(path, 12):
                        print(f"  {share:6.1%}  {frame}")
            finally:
                await server.stop()
        return found


# What the profile summary shows, CPU ms per call under each (inclusive). py-spy sees no Cython
# or C frames: grpc's Cython server loop shows up as asyncio's Handle._run, its poller thread as
# Thread.run, asyncpg's protocol inside the asyncpg call that awaits it.
PROFILE_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("handler, inside the interceptor", ("_wrap.<locals>.unary_unary",)),
    ("  interceptor's auth + request id", ("ServiceInterceptor._begin",)),
    ("  GetReward servicer", ("RewardServicer.GetReward",)),
    ("    promotion cache", ("PromotionCache.get",)),
    ("    decide_values + charges_for", ("decide_values", "charges_for")),
    ("    storage grant (asyncpg call)", ("grant (storage/promotions.py",)),
    ("    building the response", ("RewardServicer._answer",)),
    ("  baseline handler (asyncpg call)", ("charge (bench/get_reward.py",)),
    ("  pool release (asyncpg reset query)", ("PoolConnectionHolder.release",)),
    ("logging", ("logging/__init__.py",)),
    ("grpc poller thread", ("Thread.run",)),
    ("event loop select", ("EpollSelector.select",)),
]


# --- verification -----------------------------------------------------------------------------


async def verify(dsn: str, tally: Tally) -> tuple[bool, list[str]]:
    """One grant row per successful call; every counter charged once per grant and within its
    limit; the baseline counter equal to its successful calls."""
    notes: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        grants = await conn.fetchval(
            "SELECT count(*) FROM grants g JOIN promotions p ON p.id = g.promotion_id "
            "WHERE p.code = $1 AND g.status = 'GRANTED'", PROMOTION_CODE)
        usage = await conn.fetch(
            "SELECT u.scope, u.period, sum(u.used) AS used, sum(u.grants) AS grants, "
            "max(u.used) AS max_used, count(*) AS windows FROM cap_usage u "
            "JOIN promotions p ON p.id = u.promotion_id WHERE p.code = $1 "
            "GROUP BY u.scope, u.period ORDER BY u.scope, u.period", PROMOTION_CODE)
        baseline_used = await conn.fetchval("SELECT used FROM bench_counter WHERE id = 1")
    finally:
        await conn.close()
    ok = grants == tally.granted and not tally.existing and not tally.denied
    notes.append(f"grants in the database: {grants:,}; successful GetReward calls: "
                 f"{tally.granted:,} (EXISTING answers: {tally.existing}, denials: "
                 f"{dict(tally.denied) or 0})")
    limits = {("#customers", "LIFETIME"): Decimal(CUSTOMER_CAP),
              (REWARD_TYPE, "DAILY"): DAILY_LIMIT, (REWARD_TYPE, "LIFETIME"): LIFETIME_LIMIT}
    seen = set()
    for row in usage:
        key = (row["scope"], row["period"])
        seen.add(key)
        limit = limits.get(key)
        within = limit is not None and row["max_used"] <= limit
        exact = row["used"] == tally.granted and row["grants"] == tally.granted
        ok = ok and within and exact
        notes.append(f"counter {key[0]} {key[1]}: used {row['used']:.0f} in {row['windows']} "
                     f"window(s), limit {limit}, "
                     f"{'within' if within else 'OVER'} its limit, "
                     f"{'one charge per grant' if exact else 'NOT one charge per grant'}")
    if seen != set(limits):
        ok = False
        notes.append(f"counters missing: {sorted(set(limits) - seen)}")
    baseline_exact = baseline_used == tally.baseline_ok and baseline_used <= BASELINE_CAP
    ok = ok and baseline_exact
    notes.append(f"baseline counter: {baseline_used:,} for {tally.baseline_ok:,} successful "
                 f"calls ({'equal' if baseline_exact else 'NOT equal'})")
    if tally.errors:
        notes.append(f"gRPC errors: {dict(tally.errors)}")
    return ok, notes


# --- orchestration and report -----------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _med(runs: list[Run], get: Any) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return median(values) if values else None


def _cpu_per_call(run: Run) -> float | None:
    """Client + server + PostgreSQL CPU ms per call at the high concurrency."""
    cn = run.cn
    parts = [cn.cpu_ms_per_call(x) for x in (cn.client_cpu_s, cn.server_cpu_s, cn.pg_cpu_s)]
    return None if None in parts else sum(p for p in parts if p is not None)


def _print_run(run: Run, concurrency: int) -> None:
    cn, c1 = run.cn, run.c1
    print(f"pair {run.pair + 1} {run.kind:>9}: c{concurrency} {cn.rps:7,.0f}/s "
          f"p50 {cn.percentile_ms(50):6.2f} p99 {cn.percentile_ms(99):6.2f} ms | "
          f"c1 {c1.rps:6,.0f}/s p50 {c1.percentile_ms(50):5.2f} p99 {c1.percentile_ms(99):5.2f} "
          f"ms | CPU ms/call at c{concurrency}: server "
          f"{_fmt(cn.cpu_ms_per_call(cn.server_cpu_s))} pg {_fmt(cn.cpu_ms_per_call(cn.pg_cpu_s))} "
          f"client {_fmt(cn.cpu_ms_per_call(cn.client_cpu_s))} | machine busy "
          f"{_fmt(None if cn.machine_busy is None else cn.machine_busy * 100, 0)}%"
          + (f" errors {dict(cn.errors)}" if cn.errors or c1.errors else ""), flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    name = f"promo_bench_{os.getpid()}"
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    async with scratch_database(args.database_url, name) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE bench_counter (id integer PRIMARY KEY, "
                               "used bigint NOT NULL DEFAULT 0, cap bigint NOT NULL)")
            await conn.execute("INSERT INTO bench_counter (id, cap) VALUES (1, $1)",
                               BASELINE_CAP)
        finally:
            await conn.close()
        bench = Bench(args, dsn, name)
        n = args.concurrency
        server = await bench.server(PROJECT)  # creates the promotion
        try:
            if args.prime:
                await bench.load(PROJECT, server, n, calls=args.prime, cpu=False)
        finally:
            await server.stop()
        print(f"GetReward vs baseline: {args.pairs} pairs, c{n} runs of {args.seconds:g} s, c1 "
              f"runs of {args.c1_seconds:g} s, {args.warmup} warm-up calls per server, "
              f"{args.prime} grants made before; servers log at {args.server_log_level}; "
              f"{os.cpu_count()} CPUs shared by client, servers and PostgreSQL", flush=True)
        runs: list[Run] = []
        for pair in range(args.pairs):
            for kind in (PROJECT, BASELINE):
                runs.append(await bench.one_run(kind, pair))
                _print_run(runs[-1], n)
        profiles = await bench.profile(Path(args.profile)) if args.profile else {}
        grants_ok, notes = await verify(dsn, bench.tally)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    project = [r for r in runs if r.kind == PROJECT]
    baseline = [r for r in runs if r.kind == BASELINE]
    pairs = list(zip(project, baseline, strict=True))
    ratios = [a.cn.rps / b.cn.rps for a, b in pairs if b.cn.rps]
    c1_p50_ratios = [a.c1.percentile_ms(50) / b.c1.percentile_ms(50) for a, b in pairs]
    # Calls per CPU-second of client + server + PostgreSQL, GetReward over baseline: what the
    # RPS ratio would be if both were bound by these 2 CPUs alone (steadier than RPS here).
    cpu_ratios = [b_cpu / a_cpu for a, b in pairs
                  if (a_cpu := _cpu_per_call(a)) and (b_cpu := _cpu_per_call(b))]
    def cpu(seconds: str, at: str) -> Any:
        return lambda r: getattr(r, at).cpu_ms_per_call(getattr(getattr(r, at), seconds))

    get: dict[str, Any] = {
        "rps": lambda r: r.cn.rps, "p50": lambda r: r.cn.percentile_ms(50),
        "p99": lambda r: r.cn.percentile_ms(99), "rps_c1": lambda r: r.c1.rps,
        "p50_c1": lambda r: r.c1.percentile_ms(50), "p99_c1": lambda r: r.c1.percentile_ms(99),
        "server_cpu": cpu("server_cpu_s", "cn"), "server_sys": cpu("server_sys_s", "cn"),
        "pg_cpu": cpu("pg_cpu_s", "cn"), "client_cpu": cpu("client_cpu_s", "cn"),
        "server_cpu_c1": cpu("server_cpu_s", "c1"),
        "busy": lambda r: None if r.cn.machine_busy is None else r.cn.machine_busy * 100,
    }
    rows: list[tuple[str, str, int]] = [
        (f"c{n} calls/s", "rps", 0), (f"c{n} p50 ms", "p50", 2), (f"c{n} p99 ms", "p99", 2),
        ("c1 calls/s", "rps_c1", 0), ("c1 p50 ms", "p50_c1", 2), ("c1 p99 ms", "p99_c1", 2),
        (f"server CPU ms/call c{n}", "server_cpu", 3),
        (f"  of which in the kernel c{n}", "server_sys", 3),
        (f"PostgreSQL CPU ms/call c{n}", "pg_cpu", 3),
        (f"client CPU ms/call c{n}", "client_cpu", 3),
        ("server CPU ms/call c1", "server_cpu_c1", 3),
        (f"machine CPU busy % c{n}", "busy", 0),
    ]
    print(f"\nmedians over {len(pairs)} pairs (ratio: median of per-pair GetReward/baseline)")
    print(f"{'':30} {'GetReward':>10} {'baseline':>10} {'ratio':>7}")
    for label, key, digits in rows:
        f = get[key]
        a, b = _med(project, f), _med(baseline, f)
        per_pair = [f(x) / f(y) for x, y in pairs if f(x) is not None and f(y)]
        print(f"{label:30} {_fmt(a, digits):>10} {_fmt(b, digits):>10} "
              f"{_fmt(median(per_pair) if per_pair else None, 2):>7}")
    print(f"\nper-pair c{n} RPS ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    if cpu_ratios:
        print(f"CPU ratio at c{n} (baseline CPU ms/call / GetReward CPU ms/call, client + server "
              f"+ PostgreSQL): median {median(cpu_ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in cpu_ratios)})")
    p50_c1 = _med(project, get["p50_c1"])
    print(f"targets: ratio >= 0.70 at c{n}: {'met' if median(ratios) >= 0.7 else 'MISSED'}; "
          f"GetReward p50 < 3 ms at c1: {'met' if p50_c1 is not None and p50_c1 < 3 else 'MISSED'}")
    for note in notes:
        print(note)
    print(f"correctness: {'OK' if grants_ok else 'FAILED'}; took {elapsed:.1f} s; 1-minute load "
          f"average {load_before:.2f} before, {load_after:.2f} after")
    if load_before > (os.cpu_count() or 2) * 0.75:
        print(f"WARNING: the machine was already busy before the run (load {load_before:.2f} on "
              f"{os.cpu_count()} CPUs): these figures measure the neighbours too; run again "
              f"when it is quiet")

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    result: dict[str, Any] = {
        "bench": "get_reward",
        "ratio": rounded(median(ratios), 3),
        "rps": rounded(_med(project, get["rps"]), 0),
        "baseline_rps": rounded(_med(baseline, get["rps"]), 0),
        "p50_ms_c1": rounded(p50_c1, 3),
        "p99_ms_c1": rounded(_med(project, get["p99_c1"]), 3),
        f"p50_ms_c{n}": rounded(_med(project, get["p50"]), 3),
        f"p99_ms_c{n}": rounded(_med(project, get["p99"]), 3),
        "baseline_p50_ms_c1": rounded(_med(baseline, get["p50_c1"]), 3),
        f"baseline_p50_ms_c{n}": rounded(_med(baseline, get["p50"]), 3),
        "p50_ratio_c1": rounded(median(c1_p50_ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "cpu_ratio": rounded(median(cpu_ratios), 3) if cpu_ratios else None,
        "server_cpu_ms_per_call": rounded(_med(project, get["server_cpu"]), 3),
        "baseline_server_cpu_ms_per_call": rounded(_med(baseline, get["server_cpu"]), 3),
        "pg_cpu_ms_per_call": rounded(_med(project, get["pg_cpu"]), 3),
        "baseline_pg_cpu_ms_per_call": rounded(_med(baseline, get["pg_cpu"]), 3),
        "pairs": len(pairs),
        "concurrency": n,
        "grants_ok": grants_ok,
        "quick": bool(args.quick),
        "seconds": round(elapsed, 1),
        "load_avg": [round(load_before, 2), round(load_after, 2)],
    }
    if profiles:
        result["profiles"] = {k: v["path"] for k, v in profiles.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 pairs, c64 runs of 2 s, c1 runs of 1 s (under a minute)")
    parser.add_argument("--pairs", type=int, help="A/B pairs (default 5, quick 3)")
    parser.add_argument("--seconds", type=float, help="each c64 run (default 5, quick 2)")
    parser.add_argument("--c1-seconds", type=float, help="each c1 run (default 3, quick 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per server (500, quick 300)")
    parser.add_argument("--database-url", default=default_database_url(),
                        help="maintenance database to create the run's database from "
                             "(env PROMO_BENCH_DATABASE_URL)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the pairs, py-spy each server (raw stacks into DIR)")
    parser.add_argument("--profile-seconds", type=float, default=8)
    parser.add_argument("--prime", type=int, default=2000,
                        help="grants made through a throwaway server before the pairs, so no "
                             "measured server plans its queries against an empty table (2000)")
    parser.add_argument("--server-log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the servers' log level (WARNING; INFO logs one line per call, "
                             "as a default deployment does)")
    parser.add_argument("--serve", choices=(PROJECT, BASELINE), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.dsn, args.server_log_level)
        return
    quick = args.quick
    args.pairs = args.pairs or (3 if quick else 5)
    args.seconds = args.seconds or (2.0 if quick else 5.0)
    args.c1_seconds = args.c1_seconds or (1.0 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (300 if quick else 500)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    # Ctrl-C (even where a shell started us with SIGINT ignored) and SIGTERM cancel the run,
    # so that its servers are stopped and its database dropped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: servers stopped, the run's database dropped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
