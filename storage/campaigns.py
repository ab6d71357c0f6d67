"""Campaigns, target groups and approvals in PostgreSQL.

Target groups can hold millions of customers: they are added in chunks with one statement per
chunk (unnest), paged by customer id, and approvals are applied per call of up to 10,000 with
one UPDATE ... FROM unnest. Approvals and execution serialize on the campaign row: approvals
take it FOR SHARE, execution FOR UPDATE, so no approval lands after the campaign executed.

Approvals only share the campaign row, so several may run at once over the same customers:
every bulk write to campaign_targets therefore takes its row locks in customer id order (never
the caller's order), or two calls listing the same customers in opposite orders would each hold
a row the other waits for and PostgreSQL would abort one of them as a deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from core.campaigns import (
    CampaignSpec,
    CampaignStatus,
    campaign_not_found,
    check_campaign_id_lookup,
)
from core.errors import AlreadyExists


@dataclass(frozen=True)
class CampaignRow:
    id: int
    campaign_id: str
    name: str
    execute_at: datetime
    conditional: bool
    status: CampaignStatus
    target_count: int
    approved_count: int | None
    rejected_count: int | None
    notified_at: datetime | None
    executed_at: datetime | None
    cancelled_at: datetime | None
    create_time: datetime
    promotion_codes: tuple[str, ...]


_SELECT = """SELECT c.*, coalesce((SELECT array_agg(p.code ORDER BY cp.position)
                               FROM campaign_promotions cp JOIN promotions p
                                 ON p.id = cp.promotion_id
                              WHERE cp.campaign_id = c.id), '{}') AS promotion_codes
               FROM campaigns c"""


def _from_row(row: asyncpg.Record) -> CampaignRow:
    return CampaignRow(
        id=row["id"], campaign_id=row["campaign_id"], name=row["name"],
        execute_at=row["execute_at"], conditional=row["conditional"],
        status=CampaignStatus(row["status"]), target_count=row["target_count"],
        approved_count=row["approved_count"], rejected_count=row["rejected_count"],
        notified_at=row["notified_at"], executed_at=row["executed_at"],
        cancelled_at=row["cancelled_at"], create_time=row["create_time"],
        promotion_codes=tuple(row["promotion_codes"]))


async def insert(conn: asyncpg.Connection, spec: CampaignSpec,
                 promotion_ids: Sequence[int]) -> CampaignRow:
    try:
        campaign_pk = await conn.fetchval(
            """INSERT INTO campaigns (campaign_id, name, execute_at, conditional, status)
               VALUES ($1, $2, $3, $4, 'SCHEDULED') RETURNING id""",
            spec.campaign_id, spec.name, spec.execute_at, spec.conditional)
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"a campaign {spec.campaign_id!r} already exists",
                            reason="CAMPAIGN_EXISTS",
                            metadata={"campaign_id": spec.campaign_id}) from exc
    await conn.execute(
        """INSERT INTO campaign_promotions (campaign_id, promotion_id, position)
           SELECT $1, p, ord FROM unnest($2::bigint[]) WITH ORDINALITY AS t(p, ord)""",
        campaign_pk, list(promotion_ids))
    return await get(conn, spec.campaign_id)


async def get(conn: asyncpg.Connection, campaign_id: str, *, lock: str = "") -> CampaignRow:
    """``lock``: "" or "FOR SHARE" / "FOR UPDATE" (of the campaign row only). An id no campaign
    can have is NOT_FOUND without a query (check_campaign_id_lookup)."""
    check_campaign_id_lookup(campaign_id)
    if lock:
        locked = await conn.fetchval(
            f"SELECT id FROM campaigns WHERE campaign_id = $1 {lock}", campaign_id)
        if locked is None:
            raise campaign_not_found(campaign_id)
    row = await conn.fetchrow(f"{_SELECT} WHERE c.campaign_id = $1", campaign_id)
    if row is None:
        raise campaign_not_found(campaign_id)
    return _from_row(row)


async def get_by_pk(conn: asyncpg.Connection, pk: int, *, lock: str = "") -> CampaignRow | None:
    if lock:
        await conn.execute(f"SELECT id FROM campaigns WHERE id = $1 {lock}", pk)
    row = await conn.fetchrow(f"{_SELECT} WHERE c.id = $1", pk)
    return _from_row(row) if row is not None else None


async def list_page(conn: asyncpg.Connection, *, after: str | None, limit: int,
                    statuses: Sequence[str]) -> list[CampaignRow]:
    rows = await conn.fetch(
        f"""{_SELECT} WHERE ($1::text IS NULL OR c.campaign_id > $1)
               AND (cardinality($2::text[]) = 0 OR c.status = ANY($2))
             ORDER BY c.campaign_id LIMIT $3""", after, list(statuses), limit)
    return [_from_row(r) for r in rows]


async def add_targets(conn: asyncpg.Connection, campaign_pk: int,
                      customer_ids: Sequence[str]) -> int:
    """Add customers (duplicates ignored); returns how many were new. Inserted in customer id
    order, so the unique index's locks are taken in the same order as every other writer's."""
    added: int = await conn.fetchval(
        """WITH ins AS (
               INSERT INTO campaign_targets (campaign_id, customer_id)
               SELECT $1, c FROM unnest($2::text[]) AS c ORDER BY c
               ON CONFLICT DO NOTHING RETURNING 1)
           SELECT count(*) FROM ins""", campaign_pk, sorted(set(customer_ids)))
    await conn.execute(
        "UPDATE campaigns SET target_count = target_count + $2, update_time = now() "
        "WHERE id = $1", campaign_pk, added)
    return added


async def targets_page(conn: asyncpg.Connection, campaign_pk: int, *, after: str | None,
                       limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT customer_id, approved FROM campaign_targets
            WHERE campaign_id = $1 AND ($2::text IS NULL OR customer_id > $2)
            ORDER BY customer_id LIMIT $3""", campaign_pk, after, limit)


