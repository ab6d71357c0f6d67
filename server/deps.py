"""What the servicers need from the outside world, created by the caller inside its loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from config.settings import Settings
from core.clock import Clock, SystemClock
from core.secret_box import SecretBox


@dataclass
class Dependencies:
    pool: asyncpg.Pool
    clock: Clock = field(default_factory=SystemClock)
    # An arq Redis pool for queueing outbox jobs right after commit (None: the sweeper does it).
    redis: Any = None
    queue_name: str = "promo:queue"
    # Filled in by start_server from the settings it was given.
    settings: Settings | None = None
    # Seals listener secrets before they are stored (no keys: they are stored in clear).
    secret_box: SecretBox = field(default_factory=lambda: SecretBox([]))
