"""Code-pool alerts raised by grants become events right away, off the caller's path.

promo_grant records an alert row in the grant's own transaction (so it is never lost) and says
so; the server then emits the event for the listeners in a separate short transaction, in the
background, so the customer's GetReward answer does not wait for it. If the process dies in
between, the worker's sweeper dispatches what is left (workers/codes.py).
"""

from __future__ import annotations

import asyncio
import logging

from server.deps import Dependencies
from storage import code_pools
from storage.queue import queue_after_commit

log = logging.getLogger("promo.codes")


async def dispatch_now(deps: Dependencies) -> int:
    """Emit every pending alert's event; returns how many outbox jobs were queued."""
    now = deps.clock.now()
    async with deps.pool.acquire() as conn, conn.transaction():
        job_ids = await code_pools.dispatch_alerts(conn, now)
    for job_id in job_ids:
        await queue_after_commit(deps.redis, job_id=job_id, due_at=now,
                                 queue_name=deps.queue_name)
    return len(job_ids)


class AlertDispatcher:
    """Runs ``dispatch_now`` in the background, one pass at a time per servicer (passes of
    several servicers or servers at once are safe: each takes other alerts, SKIP LOCKED)."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def dispatch_soon(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # the running pass may have missed the newest alert
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                queued = await dispatch_now(self._deps)
                log.info("code pool alerts dispatched", extra={"outbox_jobs": queued})
            except Exception:  # the rows stay pending; the worker's sweeper retries them
                log.warning("could not dispatch code pool alerts; the sweeper will",
                            exc_info=True)
            if not self._again:
                return

    async def wait(self) -> None:
        """For tests and shutdown: let a running dispatch finish."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
