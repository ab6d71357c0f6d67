"""Shared fixtures: real PostgreSQL and Redis, an isolated database per test, a real server.

Services: PROMO_TEST_DATABASE_URL / PROMO_TEST_REDIS_URL when set (CI points them at the
machine's services); otherwise embedded PostgreSQL and Redis are started for the session.
Isolation: each session (each xdist worker) migrates a template database once; each test gets
its own clone (CREATE DATABASE ... TEMPLATE, made a few tests ahead on a thread:
tests/database_factory.py) and its own arq queue name, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import redis as redis_sync
from arq.connections import ArqRedis, RedisSettings
from arq.connections import create_pool as create_arq_pool
from grpc import aio

from config.settings import ApiKeyConfig, Settings
from core.clock import FixedClock
from storage.db import create_pool
from storage.migrate import migrate
from tests.database_factory import DatabaseFactory
from tests.migration_helpers import apply_migrations_up_to
from tests.webhook_listener import WebhookListener

ADMIN_KEY = "test-admin-key-0123456789"
RUNTIME_KEY = "test-runtime-key-0123456789"
LISTENER_KEY = "test-listener-key-0123456789"
TEST_API_KEYS = [
    ApiKeyConfig(name="test-admin", key=ADMIN_KEY, roles=["admin"]),
    ApiKeyConfig(name="test-runtime", key=RUNTIME_KEY, roles=["runtime"]),
    ApiKeyConfig(name="test-listener", key=LISTENER_KEY, roles=["listener"]),
]


@dataclass(frozen=True)
class Services:
    database_url: str  # the maintenance database (used to create and drop test databases)
    redis_url: str


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def open_for_embedded_user(folder: Path) -> None:
    """The embedded PostgreSQL may run as another (unprivileged) user: let it reach ``folder``
    by opening the test's own temporary folders (up to the system temp folder) for traversal."""
    system_tmp = Path(tempfile.gettempdir()).resolve()
    for path in (folder.resolve(), *folder.resolve().parents):
        if path == system_tmp or system_tmp not in path.parents:
            break
        path.chmod(path.stat().st_mode | 0o055)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    database_url = os.environ.get("PROMO_TEST_DATABASE_URL")
    redis_url = os.environ.get("PROMO_TEST_REDIS_URL")
    started: list[object] = []
    if not database_url or not redis_url:
        from cli.embedded import EmbeddedPostgres, EmbeddedRedis

        data_dir = Path(tmp_path_factory.mktemp("embedded-services"))
        open_for_embedded_user(data_dir)
        if not database_url:
            postgres = EmbeddedPostgres(data_dir,
                                        run_as_user=os.environ.get("PROMO_EMBEDDED_PG_USER"))
            database_url = postgres.start()
            started.append(postgres)
        if not redis_url:
            embedded_redis = EmbeddedRedis(data_dir)
            redis_url = embedded_redis.start()
            started.append(embedded_redis)
    try:
        yield Services(database_url=database_url, redis_url=redis_url)
    finally:
        for service in reversed(started):
            service.stop()  # type: ignore[attr-defined]


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    """A freshly migrated database that every test's database is cloned from."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"promo_tpl_{worker}_{os.getpid()}"

    async def create() -> None:
        admin = await _admin(services.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(with_database(services.database_url, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await _admin(services.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    try:
        yield name
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def database_factory(services: Services, template_database: str) -> Iterator[DatabaseFactory]:
    """Clones of the template made a few tests ahead (tests/database_factory.py says why)."""
    factory = DatabaseFactory(services.database_url, template_database)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def database_url(services: Services, database_factory: DatabaseFactory) -> Iterator[str]:
    """A database of this test's own, cloned from the migrated template, dropped afterwards."""
    name = database_factory.take()
    try:
        yield with_database(services.database_url, name)
    finally:
        database_factory.give_back(name)


@pytest.fixture
def queue_name(services: Services) -> Iterator[str]:
    """An arq queue of this test's own; its Redis keys are deleted afterwards."""
    name = f"promo:test:{uuid.uuid4().hex[:12]}"
    yield name
    client = redis_sync.Redis.from_url(services.redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{name}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings(database_url: str, services: Services, queue_name: str) -> Settings:
    return Settings(database_url=database_url, redis_url=services.redis_url, grpc_port=0,
                    api_keys=TEST_API_KEYS, queue_name=queue_name, migrate_on_start=False,
                    db_pool_min_size=1, db_pool_max_size=10, shutdown_grace_seconds=2,
                    sweeper_interval_seconds=1, job_retry_base_seconds=0.05,
                    job_retry_max_seconds=0.5, webhook_retry_max_seconds=0.5,
                    log_format="text")


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url is not None
    db_pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    try:
        yield db_pool
    finally:
        await db_pool.close()


@dataclass
class Api:
    """A real server on a free port and a real channel to it."""

    channel: aio.Channel
    address: str

    @staticmethod
    def key(role: str = "admin") -> tuple[tuple[str, str], ...]:
        key = {"admin": ADMIN_KEY, "runtime": RUNTIME_KEY, "listener": LISTENER_KEY}[role]
        return (("x-api-key", key),)


@pytest.fixture
def clock() -> FixedClock:
    """The time every server in a test sees; tests move it instead of sleeping."""
    return FixedClock(datetime(2026, 11, 22, 10, 0, tzinfo=UTC))


@contextlib.asynccontextmanager
async def serving_api(settings: Settings, pool: asyncpg.Pool,
                      clock: FixedClock) -> AsyncIterator[Api]:
    """A real server with these settings (e.g. other API keys, an SMTP relay) and a channel."""
    from server.app import Dependencies, start_server

    running = await start_server(settings, Dependencies(pool=pool, clock=clock))
    channel = aio.insecure_channel(running.address)
    await asyncio.wait_for(channel.channel_ready(), timeout=5)
    try:
        yield Api(channel=channel, address=running.address)
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture
async def api(settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> AsyncIterator[Api]:
    async with serving_api(settings, pool, clock) as running:
        yield running


@pytest.fixture
async def second_server(settings: Settings, clock: FixedClock) -> AsyncIterator[Api]:
    """Another server on the same database with its own pool, promotion cache and grant
    batcher, as a second process has: for races across processes."""
    assert settings.database_url
    db_pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    try:
        async with serving_api(settings, db_pool, clock) as running:
            yield running
    finally:
        await db_pool.close()


def rpc_error_reason(exc: grpc.RpcError) -> str | None:
    from server.errors import error_info_of

    info = error_info_of(exc)
    return info.reason if info is not None else None


@pytest.fixture
async def arq_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """An arq pool on the test Redis, for tests that queue jobs themselves."""
    assert settings.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def listener(clock: FixedClock) -> AsyncIterator[WebhookListener]:
    """A real signed-webhook receiver on loopback whose signature check uses the pinned clock."""
    server = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def database_at(services: Services) -> AsyncIterator[Callable[[int], Awaitable[str]]]:
    """``await database_at(n)``: the URL of a new database migrated up to version n (dropped
    after the test, WITH (FORCE))."""
    made: list[str] = []

    async def make(version: int) -> str:
        name = f"promo_up_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(services.database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        made.append(name)
        url = with_database(services.database_url, name)
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations_up_to(conn, version)
        finally:
            await conn.close()
        return url

    yield make
    admin = await asyncpg.connect(services.database_url)
    try:
        for name in made:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
