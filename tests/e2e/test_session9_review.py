"""A review of session 9's changes (d386148..e5b43ac): the defects it found, each a test that
failed before its fix.

1. Schedules: ``midnights_coincide`` said two names of one zone do NOT keep the same clock when
   the zone's DST starts at midnight (Cuba / America/Havana, Egypt / Africa/Cairo,
   Chile/Continental / America/Santiago): on the spring-forward day 00:00 does not exist, and
   comparing offsets at the nominal midnight gave the pre-jump offset in one and the post-jump
   offset in the other. Now the run instant is compared with the period's start of day.
2. Webhooks: a listener's answer with a NUL byte in its body (e.g. a gzip-compressed error page)
   became an error text PostgreSQL cannot store: the result write failed, cancelling the
   chunk's other sends, and the delivery was never recorded (every retry failed the same way;
   older than session 9). Now NUL is stored as U+FFFD (core.text.storable).
3. One listener's share of the send slots was "all but a quarter" (5 slots gave one listener
   4), not the documented "at most three quarters": now three quarters rounded down.
4. tests/database_factory.py: after a failed clone the thread stopped, so the error meant for
   the next test could be drained by its clean-up and databases given back later were never
   dropped. Now every later test gets the clone error, and the thread keeps dropping.
5. The share was per listener: one hung host registered as several listeners (one per event
   type, say) could still take every slot. Now a webhook's share is its host's.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import time as clock_time

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.bonuses.rules import Schedule, next_run
from core.bonuses.schedule_periods import midnights_coincide
from core.clock import FixedClock
from core.periods import RelativeKind, RelativePeriod, resolve_period
from tests.conftest import Api, Services, rpc_error_reason
from tests.database_factory import DatabaseFactory
from tests.e2e.test_bonus_review_triggers import _create_schedule, _schedule, _today_so_far
from tests.e2e.test_bonuses_api import create, customers, definition
from tests.e2e.test_webhook_behaviour_audit import (
    ArrivalClock,
    RawListener,
    add_listener,
    after,
    answer,
    attempts_of,
    deliveries_of,
    delivery_of,
    emit,
    hang,
    job_of,
    worker_ctx,
)
from tests.integration.test_database_factory import _databases
from tests.webhook_listener import WebhookListener
from workers import webhooks
from workers.outbox import run_outbox_job
from workers.send_slots import listener_share

# ---------------------------------------------------------------------------------------------
# 1. Two names of one zone whose DST starts at midnight
# ---------------------------------------------------------------------------------------------

ALIASES = [("Cuba", "America/Havana"), ("Egypt", "Africa/Cairo"),
           ("Chile/Continental", "America/Santiago")]


@pytest.mark.parametrize(("run_zone", "period_zone"), ALIASES)
async def test_every_run_is_empty_yet_the_zones_are_said_not_to_keep_one_clock(
        run_zone: str, period_zone: str, clock: FixedClock) -> None:
    """Every daily 00:00 run over the next 800 days reads an empty 'today so far' (including the
    spring-forward day, whose midnight does not exist), so midnights_coincide should be True."""
    schedule = Schedule(schedule_id="s", definition_id="d", customer_ids=("a1",), weekday=None,
                        local_time=clock_time(0), time_zone=run_zone)
    period = RelativePeriod(RelativeKind.TODAY_SO_FAR, period_zone)
    at = clock.now()
    for _ in range(800):
        at = next_run(schedule, at)
        window = resolve_period(period, now=at, allow_empty=True)
        assert window.is_empty, (at, window)
    assert midnights_coincide(run_zone, period_zone, now=clock.now()), (
        f"{run_zone} and {period_zone} are one zone, yet judged not to keep the same clock")


async def test_a_midnight_schedule_in_another_name_of_a_dst_at_midnight_zone_is_accepted(
        api: Api) -> None:
    """docs/bonuses.md: a schedule at 00:00 in a zone keeping the same clock as the definition's
    'today so far' period is refused INVALID_PERIOD. Cuba is America/Havana under another name."""
    await create(api, definition("today-havana", "sum(bet.amount) * 10%",
                                 period=_today_so_far("America/Havana")))
    await customers(api, ("a1", "USD", "America/Havana"))
    with pytest.raises(grpc.RpcError) as caught:
        await _create_schedule(api, _schedule("alias", "today-havana", "a1", "00:00", "Cuba"))
    assert (caught.value.code(), rpc_error_reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PERIOD")


# ---------------------------------------------------------------------------------------------
# 2. A NUL byte in a listener's answer
# ---------------------------------------------------------------------------------------------

NUL_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\n\x1f\x8b\x08\x00x"


async def test_a_nul_byte_in_an_error_body_is_recorded_like_any_other_answer(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """A 500 whose body holds a NUL byte (here the first bytes of a gzip stream) must end as an
    ordinary retryable attempt (finished, status 500). The error text goes to PostgreSQL
    verbatim, the write fails, and the delivery's attempt is never recorded."""
    tuned = settings.model_copy(update={"webhook_timeout_seconds": 2.0})
    bad = await RawListener(answer(NUL_500)).start()
    # A healthy neighbour that answers 200 a little later, in the same chunk.
    slow_ok = await RawListener(after(0.3, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                                path="/hooks/ok").start()
    try:
        bad_id = await add_listener(pool, bad.url, clock.now())
        ok_id = await add_listener(pool, slow_ok.url, clock.now())
        await emit(pool, clock)
        bad_delivery = (await delivery_of(pool, bad_id)).id
        async with worker_ctx(tuned, pool, clock) as ctx:
            outcome = await run_outbox_job(ctx, await job_of(pool, bad_delivery))
            await asyncio.sleep(0.1)
            slots = ctx[webhooks.SLOTS_KEY]
            assert slots.in_flight == 0  # no slot leaked by the cancelled sends
    finally:
        await bad.stop()
        await slow_ok.stop()

    ok_row = await delivery_of(pool, ok_id)
    bad_row = await delivery_of(pool, bad_id)
    [bad_attempt] = await attempts_of(pool, bad_row.id)
    problems = []
    if bad_attempt.finished_at is None or bad_row.last_status_code != 500:
        problems.append(f"the 500 with a NUL byte was never recorded (job: {outcome!r}, "
                        f"attempt finished_at={bad_attempt.finished_at}, "
                        f"last_status_code={bad_row.last_status_code})")
    if len(slow_ok.requests) == 1 and ok_row.status.value != "DELIVERED":
        problems.append(f"the neighbour got its POST but is {ok_row.status.value}: its send "
                        "was cancelled by the failed write (it will get the event again)")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# 3. tests/database_factory.py after a failed clone (section 4 of the docstring)
# ---------------------------------------------------------------------------------------------

async def test_the_clone_error_reaches_the_next_test_even_after_the_thread_stopped(
        services: Services) -> None:
    """Module docstring: an error there is handed to every later test that asks (it used to be
    drained by the thread's clean-up, and the next test was told only that the factory had
    stopped)."""
    factory = DatabaseFactory(services.database_url, f"promo_no_such_{uuid.uuid4().hex[:8]}",
                              ahead=1, prefix=f"promo_rv_{uuid.uuid4().hex[:8]}_")
    try:
        for _ in range(1000):  # the next test asks a moment after the clone failed
            if factory._failed is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError) as failed:
            factory.take()
        assert "cloning a test database failed" in str(failed.value), str(failed.value)
    finally:
        factory.close()


