"""A grant that waited on a counter an edit had locked is not charged against the old limits.

UpdatePromotion recounts the caps' counters after locking them (storage.promotions.save with
``recount_at``). A grant that had read the promotion's version before the edit and then waited
for such a counter went on, after the edit committed, with the limit it had been given: a
customer cap cut from 1000 to 1 with one customer already in still let a second one in (seen
once in CI as 104 live customers against a cut to 30 that counted 102). promo_grant now reads
the version again last and refuses with STALE (migration 0025), so the caller reloads the
promotion and the new limit applies. Deterministic: the edit is held open until the grant is
seen waiting on its lock.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal

import asyncpg
import pytest

from core.caps import LIFETIME_START
from core.clock import FixedClock
from storage import promotions as repo
from storage.promotions import GrantOutcome, GrantRequest
from tests.conftest import Api
from tests.e2e.promo_helpers import get_reward, promotion, reward_type


async def _wait_until_blocked(pool: asyncpg.Pool, pid: int) -> None:
    for _ in range(500):
        if await pool.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                               "WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the grant never waited for the edit's counter lock")


async def _live_customers(pool: asyncpg.Pool) -> tuple[int, Decimal]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM promotion_customers c JOIN promotions p
                      ON p.id = c.promotion_id WHERE p.code = 'CUT' AND c.live_grants > 0)
                  AS live,
                  (SELECT u.used FROM cap_usage u JOIN promotions p ON p.id = u.promotion_id
                    WHERE p.code = 'CUT' AND u.scope = '#customers') AS used""")
    assert row is not None
    return row["live"], row["used"]


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in a batch"])
async def test_a_grant_held_up_by_a_cap_cut_is_stale_not_over_the_new_cap(
        api: Api, pool: asyncpg.Pool, clock: FixedClock, batched: bool) -> None:
    await reward_type(api)
    await promotion(api, "CUT", customer_cap=1000)
    first = await get_reward(api, "first", "CUT")
    assert first.HasField("grant")
    old = await pool.fetchrow("SELECT id, version FROM promotions WHERE code = 'CUT'")
    assert old is not None
    request = GrantRequest(
        promotion_id=old["id"], version=old["version"], customer_id="second", campaign_key="",
        request_id="second-1", rewards=[{"reward_type": "cashback", "kind": "SINGLE",
                                         "value": "1"}],
        promo_code="CUT", now=clock.now(), customer_cap=1000, customers_start=LIFETIME_START,
        charges=[])
    async with pool.acquire() as edit, pool.acquire() as granting:
        pid = await granting.fetchval("SELECT pg_backend_pid()")
        transaction = edit.transaction()
        await transaction.start()
        try:
            stored = await repo.get(edit, "CUT", for_update=True)
            await repo.save(edit, stored.id, replace(stored.promotion, customer_cap=1),
                            recount_at=clock.now())
            grant = asyncio.ensure_future(
                repo.grant_many(granting, [request]) if batched else repo.grant(granting,
                                                                                 request))
            await _wait_until_blocked(pool, pid)
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()
        outcome = await grant
    if batched:
        assert isinstance(outcome, list)
        [outcome] = outcome
    assert isinstance(outcome, GrantOutcome)
    assert outcome.outcome == "STALE"
    assert await _live_customers(pool) == (1, Decimal(1))
    # Asked again (the server reloads the promotion), the new cap of 1 is full.
    again = await get_reward(api, "second", "CUT")
    assert not again.HasField("grant")
    assert await _live_customers(pool) == (1, Decimal(1))
