"""Concurrency audit, part two: interleavings that tests/e2e/test_concurrency_audit.py (grants,
caps, code pools under GetReward) does not cover. The approval queue (approve / reject /
recalculate racing each other), two copies of a bonus batch, automation rules counting events
recorded at once, uploads racing grants, run-once answers of UpsertCustomers / RecordEvents
sent twice at once, campaign execution racing approvals and cancellation, revokes racing
revokes, two delivery workers at once, event batches creating the same customers, and
AssignProductLists of customers who have no list yet (it found that two such assignments
both answer "created", and that the later one overwrites a list created, chosen and applied
meanwhile: it had read "no list", and a read that finds no row locks nothing).

Every test drives two real servers on one database (and, where a worker takes part, the
worker's own entry points) with asyncio.gather, then checks exact numbers in the database and
in the answers. The assertions hold whatever order the racing calls take: where the order
decides an outcome, the test checks that each answer agrees with the final state instead.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import campaigns_pb2_grpc as campb_grpc
from promo.v1 import codes_pb2 as cpb_codes
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import products_pb2 as prpb
from promo.v1 import products_pb2_grpc as prpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from storage import bonuses as bonuses_repo
from storage.db import create_pool
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign, ts
from tests.e2e.code_helpers import code_promotion, codes_file, pool_counts, upload
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type
from tests.e2e.test_bonuses_api import create, definition, request, stub
from tests.webhook_listener import SECRET, WebhookListener
from workers.delivery_lane import LANE_KEY, DeliveryLane
from workers.outbox import run_outbox_job

ISSUED, REJECTED, CALCULATED, SKIPPED = (pb.BONUS_STATUS_ISSUED, pb.BONUS_STATUS_REJECTED,
                                         pb.BONUS_STATUS_CALCULATED, pb.BONUS_STATUS_SKIPPED)
SKIPPED_EVENT, CALCULATED_EVENT, ISSUED_EVENT = 110, 111, 112


@pytest.fixture
async def second_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A second connection pool: another worker process's."""
    assert settings.database_url
    db_pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    try:
        yield db_pool
    finally:
        await db_pool.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}:{rpc_error_reason(e)}"
    return repr(e)


def _reasons(replies: list[Any]) -> Counter[str]:
    return Counter(_describe(r) for r in replies if isinstance(r, BaseException))


def _ctx(pool: asyncpg.Pool, clock: FixedClock, settings: Settings) -> dict[str, Any]:
    """What a worker hands its jobs (no Redis: queueing after commit is best effort)."""
    return {"pool": pool, "clock": clock, "settings": settings}


async def _upsert(api: Api, request_id: str, rows: list[tuple[str, str, str]]
                  ) -> cpb.UpsertCustomersResponse:
    return await cpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(
        cpb.UpsertCustomersRequest(request_id=request_id, customers=[
            cpb.Customer(customer_id=c, currency=cur, time_zone=tz) for c, cur, tz in rows]),
        metadata=api.key())


def _events_request(request_id: str, rows: list[tuple[str, str, str, str, datetime]]
                    ) -> cpb.RecordEventsRequest:
    """(external_id, customer_id, kind, amount, occurred_at) rows."""
    return cpb.RecordEventsRequest(request_id=request_id, events=[
        cpb.Event(external_id=x, customer_id=c, kind=kind, amount=amount, currency="EUR",
                  occurred_at=ts(at)) for x, c, kind, amount, at in rows])


async def _record(api: Api, message: cpb.RecordEventsRequest) -> cpb.RecordEventsResponse:
    return await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(message,
                                                                        metadata=api.key())


async def _all_results(api: Api, definition_id: str) -> list[pb.BonusResult]:
    found: list[pb.BonusResult] = []
    token = ""
    while True:
        page = await stub(api).ListBonusResults(pb.ListBonusResultsRequest(
            definition_id=definition_id, page_size=1000, page_token=token), metadata=api.key())
        found += page.results
        token = page.next_page_token
        if not token:
            return found


async def _run_all_due_batches(pool: asyncpg.Pool, settings: Settings,
                               clock: FixedClock) -> int:
    """Run every due batch job until no request is left pending (a job that answered "already
    running" during a race is still pending and runs here)."""
    ctx = _ctx(pool, clock, settings)
    ran = 0
    for _ in range(5):
        ids = [r["id"] for r in await pool.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch' AND status = 'pending'"
            " AND due_at <= $1 ORDER BY id", clock.now())]
        for job_id in ids:
            assert await run_outbox_job(ctx, job_id) == "done"
            ran += 1
        if not await pool.fetchval("SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'"):
            return ran
        async with pool.acquire() as conn:  # the sweeper's safety net
            await bonuses_repo.rearm_stranded_batches(conn, now=clock.now())
    raise AssertionError("requests left pending after every due batch ran")


async def _register_listener(api: Api, listener: WebhookListener, event_type: int) -> None:
    await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(lpb.RegisterListenerRequest(
        request_id=f"listener-{event_type}", listener=lpb.Listener(
            event_type=event_type, url=listener.url, secret=SECRET)), metadata=api.key())


async def _bonus_events(pool: asyncpg.Pool, event_type: int) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT body FROM webhook_events WHERE event_type = $1 ORDER BY id",
                            event_type)
    return [json.loads(r["body"])["data"] for r in rows]


async def _calculated_results(api: Api, pool: asyncpg.Pool, settings: Settings,
                              clock: FixedClock, definition_id: str, n: int, *,
                              formula: str = "sum(deposit.amount) * 10%",
                              ) -> tuple[list[pb.BonusResult], dict[str, Decimal]]:
    """A MANUAL definition and ``n`` CALCULATED results, one per customer (deposit 100 + i)."""
    await create(api, definition(definition_id, formula, approval_mode=pb.APPROVAL_MODE_MANUAL,
                                 rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    ids = [f"{definition_id}-{i:04d}" for i in range(n)]
    await _upsert(api, f"customers-{definition_id}", [(c, "EUR", "UTC") for c in ids])
    at = clock.now() - timedelta(hours=1)
    deposits = {c: Decimal(100 + i) + Decimal("0.37") for i, c in enumerate(ids)}
    await _record(api, _events_request(f"deposits-{definition_id}", [
        (f"dep-{c}", c, "deposit", str(amount), at) for c, amount in deposits.items()]))
    await request(api, definition_id, ids, f"request-{definition_id}", role="admin")
    clock.advance(timedelta(minutes=5))
    await _run_all_due_batches(pool, settings, clock)
    found = await _all_results(api, definition_id)
    assert len(found) == n and {r.status for r in found} == {CALCULATED}
    return found, deposits


async def _approve(api: Api, request_id: str, ids: list[str]) -> pb.ApproveBonusResultsResponse:
    return await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id=request_id, bonus_ids=ids), metadata=api.key())