async def test_databases_given_back_after_a_failed_clone_are_dropped(
        services: Services) -> None:
    """Module docstring: the clones of a test that ends are dropped on the factory's thread. A
    clone failing mid-session used to stop the thread, and the databases of the tests running
    then, given back afterwards, stayed behind."""
    template = f"promo_rv_tpl_{uuid.uuid4().hex[:8]}"
    prefix = f"promo_rv_{uuid.uuid4().hex[:8]}_"
    admin = await asyncpg.connect(services.database_url)
    factory: DatabaseFactory | None = None
    try:
        await admin.execute(f'CREATE DATABASE "{template}" TEMPLATE template0')
        factory = DatabaseFactory(services.database_url, template, ahead=1, prefix=prefix)
        first = factory.take()
        for _ in range(1000):  # the next clone, made ahead
            if factory._ready.qsize() >= 1:
                break
            await asyncio.sleep(0.01)
        await admin.execute(f'DROP DATABASE "{template}"')  # the next clone will fail
        second = factory.take()
        for _ in range(1000):  # the clone after it fails
            if factory._failed is not None:
                break
            await asyncio.sleep(0.01)
        factory.give_back(first)
        factory.give_back(second)
        factory.close()
        left = await _databases(services, prefix)
        assert left == set(), f"left behind: {sorted(left)}"
    finally:
        if factory is not None:
            factory.close()
        for name in await _databases(services, prefix):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        await admin.close()


# ---------------------------------------------------------------------------------------------
# 4. One listener's share of the send slots, as documented
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [5, 6, 7, 10])
def test_one_listeners_share_is_at_most_three_quarters_as_documented(total: int) -> None:
    """README (PROMO_WEBHOOK_CONCURRENCY) and docs/operations.md: 'at most three quarters of
    them, at least one fewer, to one listener'."""
    assert listener_share(total) <= total * 3 / 4, (total, listener_share(total))


# ---------------------------------------------------------------------------------------------
# 5. Several listeners on one hung host share one share
# ---------------------------------------------------------------------------------------------

async def test_listeners_on_one_hung_host_cannot_hold_every_slot_together(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """4 slots, 3 per host. Two listeners on one hung host, two events: four hung sends, which
    with a share per listener (3 each) took all four slots and held the healthy host's POSTs
    for the timeout. With a share per host they get three; the healthy host's go at once."""
    tuned = settings.model_copy(update={"webhook_concurrency": 4,
                                        "webhook_timeout_seconds": 1.0})
    hung = await RawListener(hang).start()
    try:
        first = await add_listener(pool, hung.url, clock.now())
        await add_listener(pool, hung.url.replace("/hooks/raw", "/hooks/other"), clock.now())
        healthy = await add_listener(pool, listener.url, clock.now())
        for i in range(2):
            await emit(pool, clock, payload={"campaign_id": f"c{i}"})
        async with worker_ctx(tuned, pool, clock) as ctx:
            arrivals = ArrivalClock(listener)
            await run_outbox_job(ctx, await job_of(pool, (await deliveries_of(pool, first))[0].id))
            times = await arrivals.stop()
    finally:
        await hung.stop()
    assert [r.status.value for r in await deliveries_of(pool, healthy)] == ["DELIVERED"] * 2
    assert len(times) == 2 and max(times) < 0.5, times
