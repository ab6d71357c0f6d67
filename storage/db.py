"""The asyncpg connection pool and its per-connection setup."""

from __future__ import annotations

import json

import asyncpg


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns travel as Python objects, not strings.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                      command_timeout: float = 30.0) -> asyncpg.Pool:
    """Create the pool inside the running event loop (asyncpg pools are loop-bound)."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
        init=_init_connection, server_settings={"application_name": "promo", "timezone": "UTC"},
    )
    assert pool is not None
    return pool
