"""A bound on the job slots that webhook delivery jobs may hold in one worker.

Why: a delivery job holds its arq job slot until every send it claimed is done, and sends to a
slow listener wait for that listener's share of the send slots. In a flood (thousands of due
deliveries to a listener answering in a second) every job slot of the worker was a delivery job
waiting for sends, and arq, which starts jobs in due order, started nothing else until the
backlog had drained: a campaign due meanwhile executed a minute or more late. Delivery jobs
now take at most three quarters of ``PROMO_WORKER_MAX_JOBS`` (rounded down, at least one fewer
than all of them when there are two or more), so the other slots stay free for campaign
executions, bonus batches and the rest. A delivery job that finds the lane full is put off a
moment without using up an attempt (workers.outbox.JobDeferred); the delivery jobs already
running go on claiming the due deliveries meanwhile, so the backlog drains as fast as before.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from storage.queue import delivery_job_limit

__all__ = ["LANE_KEY", "RETRY_SECONDS", "DeliveryLane", "delivery_job_limit"]

LANE_KEY = "delivery_lane"
# A delivery job that finds the lane full runs again after this long (times 0.5-1.0, jitter).
RETRY_SECONDS = 2.0


class DeliveryLane:
    """Counts the delivery jobs running in this worker."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def enter(self) -> bool:
        """Take a place, or False when the lane is full (the caller puts the job off)."""
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def leave(self) -> None:
        self.running -= 1

    def retry_at(self, now: datetime, rng: random.Random | None = None) -> datetime:
        seconds = RETRY_SECONDS * (0.5 + 0.5 * (rng or random).random())
        return now + timedelta(seconds=seconds)