async def _reject(api: Api, request_id: str, ids: list[str]) -> pb.RejectBonusResultsResponse:
    return await stub(api).RejectBonusResults(pb.RejectBonusResultsRequest(
        request_id=request_id, bonus_ids=ids, reason="abuse"), metadata=api.key())


# --- 1. ApproveBonusResults and RejectBonusResults racing on the same results ------------------


async def test_approvals_and_rejections_racing_decide_each_result_exactly_once(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, listener: WebhookListener) -> None:
    """200 CALCULATED results of a MANUAL definition, 450 decisions at once on two servers:

    * results 0-99: an approval (request id a-i) on one server, the same approval (same
      request id) on the other, and a rejection (r-i) on the first;
    * results 100-199 in pairs (p, q): one approval of both (pair-k), one approval of p alone
      (single-k), one rejection of q alone (reject-k).

    Each result ends ISSUED or REJECTED, decided by exactly one successful call (the pair
    approval all or nothing); losers are FAILED_PRECONDITION BONUS_NOT_AWAITING_APPROVAL; the
    two sends of one request id answer the same; every ISSUED result has exactly one ledger row
    (its amount) and one Issued event (with one delivery to the registered listener); a
    REJECTED one has neither; every successful answer shows the final state."""
    await _register_listener(api, listener, ISSUED_EVENT)
    found, _ = await _calculated_results(api, pool, settings, clock, "man", 200)
    by_customer = {r.customer_id: r for r in found}
    ordered = [by_customer[c] for c in sorted(by_customer)]
    ids = [r.bonus_id for r in ordered]
    apis = [api, second_server]
    calls: list[Awaitable[Any]] = []
    meta: list[tuple[str, str, list[str]]] = []  # (kind, request id, bonus ids)
    for i in range(100):
        calls += [_approve(apis[i % 2], f"a-{i}", [ids[i]]),
                  _approve(apis[(i + 1) % 2], f"a-{i}", [ids[i]]),
                  _reject(apis[i % 2], f"r-{i}", [ids[i]])]
        meta += [("approve", f"a-{i}", [ids[i]]), ("approve", f"a-{i}", [ids[i]]),
                 ("reject", f"r-{i}", [ids[i]])]
    for k in range(50):
        p, q = ids[100 + 2 * k], ids[101 + 2 * k]
        trio: list[tuple[Awaitable[Any], tuple[str, str, list[str]]]] = [
            (_approve(apis[k % 2], f"pair-{k}", [p, q]), ("approve", f"pair-{k}", [p, q])),
            (_approve(apis[(k + 1) % 2], f"single-{k}", [p]), ("approve", f"single-{k}", [p])),
            (_reject(apis[k % 2], f"reject-{k}", [q]), ("reject", f"reject-{k}", [q]))]
        if k % 2:  # half of the pairs sent after their rivals
            trio.reverse()
        calls += [c for c, _ in trio]
        meta += [m for _, m in trio]
    replies = await asyncio.gather(*calls, return_exceptions=True)

    failures = _reasons(replies)
    assert set(failures) <= {"FAILED_PRECONDITION:BONUS_NOT_AWAITING_APPROVAL"}, failures
    final = {r.bonus_id: r for r in await _all_results(api, "man")}
    assert len(final) == 200
    assert {r.status for r in final.values()} <= {ISSUED, REJECTED}

    # One successful decision per result (the two sends of a-i count once).
    deciders: dict[str, set[str]] = {b: set() for b in ids}
    answers: dict[str, list[Any]] = {}
    for (kind, request_id, bonus_ids), reply in zip(meta, replies, strict=True):
        answers.setdefault(request_id, []).append(reply)
        if isinstance(reply, BaseException):
            continue
        assert [r.bonus_id for r in reply.results] == bonus_ids
        for r in reply.results:
            expected = ISSUED if kind == "approve" else REJECTED
            assert r.status == expected == final[r.bonus_id].status, (request_id, r.bonus_id)
            assert r.amount == final[r.bonus_id].amount
            deciders[r.bonus_id].add(request_id)
    assert {b: len(d) for b, d in deciders.items() if len(d) != 1} == {}
    for request_id, sent in answers.items():  # a request id sent twice: the same answer
        if len(sent) == 2:
            first, second = sent
            assert type(first) is type(second), (request_id, first, second)
            if not isinstance(first, BaseException):
                assert first == second
    for k in range(50):  # results 100+2k: always issued, by pair-k or single-k
        assert final[ids[100 + 2 * k]].status == ISSUED

    issued = {b for b, r in final.items() if r.status == ISSUED}
    ledger = await pool.fetch("SELECT bonus_id::text AS b, amount FROM bonus_ledger")
    assert Counter(r["b"] for r in ledger) == Counter(issued)
    assert all(Decimal(final[r["b"]].amount) == r["amount"] for r in ledger)
    events = await _bonus_events(pool, ISSUED_EVENT)
    assert Counter(e["bonus_id"] for e in events) == Counter(issued)
    assert all(Decimal(e["amount"]) == Decimal(final[e["bonus_id"]].amount) for e in events)
    deliveries = await pool.fetchval(
        """SELECT count(*) FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
            WHERE e.event_type = $1""", ISSUED_EVENT)
    assert deliveries == len(issued)


# --- 2. RecalculateBonusResults (after a formula edit) racing approvals ---------------------------


