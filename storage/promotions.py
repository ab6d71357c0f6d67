"""Promotions, cap usage, grants and reconciliation in PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from core.cap_state import CUSTOMERS_SCOPE, windows
from core.caps import LIFETIME_START
from core.catalogue.promotions import (
    BudgetCap,
    CapPeriod,
    Promotion,
    PromotionReward,
    PromotionStatus,
    RewardKind,
    Tier,
)
from core.codes import AlertThreshold, CodeType, Inventory
from core.errors import AlreadyExists, InvalidArgument, NotFound

_COLUMNS = ("id, code, name, description, properties, status, time_zone, customer_cap, rewards, "
            "budget_caps, version, create_time, update_time, formulas, code_type, fallback_code, "
            "code_alerts")


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _undec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def reward_to_json(reward: PromotionReward) -> dict[str, Any]:
    return {"reward_type": reward.reward_type, "kind": reward.kind.value,
            "value": _dec(reward.value),
            "tiers": [{"condition": t.condition, "value": t.value} for t in reward.tiers],
            "formula": reward.formula, "rounding": reward.rounding, "decimals": reward.decimals,
            "rounding_factor": _dec(reward.rounding_factor),
            "lookback_days": reward.lookback_days, "min_value": _dec(reward.min_value),
            "max_value": _dec(reward.max_value)}


def reward_from_json(data: dict[str, Any]) -> PromotionReward:
    return PromotionReward(
        reward_type=data["reward_type"], kind=RewardKind(data["kind"]),
        value=_undec(data.get("value")),
        tiers=tuple(Tier(t["condition"], t["value"]) for t in data.get("tiers", [])),
        formula=data.get("formula", ""), rounding=data.get("rounding", "NONE"),
        decimals=data.get("decimals", 2), rounding_factor=_undec(data.get("rounding_factor")),
        lookback_days=data.get("lookback_days", 30), min_value=_undec(data.get("min_value")),
        max_value=_undec(data.get("max_value")))


def _threshold_to_json(threshold: AlertThreshold) -> dict[str, Any]:
    if threshold.remaining_codes is not None:
        return {"remaining_codes": threshold.remaining_codes}
    return {"remaining_percent": str(threshold.remaining_percent)}


def _threshold_from_json(data: dict[str, Any]) -> AlertThreshold:
    if "remaining_codes" in data:
        return AlertThreshold(remaining_codes=int(data["remaining_codes"]))
    return AlertThreshold(remaining_percent=Decimal(data["remaining_percent"]))


def _cap_to_json(cap: BudgetCap) -> dict[str, Any]:
    return {"reward_type": cap.reward_type, "period": cap.period.value, "limit": str(cap.limit)}


def _cap_from_json(data: dict[str, Any]) -> BudgetCap:
    return BudgetCap(data["reward_type"], CapPeriod(data["period"]), Decimal(data["limit"]))


@dataclass(frozen=True)
class StoredPromotion:
    id: int
    promotion: Promotion
    # The validated, versioned form of each TIERED/CALCULATED reward's formula, by reward
    # type (CompiledFormula.to_stored()); empty for rows saved before it was kept.
    formulas: dict[str, Any] = field(default_factory=dict)


def _from_row(row: asyncpg.Record) -> StoredPromotion:
    return StoredPromotion(id=row["id"], promotion=Promotion(
        code=row["code"], name=row["name"], description=row["description"],
        properties=dict(row["properties"]), status=PromotionStatus(row["status"]),
        time_zone=row["time_zone"],
        rewards=tuple(reward_from_json(r) for r in row["rewards"]),
        customer_cap=row["customer_cap"],
        budget_caps=tuple(_cap_from_json(c) for c in row["budget_caps"]),
        code_type=CodeType(row["code_type"]), fallback_code=row["fallback_code"],
        code_alerts=tuple(_threshold_from_json(t) for t in row["code_alerts"]),
        version=row["version"], create_time=row["create_time"], update_time=row["update_time"]),
        formulas=dict(row["formulas"]))


def _code_settings(promotion: Promotion) -> tuple[str, str, list[dict[str, Any]]]:
    return (promotion.code_type.value, promotion.fallback_code,
            [_threshold_to_json(t) for t in promotion.code_alerts])


def _kinds(promotion: Promotion) -> list[str]:
    return sorted({r.kind.value for r in promotion.rewards})


async def insert(conn: asyncpg.Connection, promotion: Promotion, *,
                 formulas: Mapping[str, Any]) -> StoredPromotion:
    """Insert a validated promotion with the stored form of its formulas (by reward type)."""
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO promotions (code, name, description, properties, status, time_zone,
                                        customer_cap, rewards, budget_caps, reward_kinds,
                                        formulas, code_type, fallback_code, code_alerts)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             RETURNING {_COLUMNS}""",
            promotion.code, promotion.name, promotion.description, dict(promotion.properties),
            promotion.status.value, promotion.time_zone, promotion.customer_cap,
            [reward_to_json(r) for r in promotion.rewards],
            [_cap_to_json(c) for c in promotion.budget_caps], _kinds(promotion), dict(formulas),
            *_code_settings(promotion))
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"a promotion with code {promotion.code!r} already exists",
                            reason="PROMOTION_EXISTS",
                            metadata={"promotion_code": promotion.code}) from exc
    assert row is not None
    return _from_row(row)


