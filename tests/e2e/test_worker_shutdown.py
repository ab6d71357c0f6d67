"""`promo worker` stops cleanly on SIGTERM and SIGINT, also with jobs in flight.

The bug this guards: arq's close() cancelled the running job tasks and then gathered them; one
cancelled while arq recorded its result re-raised CancelledError there, so the worker skipped its
shutdown (pool left open, no "worker stopped") and exited 1 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from arq.connections import RedisSettings
from arq.connections import create_pool as create_arq_pool

from config.settings import Settings
from storage.queue import queue_outbox_job
from tests.conftest import Services
from workers.main import build_worker

ROOT = Path(__file__).resolve().parents[2]
JOBS = 300
# Outbox ids that name no row: each job is one quick lookup ("not due or already done"), so
# with a few hundred queued, the signal finds jobs in every phase of their run.
MISSING_JOB_IDS = range(10_000_000, 10_000_000 + JOBS)


async def _queue_jobs(redis_url: str, queue_name: str) -> Any:
    redis = await create_arq_pool(RedisSettings.from_dsn(redis_url))
    for job_id in MISSING_JOB_IDS:
        await queue_outbox_job(redis, job_id=job_id, attempts=0, due_at=datetime.now(UTC),
                               queue_name=queue_name)
    return redis


async def _read_until(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"the worker exited before logging {text!r}:\n" + "".join(seen))
        seen.append(line)
        if text in line:
            return


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_promo_worker_stops_cleanly_with_jobs_in_flight(
        database_url: str, services: Services, queue_name: str, signum: signal.Signals) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=database_url, PROMO_REDIS_URL=services.redis_url,
               PROMO_QUEUE_NAME=queue_name, PROMO_LOG_FORMAT="text",
               PROMO_MIGRATE_ON_START="false", PROMO_DB_POOL_MIN_SIZE="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "worker", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen: list[str] = []
    redis = None
    try:
        await asyncio.wait_for(_read_until(proc.stderr, "worker started", seen), 60)
        redis = await _queue_jobs(services.redis_url, queue_name)
        deadline = time.monotonic() + 30
        while await redis.zcard(queue_name) > JOBS - 20:  # the worker is taking jobs
            assert time.monotonic() < deadline, "the worker took no job:\n" + "".join(seen)
            await asyncio.sleep(0.01)

        proc.send_signal(signum)
        stdout, rest = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if redis is not None:
            await redis.aclose()
    stderr = "".join(seen) + rest.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr + stdout.decode()
    assert stderr.count("worker stopped") == 1, stderr


async def test_close_survives_a_job_cancelled_while_its_result_is_recorded(
        settings: Settings, services: Services, caplog: pytest.LogCaptureFixture) -> None:
    """Deterministic: a job is held in arq's own result bookkeeping when the worker closes."""
    worker = build_worker(settings, handle_signals=False, run_sweeper=False)
    recording = asyncio.Event()
    release = asyncio.Event()

    async def slow_finish_job(*args: Any, **kwargs: Any) -> None:
        recording.set()
        await release.wait()

    worker.finish_job = slow_finish_job  # type: ignore[method-assign]
    redis = await create_arq_pool(RedisSettings.from_dsn(services.redis_url))
    await queue_outbox_job(redis, job_id=MISSING_JOB_IDS[0], attempts=0,
                           due_at=datetime.now(UTC), queue_name=settings.queue_name)
    task = asyncio.create_task(worker.async_run())
    try:
        await asyncio.wait_for(recording.wait(), 30)
        with caplog.at_level(logging.INFO, logger="promo.worker"):
            await asyncio.wait_for(worker.close(), 30)
        assert "pool" not in worker.ctx  # on_shutdown ran and closed the pool
        assert [r.getMessage() for r in caplog.records
                if r.name == "promo.worker"] == ["worker stopped"]
    finally:
        release.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()
