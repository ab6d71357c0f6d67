"""Versioned SQL migrations, applied in order under an advisory lock.

Why a lock: several servers and workers may start at once against one database; the advisory
lock makes them queue, and each sees the migrations the first one applied. Each file runs in its
own transaction and is recorded with a checksum, so an edited, already-applied file is reported
instead of silently diverging.

Why a lock timeout: a migration's table lock (ALTER TABLE, CREATE INDEX) waiting behind one long
transaction would make every later statement on that table queue behind it, for as long as that
transaction lasts: the service would stall on the upgrade. Each file therefore waits at most
LOCK_TIMEOUT for any one lock; if it cannot get it, its transaction is rolled back (the service's
statements go ahead) and the file is tried again after a backoff, for up to LOCK_RETRY_SECONDS.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("promo.migrate")

# Any fixed 64-bit number; it only has to be the same in every process of this service.
MIGRATION_LOCK_ID = 0x70726F6D6F5F6D67  # "promo_mg"
APPLICATION_NAME = "promo-migrate"  # of migrate_dsn's connection, in pg_stat_activity
FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_TIMEOUT = "1s"  # PostgreSQL's lock_timeout for each migration's statements
LOCK_RETRY_SECONDS = 300.0  # how long a migration keeps trying to get its locks


class MigrationError(RuntimeError):
    """A migration cannot be applied, or the database has diverged from the files."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Read storage/migrations/NNNN_name.sql in version order."""
    found: list[Migration] = []
    for entry in resources.files("storage.migrations").iterdir():
        match = FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {row["version"]: row for row in rows}
        for migration in load_migrations():
            previous = done.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name}.sql was changed "
                        "after it was applied; add a new migration instead of editing it")
                continue
            await _apply(conn, migration)
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    """One file in its own transaction, its locks waited for at most LOCK_TIMEOUT at a time
    (see the module's docstring), tried again with a backoff of 0.5 to 8 s."""
    give_up = time.monotonic() + LOCK_RETRY_SECONDS
    backoff = 0.5
    while True:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum)
            return
        except asyncpg.LockNotAvailableError as exc:
            if time.monotonic() + backoff > give_up:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name}.sql could not take its "
                    f"table locks for {LOCK_RETRY_SECONDS:.0f} s: a long transaction holds them "
                    "(see pg_stat_activity and pg_locks); end it, then start again") from exc
            log.warning("migration %04d_%s waits for a lock a long transaction holds; trying "
                        "again in %.1f s", migration.version, migration.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 8.0)


async def migrate_dsn(dsn: str) -> list[int]:
    """Migrate on a connection of its own, without a command timeout: what `promo migrate`
    and every process started with PROMO_MIGRATE_ON_START use.

    Why not a pool connection: the pool's PROMO_DB_COMMAND_TIMEOUT_SECONDS (30 s) would also
    bound the wait for the advisory lock and each migration, so a process starting while
    another applies a slow migration (or a migration taking over 30 s) would fail to start.
    Its application_name shows a process waiting for the lock in pg_stat_activity."""
    conn = await asyncpg.connect(dsn, command_timeout=None,
                                 server_settings={"application_name": APPLICATION_NAME})
    try:
        return await migrate(conn)
    finally:
        await conn.close()
