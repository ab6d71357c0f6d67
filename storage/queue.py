"""The Redis side of the outbox: a pointer to an outbox row, queued for arq.

Server and workers both queue outbox rows (the server right after its transaction commits, for
low latency; the workers' sweeper for anything Redis lost), so the job name and the job id
format live here, beside the outbox table they point at. The job id includes the attempt number
so a retry is a new arq job and arq's result cache never swallows it. A finished row armed again
(a bonus window's batch, storage.outbox.rearm_done_job) starts its attempts over, so its id can
be one whose result arq still keeps: that result is of a run that is over, and is dropped so the
row is queued now rather than after the result expires and the sweeper's lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from datetime import UTC, datetime

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix

log = logging.getLogger("promo.queue")

OUTBOX_JOB_FUNCTION = "run_outbox_job"

# Queueing after commit waits at most this long for Redis: a Redis that accepts connections
# but does not answer (a frozen process, a partition) must not hold an answer whose change has
# committed. After such a timeout the client is left alone for a while, so that one call
# queueing several jobs (or many calls at once) pays the wait once, not once per job.
QUEUE_TIMEOUT_SECONDS = 1.0
QUIET_AFTER_TIMEOUT_SECONDS = 5.0
_quiet_until: weakref.WeakKeyDictionary[ArqRedis, float] = weakref.WeakKeyDictionary()
# Enqueues given up on: they run on (a stalled Redis may answer later, and redis-py's cleanup
# of a cancelled command can itself wait on Redis), referenced here until they end.
_abandoned: set[asyncio.Task[bool]] = set()


def _forget(task: asyncio.Task[bool]) -> None:
    _abandoned.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.info("an outbox job given up on failed to queue; the sweeper will",
                 extra={"error": str(task.exception())})


def delivery_job_limit(worker_max_jobs: int) -> int:
    """The job slots webhook delivery jobs may hold in one worker (workers/delivery_lane.py),
    and so how many of a burst of delivery jobs are worth queueing: three quarters of the
    worker's slots, rounded down, at least one fewer than all of them, at least one:
    20 -> 15, 4 -> 3, 2 -> 1, 1 -> 1 (no slot can be kept free)."""
    if worker_max_jobs <= 1:
        return 1
    return max(1, min(worker_max_jobs * 3 // 4, worker_max_jobs - 1))


def outbox_job_id(queue_name: str, job_id: int, attempts: int, arming: str = "") -> str:
    """arq job ids are global to a Redis database, so they carry the queue name too.
    ``arming`` tells apart two armings at the same attempt count (a webhook send that was not
    made gives its attempt back, so the retry would otherwise reuse the running job's id)."""
    suffix = f"/{arming}" if arming else ""
    return f"{queue_name}/outbox/{job_id}/{attempts}{suffix}"


def fresh_arming(due_at: datetime) -> str:
    """An ``arming`` for outbox_job_id when the attempt count repeats (a webhook send that was
    not made gave its attempt back): the due time, unique per arming."""
    return f"rearmed-{round(due_at.timestamp() * 1_000_000)}"


async def queue_outbox_job(redis: ArqRedis, *, job_id: int, attempts: int, due_at: datetime,
                           queue_name: str, arming: str = "") -> bool:
    """Queue the row for a worker; False if arq already has that job id (nothing to do).

    A row already due is queued without ``_defer_until``: arq keeps a job's key for
    (defer_until - now) + 24 h, so a row more than a day overdue (workers down over a weekend)
    would get a negative expiry, which Redis refuses. arq compares with the real time, so
    this does too (not the service's clock).
    """
    defer_until = due_at if due_at > datetime.now(UTC) else None
    arq_id = outbox_job_id(queue_name, job_id, attempts, arming)
    job = await redis.enqueue_job(OUTBOX_JOB_FUNCTION, job_id, _job_id=arq_id,
                                  _defer_until=defer_until, _queue_name=queue_name)
    if job is None and not await redis.exists(job_key_prefix + arq_id) \
            and await redis.delete(result_key_prefix + arq_id):
        # Refused only for a kept result (no job queued or running under that id): an earlier
        # arming's run, finished. The row is pending again, so queue it again.
        log.info("outbox job armed again; dropped the finished run's result",
                 extra={"outbox_job_id": job_id, "arq_job_id": arq_id})
        job = await redis.enqueue_job(OUTBOX_JOB_FUNCTION, job_id, _job_id=arq_id,
                                      _defer_until=defer_until, _queue_name=queue_name)
    return job is not None


async def queue_after_commit(redis: ArqRedis | None, *, job_id: int | None, due_at: datetime,
                             queue_name: str) -> None:
    """Best effort: if Redis is down or does not answer within QUEUE_TIMEOUT_SECONDS, the
    sweeper queues the row later. Never raises."""
    if redis is None or job_id is None:
        return
    if _quiet_until.get(redis, 0.0) > time.monotonic():
        log.info("outbox job not queued: Redis did not answer a moment ago; the sweeper will",
                 extra={"outbox_job_id": job_id})
        return
    # Not wait_for: cancelling the command makes redis-py clean up (UNWATCH) on a connection
    # without a read timeout, which waits as long as Redis stalls. The enqueue is left to
    # finish on its own instead; queueing a row twice is harmless (its arq job id).
    task = asyncio.ensure_future(queue_outbox_job(redis, job_id=job_id, attempts=0,
                                                  due_at=due_at, queue_name=queue_name))
    _abandoned.add(task)
    task.add_done_callback(_forget)
    try:
        done, _ = await asyncio.wait({task}, timeout=QUEUE_TIMEOUT_SECONDS)
        if not done:
            _quiet_until[redis] = time.monotonic() + QUIET_AFTER_TIMEOUT_SECONDS
            log.warning("could not queue outbox job: Redis did not answer in time; the "
                        "sweeper will", extra={"outbox_job_id": job_id,
                                               "timeout_s": QUEUE_TIMEOUT_SECONDS})
            return
        task.result()
    except Exception:  # the row is safe in PostgreSQL; the sweeper will find it
        log.warning("could not queue outbox job; the sweeper will", exc_info=True,
                    extra={"outbox_job_id": job_id})


async def queue_deliveries_after_commit(redis: ArqRedis | None, *, job_ids: list[int],
                                        due_at: datetime, queue_name: str,
                                        worker_max_jobs: int) -> int:
    """Queue a burst of webhook delivery jobs (a bonus batch's or an approval's events): at
    most ``delivery_job_limit(worker_max_jobs)`` of them, the first ones. Each delivery job
    claims the other due deliveries in chunks for as long as any are due, so a few queued jobs
    send the whole burst, and the rest stay in PostgreSQL for them (or, if they end first, for
    the sweeper's next tick). Queueing one arq job per delivery instead put up to 100,000 jobs
    in front of every other job in arq's due-ordered queue (a campaign due meanwhile), and
    took the queueing caller one Redis round trip per delivery. Returns how many were queued.
    Best effort, like queue_after_commit."""
    most = delivery_job_limit(worker_max_jobs)
    for job_id in job_ids[:most]:
        await queue_after_commit(redis, job_id=job_id, due_at=due_at, queue_name=queue_name)
    if len(job_ids) > most:
        log.info("delivery jobs queued as a few claimers; they take the rest from PostgreSQL",
                 extra={"deliveries": len(job_ids), "queued": most})
    return min(len(job_ids), most)
