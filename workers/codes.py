"""The sweeper's share of code pools: alerts left pending by a server that died between the
grant that raised them and their dispatch become events here."""

from __future__ import annotations

import logging
from typing import Any

from storage import code_pools
from storage.queue import queue_after_commit
from workers.registry import sweep_hook

log = logging.getLogger("promo.worker.codes")


@sweep_hook
async def dispatch_code_alerts(ctx: dict[str, Any]) -> None:
    now = ctx["clock"].now()
    async with ctx["pool"].acquire() as conn, conn.transaction():
        job_ids = await code_pools.dispatch_alerts(conn, now)
    for job_id in job_ids:
        await queue_after_commit(ctx.get("redis"), job_id=job_id, due_at=now,
                                 queue_name=ctx["settings"].queue_name)
    if job_ids:
        log.info("pending code pool alerts dispatched", extra={"outbox_jobs": len(job_ids)})
