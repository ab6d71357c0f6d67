"""Admission control: a bound on the calls one server process holds at once.

Why: without it, a server whose database stalls takes in every call it is sent and parks each
one (memory grows with the backlog, and every caller waits out its deadline), and a burst larger
than gRPC core's pending-call queue is dropped by the core as CANCELLED, a status no retry policy
treats as retryable and that the service never logged. With it, a call beyond
``PROMO_MAX_CALLS_IN_FLIGHT`` is refused at once with RESOURCE_EXHAUSTED ``SERVER_OVERLOADED``
(logged and counted like every other call), so callers back off and retry while the calls
already taken in finish. The core's pending queue is made large enough (``core_options``) that
the refusal, not the core's silent drop, is what a burst meets.

Health checks and reflection are not counted: a load balancer must still see the server.
"""

from __future__ import annotations

import logging
import time

from core.errors import ResourceExhausted

log = logging.getLogger("promo.server")

# Calls gRPC core may hold before the Python server has taken them, per in-flight call allowed.
# The accept loop takes calls far faster than they are served, so this queue only fills in a
# burst; above its limit the core cancels calls without telling the application.
CORE_PENDING_PER_CALL = 20
# ... and never fewer than this: beyond the core's queue, calls of a burst wait unseen and end
# CANCELLED (measured: a hard limit of 3,000 held back 998 calls of a burst of 4,000).
CORE_PENDING_MIN = 20_000
# One warning per this many seconds while calls are refused, with how many were.
WARNING_INTERVAL_SECONDS = 10.0


def core_options(max_calls_in_flight: int) -> list[tuple[str, int]]:
    """gRPC core channel arguments that let a burst reach admission control instead of being
    cancelled by the core (defaults: 1,000 pending calls, hard limit 3,000)."""
    pending = max(max_calls_in_flight * CORE_PENDING_PER_CALL, CORE_PENDING_MIN)
    return [("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending)]


class Admission:
    """Counts the calls in flight; ``admit`` refuses one beyond the limit."""

    def __init__(self, max_calls_in_flight: int) -> None:
        self.limit = max_calls_in_flight
        self.in_flight = 0
        self.refused_total = 0
        self._refused_since_warning = 0
        self._last_warning = float("-inf")

    def admit(self) -> None:
        """Take one call in, or raise ResourceExhausted SERVER_OVERLOADED. A caller that was
        admitted must call ``release`` exactly once."""
        if self.in_flight >= self.limit:
            self.refused_total += 1
            self._refused_since_warning += 1
            now = time.monotonic()
            if now - self._last_warning >= WARNING_INTERVAL_SECONDS:
                log.warning("calls refused: the server is at its limit of calls in flight",
                            extra={"refused": self._refused_since_warning,
                                   "max_calls_in_flight": self.limit})
                self._last_warning = now
                self._refused_since_warning = 0
            raise ResourceExhausted(
                f"the server is at its limit of {self.limit} calls in flight; retry with "
                "backoff (a retry with the same request_id never applies a change twice)",
                reason="SERVER_OVERLOADED",
                metadata={"max_calls_in_flight": str(self.limit)})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