async def test_recalculation_racing_approvals_never_issues_a_stale_amount(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """120 CALCULATED results at 50% of a deposit; the formula is edited to 60% (revision 2);
    then at once on two servers: three recalculations (one request id sent twice, one other)
    and 120 approvals, one per result. Every approval succeeds (a recalculated result stays
    CALCULATED); every result ends ISSUED with the amount of the revision it was last computed
    with, its ledger row and its Issued event say the same amount, and it has as many Calculated
    events as calculations (a recalculation after the approval would show up as a changed
    amount, a CALCULATED status or an extra event)."""
    found, deposits = await _calculated_results(
        api, pool, settings, clock, "rec", 120, formula="sum(deposit.amount) * 50%")
    edited = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="edit-60", definition=pb.BonusDefinition(
            definition_id="rec", formula="sum(deposit.amount) * 60%"),
        update_mask={"paths": ["formula"]}), metadata=api.key())
    assert edited.definition.revision == 2
    apis = [api, second_server]

    async def recalc(a: Api, request_id: str) -> pb.RecalculateBonusResultsResponse:
        return await stub(a).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
            request_id=request_id, definition_id="rec"), metadata=a.key())

    calls: list[Awaitable[Any]] = [_approve(apis[i % 2], f"ok-{i}", [r.bonus_id])
                                   for i, r in enumerate(found)]
    calls[30:30] = [recalc(api, "recalc-1")]
    calls[70:70] = [recalc(second_server, "recalc-1")]
    calls[100:100] = [recalc(second_server, "recalc-2")]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert _reasons(replies) == Counter()
    recalcs = [r for r in replies if isinstance(r, pb.RecalculateBonusResultsResponse)]
    assert len(recalcs) == 3
    assert replies[30] == replies[70]  # recalc-1 sent twice: one answer
    for r in recalcs:
        assert r.recalculated_count == r.calculated_count <= 120 and r.skipped_count == 0

    final = {r.bonus_id: r for r in await _all_results(api, "rec")}
    assert {r.status for r in final.values()} == {ISSUED}
    counts = {r["b"]: r["calculation_count"] for r in await pool.fetch(
        "SELECT bonus_id::text AS b, calculation_count FROM bonus_results")}
    rate = {1: Decimal("0.5"), 2: Decimal("0.6")}
    for r in final.values():
        expected = (deposits[r.customer_id] * rate[r.definition_revision]).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP)  # ROUNDING_MODE_ROUND: halves up
        assert Decimal(r.amount) == expected, (r.customer_id, r.definition_revision, r.amount)
        assert (r.definition_revision == 1) == (counts[r.bonus_id] == 1)
    ledger = {r["b"]: r["amount"] for r in await pool.fetch(
        "SELECT bonus_id::text AS b, amount FROM bonus_ledger")}
    assert await pool.fetchval("SELECT count(*) FROM bonus_ledger") == 120
    assert {b: Decimal(r.amount) for b, r in final.items()} == ledger
    issued = await _bonus_events(pool, ISSUED_EVENT)
    assert sorted((e["bonus_id"], Decimal(e["amount"])) for e in issued) == sorted(
        ledger.items())
    calculated = Counter(e["bonus_id"] for e in await _bonus_events(pool, CALCULATED_EVENT))
    assert calculated == counts
    # The approval's answer showed what was issued.
    for reply in replies:
        if isinstance(reply, pb.ApproveBonusResultsResponse):
            [shown] = reply.results
            assert Decimal(shown.amount) == ledger[shown.bonus_id]


# --- 3. two copies of one batch at once ---------------------------------------------------------


