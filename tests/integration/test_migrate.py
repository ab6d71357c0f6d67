"""Migrations: concurrent starts do not race, an edited applied file is reported."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from storage import migrate as migrate_module
from storage.migrate import Migration, MigrationError, load_migrations, migrate
from tests.conftest import Services, with_database


@pytest.fixture
async def empty_database(services: Services) -> AsyncIterator[str]:
    name = f"promo_m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        yield with_database(services.database_url, name)
    finally:
        admin = await asyncpg.connect(services.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_concurrent_migrations_apply_each_file_once(empty_database: str) -> None:
    conns = [await asyncpg.connect(empty_database) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    versions = [m.version for m in load_migrations()]
    applied = sorted(v for r in results for v in r)
    assert applied == versions  # every migration applied exactly once, by one of them
    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == versions
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_edited_applied_migration_is_reported(empty_database: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await migrate(conn)
        original = load_migrations()
        edited = [Migration(m.version, m.name, m.sql + "\n-- edited") if m.version == 1 else m
                  for m in original]
        monkeypatch.setattr(migrate_module, "load_migrations", lambda: edited)
        with pytest.raises(MigrationError, match="was changed after it was applied"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_and_is_not_recorded(
        empty_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [*load_migrations(), Migration(9999, "broken",
                                            "CREATE TABLE half (id int); SELECT 1/0;")]
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: broken)
    conn = await asyncpg.connect(empty_database)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE version = 9999") == 0
    finally:
        await conn.close()
