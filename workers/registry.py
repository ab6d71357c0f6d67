"""Outbox job handlers by kind. Each later capability registers its kinds here.

A handler gets the worker context and the job, must be idempotent (delivery is at least once),
and signals failure by raising: ``PermanentJobError`` stops retrying, anything else is retried
with backoff until the job's max_attempts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from storage.outbox import OutboxJob

JobHandler = Callable[[dict[str, Any], OutboxJob], Awaitable[None]]
SweepHook = Callable[[dict[str, Any]], Awaitable[None]]

HANDLERS: dict[str, JobHandler] = {}
SWEEP_HOOKS: list[SweepHook] = []
# Kinds whose one running job also takes the other due jobs of its kind: the sweeper queues at
# most this many of them per tick (a function of the settings), see storage.outbox.lease_due_jobs.
SWEEP_CAPS: dict[str, Callable[[Any], int]] = {}


class PermanentJobError(Exception):
    """A failure that retrying cannot fix (bad payload, a peer that said 4xx)."""


def handler(kind: str) -> Callable[[JobHandler], JobHandler]:
    def register(fn: JobHandler) -> JobHandler:
        if kind in HANDLERS and HANDLERS[kind] is not fn:
            raise ValueError(f"a handler for outbox kind {kind!r} is already registered")
        HANDLERS[kind] = fn
        return fn
    return register


def sweep_hook(fn: SweepHook) -> SweepHook:
    """Register a function the sweeper calls on every tick (e.g. to find due campaigns)."""
    if fn not in SWEEP_HOOKS:
        SWEEP_HOOKS.append(fn)
    return fn