async def _batch_setup(api: Api, clock: FixedClock, definition_id: str, n: int,
                       with_deposit: int) -> None:
    await create(api, definition(definition_id, "sum(deposit.amount) * 10%",
                                 rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    ids = [f"b{i:04d}" for i in range(n)]
    await _upsert(api, "customers-batch", [(c, "EUR", "UTC") for c in ids])
    at = clock.now() - timedelta(hours=1)
    await _record(api, _events_request("deposits-batch", [
        (f"bd-{c}", c, "deposit", "10", at) for c in ids[:with_deposit]]))


async def _assert_one_result_per_request(pool: asyncpg.Pool, requests: int, issued: int) -> None:
    rows = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM bonus_requests) AS requests,
                  (SELECT count(*) FROM bonus_requests WHERE status = 'DONE') AS done,
                  (SELECT count(*) FROM bonus_results) AS results,
                  (SELECT count(DISTINCT request_pk) FROM bonus_results) AS distinct_requests,
                  (SELECT count(*) FROM bonus_results WHERE status = 'ISSUED') AS issued,
                  (SELECT count(*) FROM bonus_results WHERE status = 'SKIPPED') AS skipped,
                  (SELECT count(*) FROM bonus_ledger) AS ledger,
                  (SELECT coalesce(sum(request_count), 0) FROM bonus_batches) AS counted""")
    assert dict(rows) == {"requests": requests, "done": requests, "results": requests,
                          "distinct_requests": requests, "issued": issued,
                          "skipped": requests - issued, "ledger": issued, "counted": requests}
    kinds = Counter({r["event_type"]: r["n"] for r in await pool.fetch(
        "SELECT event_type, count(*) AS n FROM webhook_events GROUP BY 1")})
    assert kinds == {SKIPPED_EVENT: requests - issued, CALCULATED_EVENT: issued,
                     ISSUED_EVENT: issued}
    assert await pool.fetchval(
        """SELECT count(*) FROM (SELECT 1 FROM webhook_events
            GROUP BY body::jsonb -> 'data' ->> 'bonus_id', event_type HAVING count(*) > 1) x"""
    ) == 0


async def test_two_batch_runs_and_two_job_runs_of_one_window_at_once(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """1,500 requests (1,200 customers with a deposit) in one window, AUTOMATIC approval. When
    it closes, four runs at once: storage.bonuses.run_batch on two pools (two workers) and the
    outbox job of the window through run_outbox_job on both. Whoever loses is BatchBusy / the
    job "already running"; the job runs again afterwards. Each request gets exactly one
    result; ledger rows = ISSUED results; one event of each kind per result; the batch's
    request_count is 1,500 (each request counted by the run that wrote it)."""
    await _batch_setup(api, clock, "twice", 1500, 1200)
    accepted = await request(api, "twice", [f"b{i:04d}" for i in range(1500)], "twice-1",
                             role="admin")
    assert accepted.accepted_count == 1500
    window = accepted.window_start.ToDatetime(UTC)
    clock.set(accepted.due_time.ToDatetime(UTC))
    pk = await pool.fetchval("SELECT id FROM bonus_definitions WHERE definition_id = 'twice'")
    [job_id] = [r["id"] for r in await pool.fetch(
        "SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch'")]
    now = clock.now()
    replies = await asyncio.gather(
        bonuses_repo.run_batch(pool, pk, window, now=now),
        bonuses_repo.run_batch(second_pool, pk, window, now=now),
        run_outbox_job(_ctx(pool, clock, settings), job_id),
        run_outbox_job(_ctx(second_pool, clock, settings), job_id),
        return_exceptions=True)
    unexpected = [r for r in replies[:2] if isinstance(r, BaseException)
                  and not isinstance(r, bonuses_repo.BatchBusy)]
    assert unexpected == []
    assert set(replies[2:]) <= {"done", "already running", "not due or already done"}, replies
    await _run_all_due_batches(pool, settings, clock)
    await _assert_one_result_per_request(pool, 1500, 1200)


async def test_requests_joining_a_window_while_its_batch_runs_each_get_one_result(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """A batch computing a window while 120 RequestBonusCalculation calls (5 customers each,
    new request ids, both servers) add requests to that same window: a request that commits
    after the batch read the pending ones is left for the window's job (re-armed if it had
    finished, or by the sweeper). After the due jobs and the sweeper: every request has exactly
    one result, none twice, nothing pending."""
    await _batch_setup(api, clock, "join", 600, 500)
    ids = [f"b{i:04d}" for i in range(600)]
    first = await request(api, "join", ids, "join-0", role="admin")
    window = first.window_start.ToDatetime(UTC)
    pk = await pool.fetchval("SELECT id FROM bonus_definitions WHERE definition_id = 'join'")
    apis = [api, second_server]
    calls: list[Awaitable[Any]] = [
        request(apis[i % 2], "join", ids[(5 * i) % 600:(5 * i) % 600 + 5], f"join-{i + 1}",
                role="admin") for i in range(120)]
    calls.insert(40, bonuses_repo.run_batch(pool, pk, window, now=clock.now()))
    calls.insert(80, bonuses_repo.run_batch(pool, pk, window, now=clock.now()))
    replies = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in replies if isinstance(r, BaseException)
              and not isinstance(r, bonuses_repo.BatchBusy)]
    assert errors == []
    clock.set(first.due_time.ToDatetime(UTC))
    await _run_all_due_batches(pool, settings, clock)
    # 600 + 600 requests; customers b0000..b0499 have a deposit.
    await _assert_one_result_per_request(pool, 1200, 1000)


# --- 4. automation rules: every N events, max executions, events recorded at once ----------------


async def test_rules_count_events_recorded_at_once_on_two_servers_exactly(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """Seed 004's rules under concurrency. Rule "q3": every 100 bets after a qualifying
    deposit (>= 100), at most 3 executions per qualification. Rule "every7": every 7 bets (no
    qualification), on another definition. r1 qualifies (deposit 150) first; then 550 bets
    (r1: 350, r2 and r3: 100 each) go in 110 RecordEvents calls of 5 on two servers at once,
    together with 40 resends of some of those calls (same request id) and 20 resends of their
    events under new request ids. Exactly: q3 fires 3 times for r1 (300 bets, then the limit),
    every7 fires 350 // 7 + 2 * (100 // 7) = 78 times; every event is stored and counted once;
    one batch job per (definition, window)."""
    await create(api, definition("bets-a", "sum(bet.amount) * 10%"))
    await create(api, definition("bets-b", "sum(bet.amount) * 5%"))
    for message in (
            pb.BonusRule(rule_id="q3", definition_id="bets-a", event_kind="bet", every=100,
                         qualification_kind="deposit", qualification_min_amount="100",
                         max_executions=3,
                         period_mode=pb.RULE_PERIOD_MODE_QUALIFICATION_TO_LAST),
            pb.BonusRule(rule_id="every7", definition_id="bets-b", event_kind="bet", every=7,
                         period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST)):
        await stub(api).CreateBonusRule(pb.CreateBonusRuleRequest(
            request_id=f"rule-{message.rule_id}", rule=message), metadata=api.key())
    await _upsert(api, "rule-customers", [(c, "EUR", "UTC") for c in ("r1", "r2", "r3")])
    t0 = clock.now() - timedelta(hours=2)
    await _record(api, _events_request("qualify", [("dep-r1", "r1", "deposit", "150", t0)]))
    bets = ([("r1", i) for i in range(350)] + [("r2", i) for i in range(100)]
            + [("r3", i) for i in range(100)])
    bets.sort(key=lambda b: (b[1], b[0]))  # customers interleaved across calls
    rows = [(f"bet-{c}-{i}", c, "bet", str(1 + i % 3), t0 + timedelta(seconds=1 + i))
            for c, i in bets]
    messages = [_events_request(f"bets-{k}", rows[5 * k:5 * k + 5]) for k in range(110)]
    apis = [api, second_server]
    calls: list[Awaitable[Any]] = [_record(apis[k % 2], m) for k, m in enumerate(messages)]
    resent = [(k, _record(apis[(k + 1) % 2], messages[k])) for k in range(0, 110, 11)]
    resent += [(k, _record(apis[k % 2], messages[k])) for k in range(5, 110, 11)]
    resent += [(k, _record(apis[k % 2], messages[k])) for k in range(7, 110, 11)]
    resent += [(k, _record(apis[(k + 1) % 2], messages[k])) for k in range(3, 110, 11)]
    again = [_record(apis[(k + 1) % 2], _events_request(f"again-{k}", rows[5 * k:5 * k + 5]))
             for k in range(0, 100, 5)]
    replies = await asyncio.gather(*calls, *(c for _, c in resent), *again,
                                   return_exceptions=True)
    assert _reasons(replies) == Counter()
    answers: list[Any] = list(replies)
    originals, resends = answers[:110], answers[110:110 + len(resent)]
    assert len(resent) == 40
    for (k, _), reply in zip(resent, resends, strict=True):
        assert reply == originals[k], k
    inserted = sum(r.inserted_count for r in originals) + sum(
        r.inserted_count for r in answers[110 + len(resent):])
    assert inserted == 550

    assert await pool.fetchval("SELECT count(*) FROM events") == 551
    requests = Counter((r["source"], r["customer_id"]) for r in await pool.fetch(
        "SELECT source, customer_id FROM bonus_requests"))
    assert requests == {("rule:q3", "r1"): 3, ("rule:every7", "r1"): 50,
                        ("rule:every7", "r2"): 14, ("rule:every7", "r3"): 14}
    states = {(r["rule_id"], r["customer_id"]): (r["accumulated"], r["executions"], r["fired"])
              for r in await pool.fetch(
                  """SELECT r.rule_id, s.customer_id, s.accumulated, s.executions, s.fired
                       FROM bonus_rule_states s JOIN bonus_rules r ON r.id = s.rule_pk""")}
    assert {k: v for k, v in states.items() if k[0] == "q3" and k[1] == "r1"} == {
        ("q3", "r1"): (0, 3, 3)}
    assert (states[("every7", "r1")][0::2], states[("every7", "r2")][0::2],
            states[("every7", "r3")][0::2]) == ((0, 50), (2, 14), (2, 14))
    assert await pool.fetchval(
        "SELECT count(*) FROM outbox_jobs WHERE kind = 'bonus.batch'") == 2
    clock.advance(timedelta(minutes=5))
    await _run_all_due_batches(pool, settings, clock)
    assert await pool.fetchval("SELECT count(*) FROM bonus_results") == 81


# --- 5. uploads racing grants -------------------------------------------------------------------


async def test_two_uploads_racing_three_hundred_customers_hand_out_each_code_once(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """A PERSONALIZED pool of 50 codes with a fallback; at once on two servers: two uploads of
    different files (200 codes each, one per server), 300 customers asking for a code and 60
    of them asking again (new request ids). Both uploads are accepted; each customer holds one
    grant; no code goes out twice; the codes handed out are exactly ordinals 1..allocated;
    allocated and fallback_grants equal the grants; total = rows = 450 with ordinals 1..450."""
    await code_promotion(api, "UPL2", fallback="FB")
    await upload(api, "UPL2", codes_file("S", 50), "start")
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    calls: list[Awaitable[Any]] = [
        get_reward(apis[i % 2], f"c{i}", "UPL2", stub=stubs[i % 2]) for i in range(300)]
    calls.insert(60, upload(api, "UPL2", codes_file("A", 200), "file-a", chunk=997))
    calls.insert(120, upload(second_server, "UPL2", codes_file("B", 200), "file-b", chunk=991))
    calls += [get_reward(apis[(i + 1) % 2], f"c{i}", "UPL2", stub=stubs[(i + 1) % 2])
              for i in range(0, 300, 5)]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert _reasons(replies) == Counter()
    uploads = [r for r in replies if isinstance(r, cpb_codes.UploadCodesResponse)]
    assert [u.codes_added for u in uploads] == [200, 200]
    assert uploads[0].upload_id != uploads[1].upload_id
    grants = [r for r in replies if isinstance(r, rpb.GetRewardResponse)]
    assert len(grants) == 360 and all(r.HasField("grant") for r in grants)
    by_customer: dict[str, set[str]] = {}
    for r in grants:
        by_customer.setdefault(r.grant.customer_id, set()).add(r.grant.promo_code)
    assert len(by_customer) == 300 and all(len(c) == 1 for c in by_customer.values())

    total, allocated, rows = await pool_counts(pool, "UPL2")
    assert (total, rows) == (450, 450)
    assert await pool.fetchval("SELECT max(ordinal) FROM promo_codes") == 450
    db = await pool.fetchrow(
        """SELECT count(*) AS grants,
                  count(*) FILTER (WHERE promo_code <> 'FB') AS personal,
                  count(DISTINCT promo_code) FILTER (WHERE promo_code <> 'FB') AS distinct_codes,
                  count(*) FILTER (WHERE promo_code = 'FB') AS fallback,
                  count(DISTINCT customer_id) AS customers
             FROM grants""")
    assert (db["grants"], db["customers"]) == (300, 300)
    assert db["personal"] == db["distinct_codes"] == allocated
    assert db["fallback"] == await pool.fetchval("SELECT fallback_grants FROM code_pools")
    handed = {r["promo_code"] for r in await pool.fetch(
        "SELECT promo_code FROM grants WHERE promo_code <> 'FB'")}
    first_ordinals = {r["code"] for r in await pool.fetch(
        "SELECT code FROM promo_codes WHERE ordinal <= $1", allocated)}
    assert handed == first_ordinals
    assert sum(not r.existing for r in grants) == 300


# --- 6. the same request id sent at once from both servers -------------------------------------


async def test_upserts_and_event_batches_sent_twice_at_once_take_effect_once(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """UpsertCustomers: three request ids for the same 400 customers (different currency /
    zone), each sent 8 times at once over both servers: the sends of one id answer the same;
    the three ids together create each customer once (created counts sum to 400); every row
    holds one request's values, all from the same (the last to commit). RecordEvents: 1,000
    deposits (100 for each of 10 customers) as "ev-1" sent 6 times and as "ev-2" (same events)
    sent 6 times, with a rule firing every 10 deposits: the sends of one id answer the same,
    the two ids insert 1,000 together, the rule fires exactly 100 times."""
    await create(api, definition("dep-10", "sum(deposit.amount) * 1%"))
    await stub(api).CreateBonusRule(pb.CreateBonusRuleRequest(
        request_id="rule-dep", rule=pb.BonusRule(
            rule_id="dep10", definition_id="dep-10", event_kind="deposit", every=10,
            period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST)), metadata=api.key())
    apis = [api, second_server]
    ids = [f"u{i:03d}" for i in range(400)]
    variants = {"up-1": ("EUR", "UTC"), "up-2": ("USD", "America/New_York"),
                "up-3": ("GBP", "Europe/London")}
    calls = [_upsert(apis[n % 2], request_id, [(c, cur, tz) for c in ids])
             for request_id, (cur, tz) in variants.items() for n in range(8)]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert _reasons(replies) == Counter()
    answers: list[Any] = list(replies)
    per_id = [answers[8 * k:8 * k + 8] for k in range(3)]
    for sends in per_id:
        assert all(r == sends[0] for r in sends), sends
        assert sends[0].created_count + sends[0].updated_count == 400
    assert sum(s[0].created_count for s in per_id) == 400
    values = Counter((r["currency"], r["time_zone"]) for r in await pool.fetch(
        "SELECT currency, time_zone FROM customers"))
    assert len(values) == 1 and sum(values.values()) == 400
    assert next(iter(values)) in set(variants.values())

    at = clock.now() - timedelta(hours=3)
    rows = [(f"ev-{c}-{i}", c, "deposit", "10", at + timedelta(seconds=i))
            for i in range(100) for c in ids[:10]]
    ev1, ev2 = _events_request("ev-1", rows), _events_request("ev-2", rows)
    replies = await asyncio.gather(
        *(_record(apis[n % 2], ev1) for n in range(6)),
        *(_record(apis[(n + 1) % 2], ev2) for n in range(6)), return_exceptions=True)
    assert _reasons(replies) == Counter()
    recorded: list[Any] = list(replies)
    first, second = recorded[:6], recorded[6:]
    assert all(r == first[0] for r in first) and all(r == second[0] for r in second)
    assert first[0].inserted_count + second[0].inserted_count == 1000
    assert first[0].duplicate_count + second[0].duplicate_count == 1000
    assert await pool.fetchval("SELECT count(*) FROM events") == 1000
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 100
    assert await pool.fetchval(
        "SELECT count(*) FROM bonus_rule_states WHERE accumulated = 0 AND fired = 10") == 10


# --- 7a. campaign execution racing approvals (clock skew) and cancellation ---------------------


async def test_campaign_execution_racing_approvals_counts_exactly_what_landed(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """The worker's clock is 1 s ahead of the servers' (other machines): at the worker's
    execute_at the servers still take approvals. Approval calls (2 customers each, one approved
    and one rejected, on two servers, 200 targets in all): 30 land, 40 race the execution job,
    30 come after it. Every call either lands before the execution (and counts) or is
    CLEARANCE_CLOSED (and changes nothing); the campaign's approved / rejected counts and its
    Executed event equal the approvals stored; each call's answer agrees with the rows."""
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=1)
    targets = [f"t{i:03d}" for i in range(200)]
    await create_campaign(api, "race", execute_at, customers=targets)
    clock.set(execute_at - timedelta(seconds=1))
    worker_clock = FixedClock(execute_at)
    [job_id] = [r["id"] for r in await pool.fetch(
        "SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")]
    apis = [api, second_server]

    async def decide(i: int) -> campb.UpdateCustomerPromotionStatusResponse:
        a = apis[i % 2]
        return await campb_grpc.ClearanceServiceStub(a.channel).UpdateCustomerPromotionStatus(
            campb.UpdateCustomerPromotionStatusRequest(
                campaign_id="race", request_id=f"s-{i}", statuses=[
                    campb.CustomerPromotionStatus(customer_id=targets[2 * i], approved=True),
                    campb.CustomerPromotionStatus(customer_id=targets[2 * i + 1],
                                                  approved=False)]),
            metadata=a.key("listener"))

    # 30 approvals land first; 40 more race the execution; 30 come after it.
    early = await asyncio.gather(*(decide(i) for i in range(30)), return_exceptions=True)
    calls: list[Awaitable[Any]] = [decide(i) for i in range(30, 70)]
    calls.insert(20, run_outbox_job(_ctx(pool, worker_clock, settings), job_id))
    racing = await asyncio.gather(*calls, return_exceptions=True)
    assert racing.pop(20) == "done"
    late = await asyncio.gather(*(decide(i) for i in range(70, 100)), return_exceptions=True)
    assert all(isinstance(r, grpc.RpcError) for r in late)
    replies = [*early, *racing, *late]
    assert set(_reasons(replies)) <= {"FAILED_PRECONDITION:CLEARANCE_CLOSED"}
    stored = {r["customer_id"]: r["approved"] for r in await pool.fetch(
        "SELECT customer_id, approved FROM campaign_targets")}
    landed = 0
    for i, reply in enumerate(replies):
        pair = (stored[targets[2 * i]], stored[targets[2 * i + 1]])
        if isinstance(reply, BaseException):
            assert pair == (None, None), i
        else:
            assert reply.updated == 2 and pair == (True, False), i
            landed += 1
    campaign = await pool.fetchrow(
        "SELECT status, approved_count, rejected_count FROM campaigns")
    assert landed >= 30
    assert tuple(campaign) == ("EXECUTED", landed, 200 - landed)
    [executed] = [json.loads(r["body"])["data"] for r in await pool.fetch(
        "SELECT body FROM webhook_events WHERE dedup_key LIKE 'campaign:%:executed'")]
    assert (executed["approved_count"], executed["rejected_count"]) == (landed, 200 - landed)


