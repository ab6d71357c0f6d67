"""Databases at an old schema version, for the upgrade tests: the migrations applied up to a
version and recorded as storage/migrate.py records them, so the real migrate then upgrades them
(tests/integration/test_upgrade_audit.py, tests/e2e/test_session12_review.py). The fixture
``database_at`` (tests/conftest.py) makes such databases."""

from __future__ import annotations

import asyncpg

from storage.migrate import load_migrations


async def apply_migrations_up_to(conn: asyncpg.Connection, version: int) -> None:
    """Apply migrations 0001..``version`` and record them as storage/migrate.py does (same
    table, same name and checksum), each file in its own transaction."""
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())""")
    for migration in load_migrations():
        if migration.version > version:
            break
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version, migration.name, migration.checksum)