async def get(conn: asyncpg.Connection, code: str, *, for_update: bool = False,
              for_share: bool = False) -> StoredPromotion:
    """The promotion; ``for_update`` locks it for an edit, ``for_share`` holds edits off until
    the caller commits (what it read, e.g. the fallback code, stays true meanwhile)."""
    lock = " FOR UPDATE" if for_update else " FOR SHARE" if for_share else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM promotions WHERE code = $1{lock}", code)
    if row is None:
        raise NotFound(f"no promotion with code {code!r}", reason="PROMOTION_NOT_FOUND",
                       metadata={"promotion_code": code})
    return _from_row(row)


async def get_by_id(conn: asyncpg.Connection, promotion_id: int) -> StoredPromotion | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM promotions WHERE id = $1", promotion_id)
    return _from_row(row) if row is not None else None


async def save(conn: asyncpg.Connection, stored_id: int, promotion: Promotion, *,
               formulas: Mapping[str, Any] | None = None,
               recount_at: datetime | None = None) -> StoredPromotion:
    """Write every editable field and the status, bumping the version (caches compare it).

    ``formulas`` (the stored form of the rewards' formulas) must come with changed rewards;
    None keeps the stored forms, for a change of status alone. ``recount_at`` (the clock's
    now) comes with an edit, which may have added or set back a cap: every cap's current
    window is then recounted from the live grants (see _recount_caps). A change of status
    alone leaves the counters to the grants and revokes that keep them."""
    if recount_at is not None and promotion.fallback_code and await conn.fetchval(
            "SELECT true FROM promo_codes WHERE promotion_id = $1 AND code = $2",
            stored_id, promotion.fallback_code):
        # Checked on an edit, before writing. A grant is told apart as a fallback by its code:
        # the shared code must never also be a personal one (that customer's grant would read
        # as a fallback, and the code would be handed out twice).
        raise InvalidArgument(
            f"fallback_code {promotion.fallback_code!r} is one of the pool's personal codes; "
            "choose a code that is not in the pool", reason="INVALID_FALLBACK_CODE",
            metadata={"field": "promotion.fallback_code"})
    row = await conn.fetchrow(
        f"""UPDATE promotions SET name = $2, description = $3, properties = $4, status = $5,
                   time_zone = $6, customer_cap = $7, rewards = $8, budget_caps = $9,
                   reward_kinds = $10, formulas = coalesce($11, formulas), code_type = $12,
                   fallback_code = $13, code_alerts = $14,
                   version = version + 1, update_time = now()
             WHERE id = $1 RETURNING {_COLUMNS}""",
        stored_id, promotion.name, promotion.description, dict(promotion.properties),
        promotion.status.value, promotion.time_zone, promotion.customer_cap,
        [reward_to_json(r) for r in promotion.rewards],
        [_cap_to_json(c) for c in promotion.budget_caps], _kinds(promotion),
        None if formulas is None else dict(formulas), *_code_settings(promotion))
    assert row is not None
    if recount_at is not None:
        await _recount_caps(conn, stored_id, promotion, recount_at)
    return _from_row(row)