async def set_statuses(conn: asyncpg.Connection, campaign_pk: int, customer_ids: Sequence[str],
                       approved: Sequence[bool], now: datetime) -> list[str]:
    """Apply approvals; returns the customer ids that are not in the target group, in the
    order given. A customer given twice (with the same status: the server refuses a call that
    contradicts itself, core.campaigns.check_statuses_agree) is applied once.

    The target rows are locked first, in customer id order (SELECT ... ORDER BY ... FOR
    UPDATE: the lock step runs on the sorted rows), then updated; an UPDATE ... FROM alone
    locks in whatever order its plan visits the rows, which for a nested loop over the input is
    the caller's order. Must run inside a transaction (the locks are held until it ends)."""
    last: dict[str, bool] = {}
    for customer_id, flag in zip(customer_ids, approved, strict=True):
        last[customer_id] = flag
    ordered = sorted(last)
    found = {r["customer_id"] for r in await conn.fetch(
        """SELECT customer_id FROM campaign_targets
            WHERE campaign_id = $1 AND customer_id = ANY($2::text[])
            ORDER BY customer_id FOR UPDATE""", campaign_pk, ordered)}
    await conn.execute(
        """UPDATE campaign_targets t SET approved = s.approved, status_time = $4
             FROM unnest($2::text[], $3::boolean[]) AS s(customer_id, approved)
            WHERE t.campaign_id = $1 AND t.customer_id = s.customer_id""",
        campaign_pk, ordered, [last[c] for c in ordered], now)
    return [c for c in last if c not in found]


async def set_status(conn: asyncpg.Connection, campaign_pk: int, status: CampaignStatus, *,
                     now: datetime) -> None:
    column = {CampaignStatus.AWAITING_CLEARANCE: "notified_at",
              CampaignStatus.EXECUTED: "executed_at",
              CampaignStatus.CANCELLED: "cancelled_at"}[status]
    await conn.execute(
        f"UPDATE campaigns SET status = $2, {column} = $3, update_time = now() WHERE id = $1",
        campaign_pk, status.value, now)


async def execute(conn: asyncpg.Connection, campaign_pk: int, now: datetime) -> tuple[int, int]:
    """Mark executed with its approved/rejected counts (non-conditional: everyone approved)."""
    row = await conn.fetchrow(
        """UPDATE campaigns c SET status = 'EXECUTED', executed_at = $2, update_time = now(),
                  approved_count = CASE WHEN c.conditional THEN
                      (SELECT count(*) FROM campaign_targets t
                        WHERE t.campaign_id = c.id AND t.approved) ELSE c.target_count END,
                  rejected_count = CASE WHEN c.conditional THEN
                      (SELECT count(*) FROM campaign_targets t
                        WHERE t.campaign_id = c.id AND t.approved IS NOT TRUE) ELSE 0 END
            WHERE c.id = $1 RETURNING approved_count, rejected_count""", campaign_pk, now)
    assert row is not None
    return row["approved_count"], row["rejected_count"]


async def eligibility(conn: asyncpg.Connection, campaign_id: str, promotion_id: int,
                      customer_id: str) -> str | None:
    """For GetReward with a campaign id: None when the id names no campaign of ours (it is then
    only a grouping key), else ELIGIBLE or a reason the customer is not."""
    row = await conn.fetchrow(
        """SELECT c.status, c.conditional,
                  EXISTS (SELECT 1 FROM campaign_promotions cp
                           WHERE cp.campaign_id = c.id AND cp.promotion_id = $2) AS has_promotion,
                  t.customer_id IS NOT NULL AS targeted, t.approved
             FROM campaigns c
             LEFT JOIN campaign_targets t ON t.campaign_id = c.id AND t.customer_id = $3
            WHERE c.campaign_id = $1""", campaign_id, promotion_id, customer_id)
    if row is None:
        return None
    if row["status"] != "EXECUTED":
        return f"campaign {campaign_id} is {row['status']}, not executed"
    if not row["has_promotion"]:
        return f"campaign {campaign_id} does not target this promotion"
    if not row["targeted"]:
        return f"customer is not in the target group of campaign {campaign_id}"
    if row["conditional"] and not row["approved"]:
        return f"customer was not approved for campaign {campaign_id}"
    return "ELIGIBLE"


