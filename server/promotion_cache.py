"""Promotion configuration read from memory on the hot path.

Correctness does not depend on freshness: every grant passes the cached version to the
database, which answers STALE if the promotion changed, and the caller reloads and retries.
The short TTL only bounds how long reads such as "which reward types, which bounds" may lag.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from core.catalogue.reward_types import RewardType
from core.reward_formulas import RewardFormula, load_rewards
from storage import promotions as promotions_repo
from storage import reward_types as reward_types_repo
from storage.promotions import StoredPromotion


@dataclass(frozen=True)
class CachedPromotion:
    stored: StoredPromotion
    reward_types: dict[str, RewardType]
    loaded_at: float
    # TIERED and CALCULATED rewards by reward type, from their stored form (no parsing).
    formulas: dict[str, RewardFormula]


class PromotionCache:
    def __init__(self, pool: asyncpg.Pool, *, ttl_seconds: float = 2.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._entries: dict[str, CachedPromotion] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def invalidate(self, code: str) -> None:
        self._entries.pop(code, None)

    async def get(self, code: str) -> CachedPromotion:
        entry = self._entries.get(code)
        if entry is not None and time.monotonic() - entry.loaded_at < self._ttl:
            return entry
        lock = self._locks.setdefault(code, asyncio.Lock())
        async with lock:  # one load per code at a time, however many calls wait
            entry = self._entries.get(code)
            if entry is not None and time.monotonic() - entry.loaded_at < self._ttl:
                return entry
            async with self._pool.acquire() as conn:
                stored = await promotions_repo.get(conn, code)
                names = [r.reward_type for r in stored.promotion.rewards]
                types = {n: await reward_types_repo.get(conn, n) for n in names}
            entry = CachedPromotion(stored, types, time.monotonic(),
                                    load_rewards(stored.promotion, stored.formulas))
            self._entries[code] = entry
            return entry