async def _recount_caps(conn: asyncpg.Connection, promotion_id: int, promotion: Promotion,
                        now: datetime) -> None:
    """Set every cap's current-window counter from the promotion's live grants.

    Why: grants charge only the caps the promotion has when they are made, so a cap that was
    removed and set again would otherwise keep the counter it had when it went (missing
    everything granted meanwhile), and a new cap would start from zero. The rule: the customer
    cap counts the customers holding a live grant; a budget cap's current window holds the
    values of its reward type in the live grants made inside that window (the window in the
    promotion's time zone, as charged). Editing only a limit changes nothing: the counters
    already say exactly that.

    The counter rows are locked first, in the order grants lock them (customers, then budget
    windows by reward type and period), and counted afterwards in statements of their own, so a
    grant still in flight has either committed before the count (and is in it) or charges the
    counter after this commit; such a grant then finds the promotion's version moved when it
    reads it again as its last statement, and undoes itself as STALE (migration 0025), so it is
    never charged against the limits it read before this edit."""
    current = windows(promotion, now)
    if not current:
        return
    await conn.execute(
        """SELECT 1 FROM cap_usage u
             JOIN unnest($2::text[], $3::text[], $4::timestamptz[]) AS w(scope, period, start)
               ON u.scope = w.scope AND u.period = w.period AND u.period_start = w.start
            WHERE u.promotion_id = $1
            ORDER BY u.scope <> $5, u.scope COLLATE "C", u.period COLLATE "C"
              FOR UPDATE OF u""",
        promotion_id, [w[0] for w in current], [w[1].value for w in current],
        [w[2] for w in current], CUSTOMERS_SCOPE)
    if promotion.customer_cap is not None:
        await conn.execute(
            """INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used,
                                           grants)
               SELECT $1, $2, 'LIFETIME', $3, count(*), count(*)
                 FROM promotion_customers WHERE promotion_id = $1 AND live_grants > 0
               ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
                  SET used = excluded.used, grants = excluded.grants""",
            promotion_id, CUSTOMERS_SCOPE, current[0][2])
    budgets = [w for w in current if w[0] != CUSTOMERS_SCOPE]
    if budgets:
        await conn.execute(
            """INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used,
                                           grants)
               SELECT $1, w.scope, w.period, w.start, coalesce(live.used, 0), live.grants
                 FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
                      AS w(scope, period, start, stop)
                 CROSS JOIN LATERAL (
                      SELECT sum((r->>'value')::numeric) AS used, count(*) AS grants
                        FROM grants g, jsonb_array_elements(g.rewards) AS r
                       WHERE g.promotion_id = $1 AND g.status = 'GRANTED'
                         AND g.granted_at >= w.start
                         AND (w.stop IS NULL OR g.granted_at < w.stop)
                         AND r->>'reward_type' = w.scope) AS live
               ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
                  SET used = excluded.used, grants = excluded.grants""",
            promotion_id, [w[0] for w in budgets], [w[1].value for w in budgets],
            [w[2] for w in budgets], [w[3] for w in budgets])


async def list_page(conn: asyncpg.Connection, *, after_code: str | None, limit: int,
                    search: str, statuses: Sequence[str],
                    kinds: Sequence[str]) -> list[StoredPromotion]:
    # strpos, not LIKE: "_" and "%" are characters of codes and names, not wildcards.
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM promotions
             WHERE ($1::text IS NULL OR code > $1)
               AND ($2::text = '' OR strpos(lower(name), lower($2)) > 0
                    OR strpos(lower(code), lower($2)) > 0)
               AND (cardinality($3::text[]) = 0 OR status = ANY($3))
               AND (cardinality($4::text[]) = 0 OR reward_kinds && $4)
             ORDER BY code LIMIT $5""",
        after_code, search, list(statuses), list(kinds), limit)
    return [_from_row(row) for row in rows]


@dataclass(frozen=True)
class UsageRow:
    scope: str
    period: CapPeriod
    period_start: datetime
    used: Decimal
    grants: int


async def usage(conn: asyncpg.Connection, promotion_id: int,
                windows: Sequence[tuple[str, str, datetime]]) -> dict[tuple[str, str], UsageRow]:
    """The counters of the given (scope, period, window start) triples, keyed (scope, period)."""
    if not windows:
        return {}
    rows = await conn.fetch(
        """SELECT u.scope, u.period, u.period_start, u.used, u.grants
             FROM unnest($2::text[], $3::text[], $4::timestamptz[]) AS w(scope, period, start)
             JOIN cap_usage u ON u.promotion_id = $1 AND u.scope = w.scope
                             AND u.period = w.period AND u.period_start = w.start""",
        promotion_id, [w[0] for w in windows], [w[1] for w in windows], [w[2] for w in windows])
    return {(r["scope"], r["period"]): UsageRow(r["scope"], CapPeriod(r["period"]),
                                                r["period_start"], r["used"], r["grants"])
            for r in rows}


@dataclass(frozen=True)
class LiveState:
    """What get and list show beside a promotion's configuration: its current cap counters,
    its live customers and, for a PERSONALIZED promotion, its code pool's counters."""

    usage: dict[tuple[str, str], UsageRow]
    customers: int
    codes: Inventory | None