@dataclass(frozen=True)
class PromotionReconciliation:
    """One promotion of a campaign: who may receive it, its grants, and the value still live.

    ``amounts``: (reward type, value of the live grants) sorted by reward type, for every
    reward type the promotion grants today or that one of the campaign's grants carries (0 when
    none of them is live). Per type because values of different reward types (money, free
    spins, points) never add up; caps count them apart too."""

    promotion_code: str
    approved: int
    granted: int
    revoked: int
    amounts: tuple[tuple[str, Decimal], ...]


async def reconciliation(conn: asyncpg.Connection, campaign_pk: int
                         ) -> list[PromotionReconciliation]:
    """Per promotion of the campaign, in the campaign's order."""
    counts = await conn.fetch(
        """SELECT p.id, p.code,
                  (SELECT count(*) FROM campaign_targets t WHERE t.campaign_id = c.id
                      AND (t.approved OR NOT c.conditional)) AS approved,
                  count(g.id) AS granted,
                  count(g.id) FILTER (WHERE g.status = 'REVOKED') AS revoked
             FROM campaigns c
             JOIN campaign_promotions cp ON cp.campaign_id = c.id
             JOIN promotions p ON p.id = cp.promotion_id
             LEFT JOIN grants g ON g.promotion_id = p.id AND g.campaign_key = c.campaign_id
            WHERE c.id = $1
            GROUP BY p.id, p.code, cp.position, c.id, c.conditional
            ORDER BY cp.position""", campaign_pk)
    amounts: dict[int, list[tuple[str, Decimal]]] = {}
    for row in await conn.fetch(
            """WITH involved AS (
                   SELECT p.id AS promotion_id, r->>'reward_type' AS reward_type,
                          NULL::numeric AS value
                     FROM campaign_promotions cp
                     JOIN promotions p ON p.id = cp.promotion_id,
                          jsonb_array_elements(p.rewards) AS r
                    WHERE cp.campaign_id = $1
                   UNION ALL
                   SELECT g.promotion_id, r->>'reward_type',
                          CASE WHEN g.status = 'GRANTED' THEN (r->>'value')::numeric END
                     FROM campaign_promotions cp
                     JOIN campaigns c ON c.id = cp.campaign_id
                     JOIN grants g ON g.promotion_id = cp.promotion_id
                                  AND g.campaign_key = c.campaign_id,
                          jsonb_array_elements(g.rewards) AS r
                    WHERE cp.campaign_id = $1)
               SELECT promotion_id, reward_type, coalesce(sum(value), 0) AS amount
                 FROM involved
                GROUP BY promotion_id, reward_type
                ORDER BY promotion_id, reward_type COLLATE "C"
            """, campaign_pk):
        amounts.setdefault(row["promotion_id"], []).append((row["reward_type"], row["amount"]))
    return [PromotionReconciliation(
        promotion_code=r["code"], approved=r["approved"], granted=r["granted"],
        revoked=r["revoked"], amounts=tuple(amounts.get(r["id"], ()))) for r in counts]


async def forecast_counts(conn: asyncpg.Connection, campaign_pk: int, conditional: bool,
                          promotion_id: int, customer_ids: Sequence[str] | None
                          ) -> tuple[int, int]:
    """(customers without a live grant for this campaign, of whom new to the promotion), for
    the given customers, or else the approved ones (the whole group when not conditional)."""
    row = await conn.fetchrow(
        """WITH chosen AS (
               SELECT t.customer_id FROM campaign_targets t
                WHERE t.campaign_id = $1
                  AND CASE WHEN $4::text[] IS NOT NULL THEN t.customer_id = ANY($4)
                           WHEN $3 THEN t.approved IS TRUE ELSE true END),
           pending AS (
               SELECT ch.customer_id FROM chosen ch
                WHERE NOT EXISTS (SELECT 1 FROM grants g
                                   WHERE g.promotion_id = $2 AND g.customer_id = ch.customer_id
                                     AND g.campaign_key = (SELECT campaign_id FROM campaigns
                                                            WHERE id = $1)
                                     AND g.status = 'GRANTED'))
           SELECT count(*) AS customers,
                  count(*) FILTER (WHERE NOT EXISTS (
                      SELECT 1 FROM promotion_customers pc
                       WHERE pc.promotion_id = $2 AND pc.customer_id = p.customer_id
                         AND pc.live_grants > 0)) AS new_customers
             FROM pending p""",
        campaign_pk, promotion_id, conditional,
        list(customer_ids) if customer_ids is not None else None)
    assert row is not None
    return row["customers"], row["new_customers"]
