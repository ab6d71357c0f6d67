"""The send slots of one worker process: at most ``total`` webhook POSTs or e-mails in flight,
and at most ``per_listener`` of them to any one listener (the caller's key: a webhook
listener's host, so that several listeners on one hung host share one share; an e-mail
listener itself, as every e-mail goes to the same relay).

Why a share per listener: with one plain semaphore, a listener that hangs (accepts the
connection, never answers) ends up holding every slot with its own deliveries, and every other
listener's deliveries wait for those sends' timeouts. Keeping a quarter of the slots (at least
one) out of any single listener's reach means a hung listener slows the others down (they share
what is left) but never stops them; a single busy listener still gets three quarters of the
worker's concurrency. With one slot in all there is nothing to share and the single slot is
everyone's.

Waiters are served in arrival order among those allowed to go: a delivery waiting for its own
listener's share does not hold back a later one to another listener.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable


def listener_share(total: int) -> int:
    """How many of ``total`` slots one listener may hold: three quarters, rounded down, and at
    least one (from two slots up that leaves at least one for the others); the only one of
    one."""
    if total < 2:
        return total
    return max(1, total * 3 // 4)


class SendSlots:
    """A counting semaphore with a per-key limit (the key is the listener). ``acquire`` may be
    cancelled (e.g. by a timeout) at any point without leaking a slot."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"send slots must be at least 1, not {total}")
        self.total = total
        self.per_listener = listener_share(total)
        self._in_flight = 0
        self._held: dict[Hashable, int] = {}
        self._waiters: deque[tuple[Hashable, asyncio.Future[None]]] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def held_by(self, listener: Hashable) -> int:
        return self._held.get(listener, 0)

    def _allowed(self, listener: Hashable) -> bool:
        return self._in_flight < self.total and self._held.get(listener, 0) < self.per_listener

    def _take(self, listener: Hashable) -> None:
        self._in_flight += 1
        self._held[listener] = self._held.get(listener, 0) + 1

    async def acquire(self, listener: Hashable) -> None:
        """Wait for a slot that ``listener`` may use, then hold it (release it with
        ``release``)."""
        if not self._waiters and self._allowed(listener):
            self._take(listener)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((listener, waiter))
        # The older waiters may all be held back by their own listener's share: then this one
        # goes now, if it may.
        self._wake()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted in the same moment the wait was cancelled: give it back.
                self.release(listener)
            raise

    def release(self, listener: Hashable) -> None:
        """Give back a slot ``listener`` held, and hand free slots to the waiters allowed to
        take them, oldest first."""
        held = self._held.get(listener, 0)
        if held <= 0 or self._in_flight <= 0:
            raise RuntimeError(f"release without a held slot for listener {listener!r}")
        self._in_flight -= 1
        if held == 1:
            del self._held[listener]
        else:
            self._held[listener] = held - 1
        self._wake()

    def _wake(self) -> None:
        if not self._waiters or self._in_flight >= self.total:
            return
        kept: deque[tuple[Hashable, asyncio.Future[None]]] = deque()
        while self._waiters:
            listener, waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting: forget it
                continue
            if self._in_flight < self.total and self._allowed(listener):
                self._take(listener)
                waiter.set_result(None)
            else:
                kept.append((listener, waiter))
        self._waiters = kept
