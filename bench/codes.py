"""Personalized codes benchmark: upload against a bare COPY, allocation against a bare
FOR UPDATE SKIP LOCKED, both through the same stack, measured in the same run.

    .venv/bin/python -m bench.codes            # 10 MB file (~600,000 codes), 3 pairs each
    .venv/bin/python -m bench.codes --quick    # 2 MB file, 2 pairs, shorter runs (< 1 min)

Upload. A: ``CodePoolService.UploadCodes`` on the real server (a process of its own), the file
streamed in 1 MB messages, checked line by line, then one COPY into promo_codes, the pool's
counter and thresholds, in one transaction; a fresh PERSONALIZED promotion each time.
B: the same file's bytes sent as they are by ``COPY bench_copy (code) FROM STDIN`` from this
process into a table of promo_codes' shape and indexes (pool id and upload id by default, the
ordinal from an identity column; primary key (pool, ordinal), unique (pool, code)): what
storing these codes costs with no streaming, checking or bookkeeping. Truncated before each
run. Ratio A / B (target <= 1.5), median over interleaved pairs. Also printed (not the
headline): B into a one-column table with only a unique index, ``bench_copy1 (code text
PRIMARY KEY)``.

Allocation. A: GetReward on a PERSONALIZED promotion (one EXTERNAL reward, no caps) whose pool
holds the uploaded codes, 64 calls in flight, every call a new customer. B: a grpc.aio server
with the same interceptor whose handler takes one code with
``UPDATE bench_alloc SET used = true WHERE id = (SELECT id FROM bench_alloc WHERE NOT used
ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING code`` through an asyncpg pool of the same
size, over a table of the same codes with a partial index on the unused ones. Ratio A RPS / B
RPS (target >= 0.7). Afterwards: zero duplicate codes among the grants and among B's answers.
Ends with one JSON line: upload_ratio, alloc_ratio, duplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import string
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
from grpc import aio

from bench.common import (
    ADMIN_METADATA,
    Requests,
    ServerProcess,
    close_channels,
    closed_loop,
    default_database_url,
    median,
    open_channels,
    scratch_database,
)
from promo.v1 import codes_pb2 as cpb
from promo.v1 import codes_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb

PROJECT = "GetReward"
BASELINE = "baseline"
GET_REWARD = "/promo.v1.RewardService/GetReward"
BASELINE_SERVICE = "bench.v1.CodeBaselineService"
BASELINE_METHOD = f"/{BASELINE_SERVICE}/Allocate"
ALLOCATE_SQL = ("UPDATE bench_alloc SET used = true WHERE id = (SELECT id FROM bench_alloc "
                "WHERE NOT used ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING code")
CHUNK = 1024 * 1024
ALPHABET = string.ascii_uppercase + string.digits


def make_file(size: int, seed: int = 7) -> tuple[bytes, int]:
    """Unique 16-character codes, one per line, up to ``size`` bytes: (file, code count)."""
    rng = random.Random(seed)
    count = size // 17
    seen: set[str] = set()
    while len(seen) < count:
        seen.add("".join(rng.choices(ALPHABET, k=16)))
    codes = sorted(seen, key=lambda _: rng.random())
    return "".join(f"{c}\n" for c in codes).encode(), count


# --- the servers (child processes) ------------------------------------------------------------


async def _start_project(dsn: str) -> tuple[int, Any]:
    from bench.get_reward import _pool, _settings
    from server.app import Dependencies, start_server

    settings: Any = _settings(dsn, "WARNING")
    pool = await _pool(settings)
    running = await start_server(settings, Dependencies(pool=pool))

    async def stop() -> None:
        await running.stop(settings.shutdown_grace_seconds)
        await pool.close()

    return running.port, stop


async def _start_baseline(dsn: str) -> tuple[int, Any]:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from bench.get_reward import _pool, _settings
    from server.auth import Authenticator
    from server.interceptors import ServiceInterceptor

    settings: Any = _settings(dsn, "WARNING")
    pool = await _pool(settings)
    authenticator = Authenticator(settings.api_keys, {BASELINE_METHOD: {"runtime"}})
    server = aio.server(interceptors=[ServiceInterceptor(authenticator)],
                        options=[("grpc.so_reuseport", 0)])

    async def allocate(request: bytes, context: aio.ServicerContext) -> bytes:
        code = await pool.fetchval(ALLOCATE_SQL)
        return b"" if code is None else code.encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        BASELINE_SERVICE, {"Allocate": grpc.unary_unary_rpc_method_handler(allocate)}),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop() -> None:
        await server.stop(settings.shutdown_grace_seconds)
        await pool.close()

    return port, stop


def serve_child(kind: str, dsn: str) -> None:
    from bench.common import serve

    serve(lambda: (_start_project if kind == PROJECT else _start_baseline)(dsn))


# --- upload -----------------------------------------------------------------------------------


async def _create_promotion(channel: aio.Channel, code: str) -> None:
    await ppb_grpc.PromotionServiceStub(channel).CreatePromotion(ppb.CreatePromotionRequest(
        request_id=f"create-{code}", activate=True, promotion=ppb.Promotion(
            promotion_code=code, name=f"Codes bench {code}",
            rewards=[ppb.PromotionReward(reward_type="percent_off",
                                         kind=ppb.REWARD_KIND_EXTERNAL)],
            code_type=ppb.CODE_TYPE_PERSONALIZED,
            code_alerts=[ppb.CodeAlertThreshold(remaining_percent="10")])),
        metadata=ADMIN_METADATA)


async def stream_upload(channel: aio.Channel, code: str, data: bytes) -> None:
    async def messages() -> AsyncIterator[cpb.UploadCodesRequest]:
        yield cpb.UploadCodesRequest(promotion_code=code, request_id=f"upload-{code}",
                                     data=data[:CHUNK])
        for offset in range(CHUNK, len(data), CHUNK):
            yield cpb.UploadCodesRequest(data=data[offset:offset + CHUNK])

    await cpb_grpc.CodePoolServiceStub(channel).UploadCodes(messages(), metadata=ADMIN_METADATA)


async def upload_once(channel: aio.Channel, code: str, data: bytes) -> float:
    """A new promotion, then its upload, timed from the first message to the answer."""
    await _create_promotion(channel, code)
    started = time.perf_counter()
    await stream_upload(channel, code, data)
    return time.perf_counter() - started


async def bare_copy_once(dsn: str, data: bytes, table: str = "bench_copy") -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {table}")
        started = time.perf_counter()
        await conn.copy_to_table(table, source=_pieces(data), columns=["code"])
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """The file's bytes as COPY's source, in 1 MB pieces (as the upload streams them)."""
    for offset in range(0, len(data), CHUNK):
        yield data[offset:offset + CHUNK]


# --- allocation -------------------------------------------------------------------------------


def _get_reward_body(i: int) -> bytes:
    return rpb.GetRewardRequest(promotion_code="ALLOC", customer_id=f"cust-{i:09d}",
                                request_id=f"req-{i:09d}").SerializeToString()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"promo_bench_codes_{os.getpid()}"
    size = 2 * 1024 * 1024 if args.quick else 10 * 1024 * 1024 - 1024
    pairs = args.pairs or (2 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    data, count = make_file(size)
    print(f"file: {len(data):,} bytes, {count:,} codes; {pairs} pairs; allocation runs of "
          f"{seconds:g} s at {args.concurrency} in flight", flush=True)
    async with scratch_database(args.dsn, name) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE bench_copy (promotion_id bigint NOT NULL DEFAULT 1, ordinal integer "
                "GENERATED BY DEFAULT AS IDENTITY, code text NOT NULL, upload_id bigint NOT NULL "
                "DEFAULT 1, PRIMARY KEY (promotion_id, ordinal), UNIQUE (promotion_id, code))")
            await conn.execute("CREATE TABLE bench_copy1 (code text PRIMARY KEY)")
            await conn.execute("CREATE TABLE bench_alloc (id bigserial PRIMARY KEY, code text "
                               "NOT NULL UNIQUE, used boolean NOT NULL DEFAULT false)")
            await conn.execute("CREATE INDEX bench_alloc_unused ON bench_alloc (id) "
                               "WHERE NOT used")
        finally:
            await conn.close()
        project = await ServerProcess.start("bench.codes", ["--serve", PROJECT, "--dsn", dsn],
                                            quiet=True)
        try:
            channel = aio.insecure_channel(project.address)
            await rtpb_grpc.RewardTypeServiceStub(channel).CreateRewardType(
                rtpb.CreateRewardTypeRequest(request_id="rt", reward_type=rtpb.RewardType(
                    name="percent_off", display_name="Percent off",
                    category=rtpb.REWARD_CATEGORY_UNITS)), metadata=ADMIN_METADATA)
            uploads, copies, copies1 = [], [], []
            for pair in range(pairs):
                uploads.append(await upload_once(channel, f"UP{pair}", data))
                copies.append(await bare_copy_once(dsn, data))
                copies1.append(await bare_copy_once(dsn, data, "bench_copy1"))
                print(f"pair {pair + 1}: upload {uploads[-1]:.3f} s, bare COPY "
                      f"{copies[-1]:.3f} s (one-column table {copies1[-1]:.3f} s), ratio "
                      f"{uploads[-1] / copies[-1]:.2f}", flush=True)
            # The allocation pool: the same codes, in a promotion of their own.
            await _create_promotion(channel, "ALLOC")
            await stream_upload(channel, "ALLOC", data)
            await channel.close()
        finally:
            await project.stop()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.copy_to_table("bench_alloc", source=_pieces(data), columns=["code"])
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

        bodies = Requests(_get_reward_body)
        alloc: dict[str, list[float]] = {PROJECT: [], BASELINE: []}
        codes_out: dict[str, list[bytes]] = {PROJECT: [], BASELINE: []}
        errors: dict[str, int] = {PROJECT: 0, BASELINE: 0}
        for pair in range(pairs):
            for kind in (PROJECT, BASELINE):
                server = await ServerProcess.start("bench.codes", ["--serve", kind, "--dsn", dsn],
                                                   quiet=True)
                try:
                    channels = open_channels(server.address, args.concurrency)
                    try:
                        for ch in channels:
                            await asyncio.wait_for(ch.channel_ready(), 10)
                        method = GET_REWARD if kind == PROJECT else BASELINE_METHOD
                        bodies.prebuild(math.ceil(6000 * seconds))
                        await closed_loop(channels, method, bodies, concurrency=args.concurrency,
                                          calls=200)  # warm-up
                        result = await closed_loop(channels, method, bodies,
                                                   concurrency=args.concurrency, seconds=seconds)
                    finally:
                        await close_channels(channels)
                finally:
                    await server.stop()
                alloc[kind].append(result.rps)
                errors[kind] += sum(result.errors.values())
                codes_out[kind].extend(_codes(kind, result.replies))
            print(f"pair {pair + 1}: GetReward {alloc[PROJECT][-1]:,.0f}/s, SKIP LOCKED "
                  f"{alloc[BASELINE][-1]:,.0f}/s, ratio "
                  f"{alloc[PROJECT][-1] / alloc[BASELINE][-1]:.2f}", flush=True)
        conn = await asyncpg.connect(dsn)
        try:
            db_duplicates = await conn.fetchval(
                """SELECT count(*) FROM (SELECT promo_code FROM grants g
                     JOIN promotions p ON p.id = g.promotion_id WHERE p.code = 'ALLOC'
                    GROUP BY promo_code HAVING count(*) > 1) d""")
            granted = await conn.fetchval(
                "SELECT count(*) FROM grants g JOIN promotions p ON p.id = g.promotion_id "
                "WHERE p.code = 'ALLOC'")
            used = await conn.fetchval(
                "SELECT allocated FROM code_pools cp JOIN promotions p ON p.id = cp.promotion_id "
                "WHERE p.code = 'ALLOC'")
        finally:
            await conn.close()
    duplicates = (db_duplicates + _dupes(codes_out[PROJECT]) + _dupes(codes_out[BASELINE]))
    upload_ratios = [u / c for u, c in zip(uploads, copies, strict=True)]
    alloc_ratios = [a / b for a, b in zip(alloc[PROJECT], alloc[BASELINE], strict=True)]
    print(f"\nupload: median {median(uploads):.3f} s vs bare COPY {median(copies):.3f} s; "
          f"median ratio {median(upload_ratios):.2f} (target <= 1.5); against COPY into a "
          f"one-column table ({median(copies1):.3f} s): "
          f"{median([u / c for u, c in zip(uploads, copies1, strict=True)]):.2f}")
    print(f"allocation at c{args.concurrency}: median GetReward {median(alloc[PROJECT]):,.0f}/s vs "
          f"SKIP LOCKED {median(alloc[BASELINE]):,.0f}/s; median ratio "
          f"{median(alloc_ratios):.2f} (target >= 0.7)")
    print(f"codes handed out by GetReward: {len(codes_out[PROJECT]):,} (grants in the database "
          f"{granted:,}, pool counter {used:,}); duplicates: {duplicates}; errors: {errors}")
    return {"bench": "codes", "upload_ratio": round(median(upload_ratios), 3),
            "alloc_ratio": round(median(alloc_ratios), 3), "duplicates": duplicates,
            "upload_s": round(median(uploads), 3), "copy_s": round(median(copies), 3),
            "copy_one_column_s": round(median(copies1), 3),
            "codes": count, "bytes": len(data), "alloc_rps": round(median(alloc[PROJECT])),
            "baseline_alloc_rps": round(median(alloc[BASELINE])), "quick": args.quick}


def _codes(kind: str, replies: list[bytes]) -> list[bytes]:
    if kind == BASELINE:
        return [r for r in replies if r]
    out = []
    for reply in replies:
        response = rpb.GetRewardResponse.FromString(reply)
        if response.HasField("grant") and not response.existing:
            out.append(response.grant.promo_code.encode())
    return out


def _dupes(codes: list[bytes]) -> int:
    return len(codes) - len(set(codes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 MB file, 2 pairs, 2 s runs")
    parser.add_argument("--dsn", default=default_database_url())
    parser.add_argument("--pairs", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve", choices=(PROJECT, BASELINE))
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.dsn)
        return
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
