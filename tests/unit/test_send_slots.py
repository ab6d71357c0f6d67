"""workers/send_slots.py: a worker's send slots, shared so that no listener can hold them all."""

from __future__ import annotations

import asyncio
import random

import pytest

from workers.send_slots import SendSlots, listener_share


@pytest.mark.parametrize(("total", "share"), [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 4),
                                              (7, 5), (8, 6), (10, 7), (32, 24), (1000, 750)])
def test_one_listener_gets_three_quarters_rounded_down_at_least_one(total: int,
                                                                    share: int) -> None:
    assert listener_share(total) == share
    assert SendSlots(total).per_listener == share
    assert share <= total * 3 / 4 or total == 1
    assert share < total or total == 1  # from two slots up, one at least is left to others


def test_no_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SendSlots(0)


async def test_a_hung_listener_leaves_the_other_listeners_a_slot() -> None:
    slots = SendSlots(2)
    await slots.acquire("hung")
    blocked = asyncio.ensure_future(slots.acquire("hung"))
    await asyncio.sleep(0)
    assert not blocked.done()  # its share (1 of 2) is taken
    await asyncio.wait_for(slots.acquire("healthy"), 1)  # the slot it cannot take
    assert (slots.in_flight, slots.held_by("hung"), slots.held_by("healthy")) == (2, 1, 1)
    slots.release("healthy")
    await asyncio.sleep(0)
    assert not blocked.done()  # still its own share that is full, not the total
    slots.release("hung")
    await asyncio.wait_for(blocked, 1)
    assert slots.held_by("hung") == 1


async def test_a_waiter_held_by_its_share_does_not_block_a_later_one_to_another_listener(
        ) -> None:
    slots = SendSlots(4)  # 3 per listener
    for _ in range(3):
        await slots.acquire("a")
    waiting_a = asyncio.ensure_future(slots.acquire("a"))
    await asyncio.sleep(0)
    # A slot is free, and "a" may not take it: "b", arriving later, gets it at once.
    await asyncio.wait_for(slots.acquire("b"), 1)
    assert not waiting_a.done()
    slots.release("a")
    await asyncio.wait_for(waiting_a, 1)


async def test_waiters_go_oldest_first() -> None:
    slots = SendSlots(1)
    await slots.acquire("x")
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.acquire(name)
        order.append(name)

    waiters = [asyncio.ensure_future(wait(name)) for name in ("p", "q", "r")]
    for _ in range(3):
        await asyncio.sleep(0)
        slots.release(order[-1] if order else "x")
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert order == ["p", "q", "r"]


async def test_a_wait_cut_by_a_timeout_leaks_no_slot() -> None:
    slots = SendSlots(2)
    await slots.acquire("a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await slots.acquire("a")
    slots.release("a")
    assert (slots.in_flight, slots.held_by("a")) == (0, 0)
    await asyncio.wait_for(slots.acquire("a"), 1)  # the timed-out waiter holds nothing


async def test_a_grant_in_the_same_moment_as_a_cancel_is_given_back() -> None:
    slots = SendSlots(1)
    await slots.acquire("a")
    waiter = asyncio.ensure_future(slots.acquire("b"))
    await asyncio.sleep(0)
    slots.release("a")  # grants "b" (its future is resolved) ...
    waiter.cancel()  # ... and its task is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.in_flight == 0
    await asyncio.wait_for(slots.acquire("c"), 1)


def test_releasing_what_is_not_held_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="without a held slot"):
        SendSlots(2).release("a")


async def test_many_senders_never_exceed_either_limit() -> None:
    """400 sends to 5 listeners (one hogging most of them) through 8 slots: every one goes, and
    at no time are more than 8 in flight or more than 6 to one listener."""
    slots = SendSlots(8)
    rng = random.Random(7)
    listeners = ["hog"] * 300 + ["l1", "l2", "l3", "l4"] * 25
    rng.shuffle(listeners)
    peak_total = 0
    peak_one = 0
    done = 0

    async def send(listener: str) -> None:
        nonlocal peak_total, peak_one, done
        await slots.acquire(listener)
        try:
            peak_total = max(peak_total, slots.in_flight)
            peak_one = max(peak_one, slots.held_by(listener))
            await asyncio.sleep(rng.random() / 1000)
        finally:
            slots.release(listener)
        done += 1

    await asyncio.wait_for(asyncio.gather(*(send(name) for name in listeners)), 30)
    assert (done, peak_total, peak_one, slots.in_flight) == (400, 8, 6, 0)
