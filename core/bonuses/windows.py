"""Batching windows: requests pile up and are computed together once their window closes.

A window of ``seconds`` starts at ``floor(epoch(now) / seconds) * seconds`` (UTC), so every
server and worker assigns the same window to the same instant without coordination; the batch
is due when the window ends. The vendor's default is 5 minutes ("all calculations are batched by
5-minute intervals"); a deployment and each definition may choose another length.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.errors import InvalidArgument

MIN_WINDOW_SECONDS = 1
MAX_WINDOW_SECONDS = 86_400
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_window_seconds(seconds: int, *, field: str = "batch_window_seconds") -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not (
            MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS):
        raise InvalidArgument(
            f"{field} must be between {MIN_WINDOW_SECONDS} and {MAX_WINDOW_SECONDS} seconds, "
            f"got {seconds!r}", reason="INVALID_BATCH_WINDOW", metadata={"field": field})
    return seconds


def window_start(now: datetime, seconds: int) -> datetime:
    """The start of the window ``now`` falls in (UTC)."""
    if now.tzinfo is None:
        raise ValueError("window_start needs a timezone-aware datetime")
    check_window_seconds(seconds)
    elapsed = now - _EPOCH
    micros = (elapsed.days * 86_400 + elapsed.seconds) * 1_000_000 + elapsed.microseconds
    step = seconds * 1_000_000
    return _EPOCH + timedelta(microseconds=(micros // step) * step)


def window_end(start: datetime, seconds: int) -> datetime:
    """When the window's batch is due."""
    return start + timedelta(seconds=seconds)