async def test_cancel_racing_execution_ends_in_exactly_one_of_them(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """Ten campaigns; for each, the execution job (worker clock at execute_at) and two
    CancelCampaign calls (different request ids, one per server) at once. Each campaign ends
    EXECUTED (both cancels CAMPAIGN_NOT_OPEN, one Executed event) or CANCELLED (exactly one
    cancel succeeded, no Executed event, executed_at unset); every successful cancel answer
    says CANCELLED."""
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=1)
    for n in range(10):
        await create_campaign(api, f"cx{n}", execute_at, customers=["a", "b"],
                              conditional=False)
    worker_ctx = _ctx(pool, FixedClock(execute_at), settings)
    campaign_ids = {r["id"]: r["campaign_id"] for r in await pool.fetch(
        "SELECT id, campaign_id FROM campaigns")}
    jobs = {}
    for r in await pool.fetch("SELECT id, payload FROM outbox_jobs "
                              "WHERE kind = 'campaign.execute'"):
        payload = r["payload"]
        while isinstance(payload, str):
            payload = json.loads(payload)
        jobs[campaign_ids[int(payload["campaign"])]] = r["id"]
    assert len(jobs) == 10
    apis = [api, second_server]

    async def cancel(a: Api, campaign_id: str, request_id: str) -> campb.CancelCampaignResponse:
        return await campb_grpc.CampaignServiceStub(a.channel).CancelCampaign(
            campb.CancelCampaignRequest(campaign_id=campaign_id, request_id=request_id),
            metadata=a.key())

    calls: list[Awaitable[Any]] = []
    for n in range(10):
        calls += [cancel(apis[n % 2], f"cx{n}", f"cancel-{n}-a"),
                  run_outbox_job(worker_ctx, jobs[f"cx{n}"]),
                  cancel(apis[(n + 1) % 2], f"cx{n}", f"cancel-{n}-b")]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert set(_reasons(replies)) <= {"FAILED_PRECONDITION:CAMPAIGN_NOT_OPEN"}
    rows = {r["campaign_id"]: r for r in await pool.fetch("SELECT * FROM campaigns")}
    executed_events = Counter(r["dedup_key"] for r in await pool.fetch(
        "SELECT dedup_key FROM webhook_events WHERE dedup_key LIKE 'campaign:%:executed'"))
    for n in range(10):
        row = rows[f"cx{n}"]
        first, job, second = replies[3 * n:3 * n + 3]
        assert job == "done"
        cancels = [r for r in (first, second) if not isinstance(r, BaseException)]
        key = f"campaign:{row['id']}:executed"
        if row["status"] == "EXECUTED":
            assert cancels == [] and executed_events[key] == 1 and row["cancelled_at"] is None
        else:
            assert row["status"] == "CANCELLED" and row["executed_at"] is None
            assert len(cancels) == 1 and executed_events[key] == 0
            assert cancels[0].campaign.status == campb.CAMPAIGN_STATUS_CANCELLED


