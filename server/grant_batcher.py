"""Group commit for GetReward: the grants of one promotion that arrive while earlier ones are
in the database go to it together, in one round trip and one transaction.

Why: every grant of a promotion charges the same counter rows (its customer cap, its budget
windows). Sent one by one, concurrent grants queue on those rows' locks and each pays its own
commit, lock wait and pool round trips; that, not the work of a grant, is most of what a busy
promotion costs PostgreSQL and this process. Batched, the counter rows are locked once per
batch and one commit covers the batch (storage/migrations/0017_grant_batch.sql), while each
grant stays all or nothing on its own and sees the counters exactly as if the grants had come
one after the other.

Nothing waits for a batch to fill: a grant that finds no batch of its promotion in the
database goes at once, alone (so one call in flight has the latency of an unbatched call);
grants arriving meanwhile queue, and the next batch takes up to ``max_batch`` of them. At most
``max_in_flight`` batches per promotion are in the database at a time (more would only queue on
the same row locks). If a batch fails as a whole (a database error, not a refusal), each of its
grants is sent again on its own, so one bad grant cannot fail its neighbours; not when the
database timed out or is unreachable: then every grant of the batch gets that error at once.
A batch whose callers all gave up is cancelled rather than left holding a pool connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import asyncpg

from server.errors import database_timed_out, database_unreachable
from server.metrics import GRANT_BATCH_FALLBACKS, GRANT_BATCH_SIZE
from storage import promotions as repo
from storage.promotions import GrantOutcome, GrantRequest

log = logging.getLogger("promo.rewards")

# A deadlock PostgreSQL broke by aborting one transaction: safe to run that transaction again.
DEADLOCK = asyncpg.DeadlockDetectedError
DEADLOCK_ATTEMPTS = 5

# PostgreSQL keeps 64 subtransactions per transaction in shared memory; past that, every
# snapshot taken elsewhere gets slower. Each grant of a batch is one subtransaction.
MAX_BATCH_LIMIT = 60


@dataclass
class _Queue:
    waiting: deque[tuple[GrantRequest, asyncio.Future[GrantOutcome]]] = field(
        default_factory=deque)
    in_flight: int = 0


class GrantBatcher:
    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 32,
                 max_in_flight: int = 2) -> None:
        if not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be 1-{MAX_BATCH_LIMIT}, got {max_batch}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._pool = pool
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queues: dict[int, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def grant(self, request: GrantRequest) -> GrantOutcome:
        if self._max_batch == 1:
            GRANT_BATCH_SIZE.observe(1)
            async with self._pool.acquire() as conn:
                return await repo.grant(conn, request)
        queue = self._queues.get(request.promotion_id)
        if queue is None:
            queue = self._queues[request.promotion_id] = _Queue()
        future: asyncio.Future[GrantOutcome] = asyncio.get_running_loop().create_future()
        queue.waiting.append((request, future))
        if queue.in_flight < self._max_in_flight:
            queue.in_flight += 1
            if len(queue.waiting) == 1:
                # Nothing waits ahead of this grant: send it from this task (no hand-off, so a
                # lone call costs what an unbatched one does); whoever queued meanwhile is
                # sent next by a drainer that takes over this slot.
                queue.waiting.popleft()
                try:
                    await self._send([(request, future)])
                finally:
                    self._carry_on(request.promotion_id, queue)
            else:
                self._start_drainer(request.promotion_id, queue)
        return await future

    def _start_drainer(self, promotion_id: int, queue: _Queue) -> None:
        task = asyncio.create_task(self._drain(promotion_id, queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _carry_on(self, promotion_id: int, queue: _Queue) -> None:
        """A sender is done: a drainer takes its slot if grants wait, else the slot is freed
        (and the last one out forgets the queue)."""
        if queue.waiting:
            self._start_drainer(promotion_id, queue)
            return
        queue.in_flight -= 1
        if queue.in_flight == 0:
            self._queues.pop(promotion_id, None)

    async def _drain(self, promotion_id: int, queue: _Queue) -> None:
        """Send batches while grants wait."""
        try:
            while queue.waiting:
                batch = [queue.waiting.popleft()
                         for _ in range(min(self._max_batch, len(queue.waiting)))]
                await self._send([(r, f) for r, f in batch if not f.cancelled()])
        finally:
            queue.in_flight -= 1
            if queue.in_flight == 0 and not queue.waiting:
                self._queues.pop(promotion_id, None)

    async def _grant(self, batch: list[tuple[GrantRequest, asyncio.Future[GrantOutcome]]]
                     ) -> list[GrantOutcome]:
        async with self._pool.acquire() as conn:
            if len(batch) == 1:
                return [await repo.grant(conn, batch[0][0])]
            return await repo.grant_many(conn, [r for r, _ in batch])

    async def _grant_unless_abandoned(
            self, batch: list[tuple[GrantRequest, asyncio.Future[GrantOutcome]]]
    ) -> list[GrantOutcome] | None:
        """The batch's outcomes; None when every caller of the batch gave up first (their
        deadlines ran out while it waited for a connection or a lock): the batch is then
        cancelled, so that it does not hold a pool connection for nobody. Whatever it had not
        committed is rolled back; a retry of those calls is answered as usual."""
        work = asyncio.ensure_future(self._grant(batch))

        def abandoned(_: object) -> None:
            if not work.done() and all(f.cancelled() for _, f in batch):
                work.cancel()

        for _, future in batch:
            future.add_done_callback(abandoned)
        try:
            return await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if work.cancelled() and current is not None and not current.cancelling():
                return None  # the callers' futures are cancelled already
            raise

    async def _send(self, batch: list[tuple[GrantRequest, asyncio.Future[GrantOutcome]]],
                    attempt: int = 1) -> None:
        if not batch:
            return
        GRANT_BATCH_SIZE.observe(len(batch))
        try:
            outcomes = await self._grant_unless_abandoned(batch)
            if outcomes is None:
                return
        except asyncio.CancelledError:
            # Shutting down, or a lone grant's own call was cancelled (its deadline fired while
            # the database held it): no waiter may hang. Cancelled, not given the exception: a
            # future nobody awaits any more (the cancelled call's own) would make asyncio log
            # "Future exception was never retrieved" at ERROR.
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # every waiter must get an answer
            if len(batch) == 1:
                if isinstance(exc, DEADLOCK) and attempt < DEADLOCK_ATTEMPTS:
                    # PostgreSQL broke a lock cycle (e.g. with a RevokeGrant of the same
                    # customer) by aborting this grant: nothing of it was written, so it is
                    # simply sent again (it is idempotent by request id anyway).
                    log.info("grant retried after a deadlock", extra={"attempt": attempt})
                    await self._send(batch, attempt + 1)
                    return
                _settle(batch[0][1], exc)
                return
            if database_timed_out(exc) or database_unreachable(exc):
                # Not the batch's fault, and one by one each would wait as long again (a call
                # without a deadline waited k + 1 timeouts): every waiter gets the error now.
                for _, future in batch:
                    _settle(future, exc)
                return
            GRANT_BATCH_FALLBACKS.inc()
            log.warning("grant batch failed; sending its grants one by one",
                        extra={"grants": len(batch), "error": type(exc).__name__})
            for request, future in batch:
                await self._send([(request, future)])
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


def _settle(future: asyncio.Future[GrantOutcome], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
