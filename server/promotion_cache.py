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
    """Promotions by code, each kept ``ttl_seconds`` after its load.

    Bounded by what is in use: a load lock lives only while calls for its code wait on it
    (a GetReward with a mistyped or random code leaves nothing behind), and expired entries
    are dropped by the loads (swept at most once per TTL), so a promotion no longer asked for
    leaves memory within two TTLs of its last load."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_seconds: float = 2.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._entries: dict[str, CachedPromotion] = {}
        # code -> (its load lock, how many calls hold or wait for it)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._swept_at = time.monotonic()

    def invalidate(self, code: str) -> None:
        self._entries.pop(code, None)

    async def get(self, code: str) -> CachedPromotion:
        entry = self._entries.get(code)
        if entry is not None and time.monotonic() - entry.loaded_at < self._ttl:
            return entry
        lock, users = self._locks.get(code) or (asyncio.Lock(), 0)
        self._locks[code] = (lock, users + 1)
        try:
            async with lock:  # one load per code at a time, however many calls wait
                entry = self._entries.get(code)
                if entry is not None and time.monotonic() - entry.loaded_at < self._ttl:
                    return entry
                return await self._load(code)
        finally:
            lock, users = self._locks[code]
            if users == 1:
                del self._locks[code]
            else:
                self._locks[code] = (lock, users - 1)

    async def _load(self, code: str) -> CachedPromotion:
        async with self._pool.acquire() as conn:
            stored = await promotions_repo.get(conn, code)
            names = [r.reward_type for r in stored.promotion.rewards]
            types = {n: await reward_types_repo.get(conn, n) for n in names}
        now = time.monotonic()
        entry = CachedPromotion(stored, types, now,
                                load_rewards(stored.promotion, stored.formulas))
        if now - self._swept_at >= self._ttl:
            self._swept_at = now
            for stale in [c for c, e in self._entries.items() if now - e.loaded_at >= self._ttl]:
                del self._entries[stale]
        self._entries[code] = entry
        return entry