async def live_states(conn: asyncpg.Connection,
                      windows: Mapping[int, Sequence[tuple[str, str, datetime]]]
                      ) -> dict[int, LiveState]:
    """The live state of several promotions (id -> its current (scope, period, window start)
    triples) in three statements, whatever their number (a lobby page is one call)."""
    ids = list(windows)
    flat = [(pid, *w) for pid, ws in windows.items() for w in ws]
    usage_rows = await conn.fetch(
        """SELECT u.promotion_id, u.scope, u.period, u.period_start, u.used, u.grants
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[])
                  AS w(promotion_id, scope, period, start)
             JOIN cap_usage u ON u.promotion_id = w.promotion_id AND u.scope = w.scope
                             AND u.period = w.period AND u.period_start = w.start""",
        [f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], [f[3] for f in flat]
    ) if flat else []
    customer_rows = await conn.fetch(
        """SELECT promotion_id, count(*) AS customers FROM promotion_customers
            WHERE promotion_id = ANY($1::bigint[]) AND live_grants > 0
            GROUP BY promotion_id""", ids)
    pool_rows = await conn.fetch(
        """SELECT promotion_id, total, allocated, fallback_grants FROM code_pools
            WHERE promotion_id = ANY($1::bigint[])""", ids)
    usage: dict[int, dict[tuple[str, str], UsageRow]] = {pid: {} for pid in ids}
    for r in usage_rows:
        usage[r["promotion_id"]][(r["scope"], r["period"])] = UsageRow(
            r["scope"], CapPeriod(r["period"]), r["period_start"], r["used"], r["grants"])
    customers = {r["promotion_id"]: r["customers"] for r in customer_rows}
    codes = {r["promotion_id"]: Inventory(total=r["total"], used=r["allocated"],
                                          fallback_grants=r["fallback_grants"])
             for r in pool_rows}
    return {pid: LiveState(usage[pid], customers.get(pid, 0), codes.get(pid)) for pid in ids}


@dataclass(frozen=True)
class GrantCharge:
    scope: str
    period: str
    start: datetime
    amount: Decimal
    limit: Decimal | None


@dataclass(frozen=True)
class GrantKeys:
    """Who and what an existing grant was made for: a request id reused for another customer
    or campaign is told apart from a retry by these."""

    customer_id: str
    campaign_key: str
    request_id: str


@dataclass(frozen=True)
class GrantOutcome:
    """outcome: GRANTED, EXISTING, NOT_ACTIVE, STALE, NOT_FOUND, or a cap denial
    (CUSTOMER_CAP_REACHED / BUDGET_CAP_REACHED with denied_scope and denied_period).

    ``keys`` is known for an EXISTING grant found by find_existing; promo_grant does not return
    them (the hot path stays as it is): ask grant_keys for them."""

    outcome: str
    grant_id: int | None = None
    grant_status: str | None = None
    rewards: list[dict[str, Any]] | None = None
    promo_code: str | None = None
    granted_at: datetime | None = None
    denied_scope: str | None = None
    denied_period: str | None = None
    alert: bool = False      # the grant raised a code-pool alert: dispatch it
    fallback: bool = False   # promo_code is the fallback code (the pool was empty)
    keys: GrantKeys | None = None


CAP_ERROR_SQLSTATE = "PC001"


