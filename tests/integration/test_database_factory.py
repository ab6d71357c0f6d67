"""tests/database_factory.py: every test's database is a fresh clone, and none is left behind."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.conftest import Services, with_database
from tests.database_factory import DatabaseFactory


async def _databases(services: Services, prefix: str) -> set[str]:
    admin = await asyncpg.connect(services.database_url)
    try:
        return {r["datname"] for r in await admin.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix)}
    finally:
        await admin.close()


async def test_clones_are_fresh_distinct_and_all_dropped(services: Services,
                                                         template_database: str) -> None:
    prefix = f"promo_tf_{uuid.uuid4().hex[:8]}_"  # this test's clones only (xdist runs others)
    factory = DatabaseFactory(services.database_url, template_database, ahead=2, prefix=prefix)
    try:
        first, second = factory.take(), factory.take()
        assert first != second and first.startswith(prefix) and second.startswith(prefix)
        conn = await asyncpg.connect(with_database(services.database_url, first))
        try:
            await conn.execute("INSERT INTO customers (customer_id, create_time, update_time) "
                               "VALUES ('written', now(), now())")
        finally:
            await conn.close()
        conn = await asyncpg.connect(with_database(services.database_url, second))
        try:  # a clone of the template, untouched by the first test's writes
            assert await conn.fetchval("SELECT count(*) FROM customers") == 0
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") > 0
        finally:
            await conn.close()
        factory.give_back(first)
        factory.give_back(second)
        late = factory.take()
    finally:
        factory.close()
    # The two given back and the ones made ahead and never taken: all dropped.
    assert await _databases(services, prefix) == {late}
    factory.give_back(late)  # after the thread finished (a test still running at the end)
    assert await _databases(services, prefix) == set()


async def test_a_clone_that_cannot_be_made_fails_the_test_that_asks_with_the_reason(
        services: Services) -> None:
    factory = DatabaseFactory(services.database_url, "promo_no_such_template", ahead=1)
    try:
        with pytest.raises(RuntimeError, match="cloning a test database failed") as failed:
            factory.take()
        assert isinstance(failed.value.__cause__, asyncpg.InvalidCatalogNameError)
        with pytest.raises(RuntimeError, match="cloning a test database failed"):
            factory.take()  # every later test is told why, too
    finally:
        factory.close()