# --- 7b. revokes of the same grants racing each other --------------------------------------------


async def test_the_same_grants_revoked_three_times_at_once_give_back_once(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """100 grants (customer cap 500, lifetime and daily budget caps); each revoked three times
    at once with different request ids on both servers (300 calls): exactly one answer per
    grant says revoked; every counter returns to 0, customers hold no live grant, and the
    reconciliation says every counter matches."""
    await reward_type(api)
    await promotion(api, "REV", customer_cap=500,
                    caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100000"),
                          cap(ppb.CAP_PERIOD_DAILY, "5000")])
    apis = [api, second_server]
    granted = await asyncio.gather(*(get_reward(apis[i % 2], f"c{i}", "REV")
                                     for i in range(100)))
    grant_ids = [r.grant.grant_id for r in granted]
    assert len(set(grant_ids)) == 100

    async def revoke(a: Api, grant_id: str, request_id: str) -> rpb.RevokeGrantResponse:
        return await rpb_grpc.RewardServiceStub(a.channel).RevokeGrant(rpb.RevokeGrantRequest(
            request_id=request_id, grant_id=grant_id, reason="credit failed"),
            metadata=a.key("runtime"))

    calls = [revoke(apis[(i + n) % 2], gid, f"rv-{i}-{n}") for n in range(3)
             for i, gid in enumerate(grant_ids)]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert _reasons(replies) == Counter()
    answers: list[Any] = list(replies)
    per_grant = Counter(gid for gid, r in zip(
        [g for _ in range(3) for g in grant_ids], answers, strict=True) if r.revoked)
    assert per_grant == {gid: 1 for gid in grant_ids}
    usage = {(r["scope"], r["period"]): (r["used"], r["grants"]) for r in await pool.fetch(
        "SELECT scope, period, used, grants FROM cap_usage")}
    assert usage == {("#customers", "LIFETIME"): (0, 0), ("cashback", "LIFETIME"): (0, 0),
                     ("cashback", "DAILY"): (0, 0)}
    assert await pool.fetchval(
        "SELECT coalesce(sum(live_grants), 0) FROM promotion_customers") == 0
    assert await pool.fetchval("SELECT count(*) FROM grants WHERE status = 'REVOKED'") == 100