@dataclass(frozen=True)
class GrantRequest:
    """Everything promo_grant needs for one GetReward grant."""

    promotion_id: int
    version: int
    customer_id: str
    campaign_key: str
    request_id: str
    rewards: list[dict[str, Any]]
    promo_code: str
    now: datetime
    customer_cap: int | None
    customers_start: datetime
    charges: Sequence[GrantCharge]
    personalized: bool = False
    fallback_code: str = ""

    def rewards_json(self) -> str:
        return json.dumps(self.rewards, separators=(",", ":"))


def _refused(message: str) -> GrantOutcome:
    """promo_grant's refusal (SQLSTATE PC001), "REASON|scope|period", as an outcome."""
    reason, scope, period = [*message.split("|"), "", ""][:3]
    return GrantOutcome(outcome=reason, denied_scope=scope, denied_period=period)


def _outcome(g: GrantRequest, row: Mapping[str, Any]) -> GrantOutcome:
    if row["outcome"] == "GRANTED":
        return GrantOutcome(outcome="GRANTED", grant_id=row["grant_id"], grant_status="GRANTED",
                            rewards=g.rewards, promo_code=row["promo_code"] or g.promo_code,
                            granted_at=g.now, alert=row["alert"],
                            fallback=g.personalized and row["promo_code"] == g.fallback_code)
    rewards = row["rewards"]
    if isinstance(rewards, str):  # jsonb inside a record comes back as text
        rewards = json.loads(rewards)
    return GrantOutcome(outcome=row["outcome"], grant_id=row["grant_id"],
                        grant_status=row["grant_status"], rewards=rewards,
                        promo_code=row["promo_code"], granted_at=row["granted_at"],
                        fallback=g.personalized and bool(g.fallback_code)
                        and row["promo_code"] == g.fallback_code)


async def grant(conn: asyncpg.Connection, g: GrantRequest) -> GrantOutcome:
    """One round trip: the promo_grant function, all or nothing.

    The rewards travel as JSON text (``$6::text::jsonb``), serialised once here; a new grant
    comes back as its id (and, for a PERSONALIZED promotion, its code) alone, since this call
    already holds what it sent."""
    try:
        row = await conn.fetchrow(
            "SELECT * FROM promo_grant($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11,"
            " $12, $13, $14, $15, $16, $17)",
            g.promotion_id, g.version, g.customer_id, g.campaign_key, g.request_id,
            g.rewards_json(), g.promo_code, g.now, g.customer_cap, g.customers_start,
            [c.scope for c in g.charges], [c.period for c in g.charges],
            [c.start for c in g.charges], [c.amount for c in g.charges],
            [c.limit for c in g.charges], g.personalized, g.fallback_code)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) != CAP_ERROR_SQLSTATE:
            raise
        return _refused(str(getattr(exc, "message", exc)))
    assert row is not None
    return _outcome(g, row)


async def grant_many(conn: asyncpg.Connection, grants: Sequence[GrantRequest]
                     ) -> list[GrantOutcome]:
    """Several grants in one round trip and one transaction (promo_grant_batch, migration
    0017): each is all or nothing on its own, in the order given, answered as ``grant`` would
    answer it alone. A database error other than a refusal fails them all (nothing is kept)."""
    froms: list[int] = []
    tos: list[int] = []
    charges: list[GrantCharge] = []
    for g in grants:
        froms.append(len(charges) + 1)
        charges.extend(g.charges)
        tos.append(len(charges))
    rows = await conn.fetch(
        "SELECT * FROM promo_grant_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
        " $13, $14, $15, $16, $17, $18, $19)",
        [g.promotion_id for g in grants], [g.version for g in grants],
        [g.customer_id for g in grants], [g.campaign_key for g in grants],
        [g.request_id for g in grants], [g.rewards_json() for g in grants],
        [g.promo_code for g in grants], [g.now for g in grants],
        [g.customer_cap for g in grants], [g.customers_start for g in grants], froms, tos,
        [c.scope for c in charges], [c.period for c in charges], [c.start for c in charges],
        [c.amount for c in charges], [c.limit for c in charges],
        [g.personalized for g in grants], [g.fallback_code for g in grants])
    outcomes: list[GrantOutcome] = []
    for g, row in zip(grants, rows, strict=True):
        outcomes.append(_refused(row["refusal"]) if row["refusal"] is not None
                        else _outcome(g, row))
    return outcomes


