"""Reward types in PostgreSQL."""

from __future__ import annotations

import asyncpg

from core.catalogue.reward_types import RewardCategory, RewardType
from core.errors import AlreadyExists, NotFound

_COLUMNS = ("name, display_name, description, image_url, category, min_value, max_value, "
            "create_time, update_time")


def _from_row(row: asyncpg.Record) -> RewardType:
    return RewardType(
        name=row["name"], display_name=row["display_name"], description=row["description"],
        image_url=row["image_url"], category=RewardCategory(row["category"]),
        min_value=row["min_value"], max_value=row["max_value"],
        create_time=row["create_time"], update_time=row["update_time"])


async def insert(conn: asyncpg.Connection, reward_type: RewardType) -> RewardType:
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO reward_types (name, display_name, description, image_url, category,
                                          min_value, max_value)
                VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}""",
            reward_type.name, reward_type.display_name, reward_type.description,
            reward_type.image_url, reward_type.category.value, reward_type.min_value,
            reward_type.max_value)
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"a reward type named {reward_type.name!r} already exists",
                            reason="REWARD_TYPE_EXISTS",
                            metadata={"name": reward_type.name}) from exc
    assert row is not None
    return _from_row(row)


async def get(conn: asyncpg.Connection, name: str, *, for_update: bool = False) -> RewardType:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM reward_types WHERE name = $1{lock}", name)
    if row is None:
        raise NotFound(f"no reward type named {name!r}", reason="REWARD_TYPE_NOT_FOUND",
                       metadata={"name": name})
    return _from_row(row)


async def get_many(conn: asyncpg.Connection, names: list[str]) -> dict[str, RewardType]:
    """The reward types among ``names`` that exist, by name, in one query."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM reward_types WHERE name = ANY($1::text[])",
                            names)
    return {row["name"]: _from_row(row) for row in rows}


async def update(conn: asyncpg.Connection, reward_type: RewardType) -> RewardType:
    row = await conn.fetchrow(
        f"""UPDATE reward_types SET display_name = $2, description = $3, image_url = $4,
                   category = $5, min_value = $6, max_value = $7, update_time = now()
             WHERE name = $1 RETURNING {_COLUMNS}""",
        reward_type.name, reward_type.display_name, reward_type.description,
        reward_type.image_url, reward_type.category.value, reward_type.min_value,
        reward_type.max_value)
    if row is None:
        raise NotFound(f"no reward type named {reward_type.name!r}",
                       reason="REWARD_TYPE_NOT_FOUND", metadata={"name": reward_type.name})
    # Every server caches a promotion with its reward types (server/promotion_cache.py) and a
    # grant is refused as STALE only when the promotion's version moved: bump the versions of
    # the promotions paying this type, so a lowered maximum applies to the very next grant on
    # every server, not after the cache's TTL.
    await conn.execute(
        """UPDATE promotions SET version = version + 1
            WHERE rewards @> jsonb_build_array(jsonb_build_object('reward_type', $1::text))""",
        reward_type.name)
    return _from_row(row)


async def list_page(conn: asyncpg.Connection, *, after_name: str | None,
                    limit: int) -> list[RewardType]:
    """Up to ``limit`` reward types ordered by name, strictly after ``after_name``."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM reward_types
             WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2""",
        after_name, limit)
    return [_from_row(row) for row in rows]