# --- 7c. two delivery workers at once ------------------------------------------------------------


async def test_two_delivery_workers_at_once_send_each_event_once(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, listener: WebhookListener) -> None:
    """150 Issued events for one listener (150 approvals in one call), then every delivery job
    run at once by two workers (two pools, two HTTP clients), each job claiming up to 100 others
    (SKIP LOCKED). Without a crash delivery is exactly once: the listener gets each event id
    once, correctly signed; every delivery is DELIVERED after one attempt, every job done."""
    from workers import webhooks as webhook_worker

    await _register_listener(api, listener, ISSUED_EVENT)
    found, _ = await _calculated_results(api, pool, settings, clock, "dl", 150)
    await _approve(api, "all", [r.bonus_id for r in found])
    job_ids = [r["id"] for r in await pool.fetch(
        "SELECT id FROM outbox_jobs WHERE kind = 'webhook.deliver' ORDER BY id")]
    assert len(job_ids) == 150
    workers = [_ctx(pool, clock, settings), _ctx(second_pool, clock, settings)]
    for ctx in workers:
        await webhook_worker.setup(ctx)
        # Every job at once, as two workers with 75 job slots each would run them: no job is
        # put off for the delivery lane (workers/delivery_lane.py, tested on its own).
        ctx[LANE_KEY] = DeliveryLane(len(job_ids))
    try:
        replies = await asyncio.gather(*(run_outbox_job(workers[i % 2], job_id)
                                         for i, job_id in enumerate(job_ids)),
                                       return_exceptions=True)
    finally:
        for ctx in workers:
            await webhook_worker.teardown(ctx)
    assert set(replies) <= {"done", "already running", "not due or already done"}, replies
    received = Counter(r.event_id for r in listener.received)
    assert len(received) == 150 and set(received.values()) == {1}
    assert [r.verify_error for r in listener.received if r.verify_error is not None] == []
    rows = await pool.fetch("SELECT status, attempts FROM webhook_deliveries")
    assert Counter((r["status"], r["attempts"]) for r in rows) == {("DELIVERED", 1): 150}
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 150
    assert Counter(r["status"] for r in await pool.fetch(
        "SELECT status FROM outbox_jobs WHERE kind = 'webhook.deliver'")) == {"done": 150}