async def find_existing(conn: asyncpg.Connection, *, promotion_id: int, customer_id: str,
                        campaign_key: str, request_id: str) -> GrantOutcome | None:
    """The grant a retry or a repeat call should get back, without charging anything."""
    row = await conn.fetchrow(
        """SELECT id, status, rewards, promo_code, granted_at, customer_id, campaign_key,
                  request_id FROM grants
            WHERE promotion_id = $1 AND (request_id = $4 OR (customer_id = $2
                  AND campaign_key = $3 AND status = 'GRANTED'))
            ORDER BY request_id = $4 DESC LIMIT 1""",
        promotion_id, customer_id, campaign_key, request_id)
    if row is None:
        return None
    return GrantOutcome(outcome="EXISTING", grant_id=row["id"], grant_status=row["status"],
                        rewards=row["rewards"], promo_code=row["promo_code"],
                        granted_at=row["granted_at"],
                        keys=GrantKeys(row["customer_id"], row["campaign_key"],
                                       row["request_id"]))


async def grant_keys(conn: asyncpg.Connection, grant_id: int) -> GrantKeys:
    """The customer, campaign and request id of a grant (they never change once made)."""
    row = await conn.fetchrow(
        "SELECT customer_id, campaign_key, request_id FROM grants WHERE id = $1", grant_id)
    assert row is not None, f"grant {grant_id} vanished"
    return GrantKeys(row["customer_id"], row["campaign_key"], row["request_id"])


async def revoke(conn: asyncpg.Connection, grant_id: int, *, reason: str,
                 now: datetime) -> str:
    row = await conn.fetchrow("SELECT * FROM promo_revoke($1, $2, $3)", grant_id, reason, now)
    assert row is not None
    outcome: str = row["outcome"]
    return outcome


async def get_grant(conn: asyncpg.Connection, grant_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT g.*, p.code AS promotion_code FROM grants g
             JOIN promotions p ON p.id = g.promotion_id WHERE g.id = $1""", grant_id)


async def customer_reconciliation(conn: asyncpg.Connection,
                                  promotion_id: int) -> asyncpg.Record:
    """The customer cap's side: customers ever granted, customers whose every grant is revoked,
    and the live ``#customers`` counter (NULL when no customer cap ever counted)."""
    row = await conn.fetchrow(
        """SELECT count(*) AS granted_count,
                  count(*) FILTER (WHERE pc.live_grants <= 0) AS revoked_count,
                  (SELECT u.used FROM cap_usage u
                    WHERE u.promotion_id = $1 AND u.scope = $2 AND u.period = 'LIFETIME'
                      AND u.period_start = $3) AS counter_used
             FROM promotion_customers pc WHERE pc.promotion_id = $1""",
        promotion_id, CUSTOMERS_SCOPE, LIFETIME_START)
    assert row is not None
    return row


async def reconciliation(conn: asyncpg.Connection, promotion_id: int) -> list[asyncpg.Record]:
    """Per charged window: granted and revoked counts and amounts, and the live counter."""
    return await conn.fetch(
        """WITH charged AS (
               SELECT c->>'scope' AS scope, c->>'period' AS period,
                      (c->>'start')::timestamptz AS period_start,
                      (c->>'amount')::numeric AS amount, g.status
                 FROM grants g, jsonb_array_elements(g.charges) AS c
                WHERE g.promotion_id = $1)
           SELECT ch.scope, ch.period, ch.period_start,
                  count(*) AS granted_count, sum(ch.amount) AS granted_amount,
                  count(*) FILTER (WHERE ch.status = 'REVOKED') AS revoked_count,
                  coalesce(sum(ch.amount) FILTER (WHERE ch.status = 'REVOKED'), 0)
                      AS revoked_amount,
                  u.used AS counter_used
             FROM charged ch
             LEFT JOIN cap_usage u ON u.promotion_id = $1 AND u.scope = ch.scope
                  AND u.period = ch.period AND u.period_start = ch.period_start
            GROUP BY ch.scope, ch.period, ch.period_start, u.used
            ORDER BY ch.scope, ch.period, ch.period_start""",
        promotion_id)