# --- 7d. RecordEvents creating the same new customers at once ------------------------------------


async def test_event_batches_creating_the_same_customers_at_once_count_each_once(
        api: Api, second_server: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """20 RecordEvents calls (different request ids and events) with create_missing_customers,
    all naming the same 50 unknown customers, at once on two servers: every call succeeds, the
    created_customer_count answers add up to exactly 50, and every event is stored."""
    apis = [api, second_server]
    at = clock.now() - timedelta(hours=1)
    messages = []
    for k in range(20):
        message = _events_request(f"mk-{k}", [
            (f"mk-{k}-{c}", f"new-{c:02d}", "login", "0", at) for c in range(50)])
        message.create_missing_customers = True
        messages.append(message)
    replies = await asyncio.gather(*(_record(apis[k % 2], m) for k, m in enumerate(messages)),
                                   return_exceptions=True)
    assert _reasons(replies) == Counter()
    answers: list[Any] = list(replies)
    assert sum(r.created_customer_count for r in answers) == 50
    assert sum(r.inserted_count for r in answers) == 1000
    assert await pool.fetchval("SELECT count(*) FROM customers") == 50
    assert await pool.fetchval("SELECT count(*) FROM events") == 1000


# --- 7e. AssignProductLists of customers who have no list yet, at once ---------------------------


async def _personalized_setup(api: Api, customer_ids: list[str]) -> None:
    await prpb_grpc.ProductPromotionServiceStub(api.channel).CreatePersonalizedPromotion(
        prpb.CreatePersonalizedPromotionRequest(
            request_id="coffee", personalized_promotion=prpb.PersonalizedPromotion(
                backend_id="coffee", name="Your coffee", lock_after_first_apply=True)),
        metadata=api.key())
    await _upsert(api, "coffee-customers", [(c, "EUR", "UTC") for c in customer_ids])


async def _assign(api: Api, request_id: str, customer_ids: list[str],
                  products: list[str]) -> prpb.AssignProductListsResponse:
    return await prpb_grpc.ProductPromotionServiceStub(api.channel).AssignProductLists(
        prpb.AssignProductListsRequest(
            request_id=request_id, personalized_promotion_id="coffee",
            customer_ids=customer_ids, product_ids=products), metadata=api.key())


async def _waiting_on_transactions(pool: asyncpg.Pool, n: int) -> None:
    """Wait (polling, at most 10 s) until ``n`` sessions wait for another transaction."""
    for _ in range(1000):
        if await pool.fetchval(  # this test's database only: other tests run alongside
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'transactionid' AND NOT l.granted "
                "AND a.datname = current_database()") >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} sessions never waited for a transaction")


async def test_two_assignments_creating_the_same_lists_at_once_count_one_creation(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Two AssignProductLists calls (different request ids and product lists, one per server)
    for the same 200 customers who have no list yet. Both read "no list" and then write; the
    interleaving is pinned by a third transaction holding an uncommitted list row for the first
    customer (both calls queue on it with their read done; it then rolls back). Exactly one
    call can have created the 200 lists, so created_count must add up to 200 and replaced_count
    to 200 (answers that agree with the rows), as they do when the calls come one after the
    other."""
    ids = [f"k{i:03d}" for i in range(200)]
    await _personalized_setup(api, ids)
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            """INSERT INTO customer_product_lists (customer_id, promotion_id, product_ids,
                                                   default_product_id)
               VALUES ($1, 'coffee', '{espresso}', 'espresso')""", ids[0])
        first = asyncio.ensure_future(_assign(api, "assign-a", ids, ["espresso", "latte"]))
        second = asyncio.ensure_future(
            _assign(second_server, "assign-b", ids, ["espresso", "latte", "mocha"]))
        await _waiting_on_transactions(pool, 2)
        await tx.rollback()
    a, b = await first, await second
    assert await pool.fetchval("SELECT count(*) FROM customer_product_lists") == 200
    assert (a.created_count + b.created_count, a.replaced_count + b.replaced_count) == (
        200, 200), (a, b)


async def test_an_assignment_racing_the_lists_creation_keeps_the_recorded_first_apply(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """AssignProductListsResponse: a replaced list "keeps the products still on the new list
    ... a recorded first apply stays". An assignment that read "no list" for a customer while
    the list was being created, then chosen and applied (a stand-in transaction commits a list
    with choice "latte" and a first apply while the assignment waits between its read and its
    write), must not erase that choice and first apply when it writes: "latte" is still on
    the new list."""
    await _personalized_setup(api, ["k1"])
    async with pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            """INSERT INTO customer_product_lists (customer_id, promotion_id, product_ids,
                                                   default_product_id)
               VALUES ('k1', 'coffee', '{espresso,latte}', 'espresso')""")
        assigning = asyncio.ensure_future(
            _assign(api, "assign-late", ["k1"], ["espresso", "latte", "mocha"]))
        await _waiting_on_transactions(pool, 1)
        # What SelectProducts(latte) and the first ApplyBasket write, committed meanwhile.
        await other.execute(
            """UPDATE customer_product_lists SET chosen_product_ids = '{latte}',
                      first_apply_time = $1 WHERE customer_id = 'k1'""", clock.now())
        await tx.commit()
    answer = await assigning
    got = await prpb_grpc.ProductPromotionServiceStub(api.channel).GetCustomerProductPromotions(
        prpb.GetCustomerProductPromotionsRequest(customer_id="k1"), metadata=api.key())
    [entry] = got.promotions
    assert list(entry.product_ids) == ["espresso", "latte", "mocha"]
    assert (list(entry.chosen_product_ids), entry.HasField("first_apply_time"),
            entry.selection_locked, answer.replaced_count) == (["latte"], True, True, 1)

