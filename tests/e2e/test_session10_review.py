"""Review of session 10's changes (913ed4d..HEAD): uncounted webhook sends, denials that look
up an earlier grant, byte-bounded List pages, huge formula values, code files, value sets,
basket matching.

Defects found and fixed (each test failed before its fix):

1. A retry of the caller's own delivery job is lost from Redis after a second send without a
   free slot (workers/outbox.py:85 with storage/webhooks.py `_FINISH_SQL` own CTE). arq job ids
   are ``<queue>/outbox/<row>/<attempts>``; the runner queues the retry under the in-memory
   ``job.attempts``, which no longer matches the row once the attempt is given back. The
   second time in a row the retry gets the id of the arq job that is running, arq refuses it,
   and the delivery waits for the sweeper (PROMO_SWEEPER_INTERVAL_SECONDS, 30 s) instead of
   PROMO_JOB_RETRY_BASE_SECONDS as docs/webhooks.md says. workers/webhooks.py
   `_queue_retries` has the same problem with ``work.job_attempts`` for the other jobs.
   Now such a retry is queued under an id of its own (storage.queue.fresh_arming).
   Test: test_the_own_jobs_retry_is_queued_after_a_second_send_without_a_slot.
2. workers/metrics.py:52 only skips the attempt-duration histogram for a send that was not
   made when the delivery stays PENDING. When the deadline has passed (DEAD), a send that was
   never made is recorded as a 0 s POST in promo_webhook_attempt_duration_seconds.
   Now never observed. Test: test_a_send_never_made_is_no_attempt_duration_even_when_it_goes_dead.
3. core/money.py:81 `shown_number` (used for DryRun raw_value and stored bonus results) writes
   a tiny value out in full. A formula that gives 10^983045 can give 10^-983046 as easily,
   and that comes back as a 1 MB raw_value (and is stored that way for each customer). Only
   values of 10^100 and more are written in scientific notation.
   Now scientific below 10^-100 too, and such a value is ZERO_OR_NEGATIVE.
   Test: test_dry_run_of_a_tiny_value_has_a_small_answer.
4. core/codes.py:221 `_decode_lines` still builds a LineError for every line that is not
   UTF-8. Only the other problems were limited to the first REPORTED_LINE_ERRORS. A 10 MiB
   file of bad-UTF-8 lines takes about 33 s and 1.1 GB here, where a file of other bad lines
   takes about 2.5 s.
   Now one surrogateescape decoding, the first ten described, all counted.
   Test: test_undecodable_lines_are_counted_not_each_described.

Checked and correct (passing tests below for some of them): assign_units matches a max-flow
reference and returns a valid assignment; fit_page cuts before the budget, always sends at least
one item, and the tokens continue after the last item sent; `in` through the cached sets agrees
with `any(_equal)`; the code file names the first ten problems of both kinds in line order and
counts all of them; the placeholder pattern is linear and still strips spaces.
"""

from __future__ import annotations

import random
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from google.protobuf import wrappers_pb2

from config.settings import Settings
from core import codes as codes_module
from core.bonuses.messages import render_template, validate_template
from core.clock import FixedClock
from core.codes import REPORTED_LINE_ERRORS, CodeFileRejected, parse_code_file
from core.errors import InvalidArgument
from core.events import Channel, DeliveryStatus
from core.formula.memory import _equal, _member
from core.money import shown_number
from core.products.matching import assign_units
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import promotions_pb2 as ppb
from server.page_bytes import fit_page
from storage.queue import outbox_job_id
from tests.conftest import Api
from tests.e2e.test_expensive_inputs_audit import HUGE_VALUE, formulas, upsert
from tests.e2e.test_webhook_behaviour_audit import (
    add_listener,
    delivery_of,
    emit,
    job_of,
    worker_ctx,
)
from tests.webhook_listener import WebhookListener
from workers import metrics, webhooks
from workers.outbox import run_outbox_job

# ---------------------------------------------------------------------------------------------
# 1. Sends without a free slot
# ---------------------------------------------------------------------------------------------


async def _queued(redis: ArqRedis, queue: str, job_id: int) -> list[str]:
    prefix = f"{queue}/outbox/{job_id}/"
    members = await redis.zrange(queue, 0, -1)
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members
                  if (m.decode() if isinstance(m, bytes) else m).startswith(prefix))


async def test_the_own_jobs_retry_is_queued_after_a_second_send_without_a_slot(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener, arq_redis: ArqRedis) -> None:
    tuned = settings.model_copy(update={"webhook_concurrency": 1, "job_lease_seconds": 5})
    queue = tuned.queue_name
    listener_id = await add_listener(pool, listener.url, clock.now())
    await emit(pool, clock)
    delivery = await delivery_of(pool, listener_id)
    job_id = await job_of(pool, delivery.id)
    async with worker_ctx(tuned, pool, clock) as ctx:
        ctx["redis"] = arq_redis
        slots = ctx[webhooks.SLOTS_KEY]
        held = ("elsewhere", 1)
        await slots.acquire(held)  # the only slot, held by another host's send
        try:
            # arq runs (row, 0): no slot within half the lease, the attempt is given back.
            assert await run_outbox_job(ctx, job_id) == "pending"
            [running] = await _queued(arq_redis, queue, job_id)
            # Under an id of its own: the attempt count repeats after a give-back.
            assert running.startswith(outbox_job_id(queue, job_id, 1) + "/rearmed-"), running
            # arq runs (row, 1) at its retry time; its job key exists while it runs.
            clock.advance(timedelta(seconds=tuned.job_retry_base_seconds))
            assert await run_outbox_job(ctx, job_id) == "pending"
        finally:
            slots.release(held)
    # arq finishes (row, 1): its key and its queue entry go.
    await arq_redis.delete(job_key_prefix + running)
    await arq_redis.zrem(queue, running)
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status, attempts FROM outbox_jobs WHERE id = $1",
                                  job_id)
    assert (row["status"], row["attempts"]) == ("pending", 0), row
    # The retry due a second later must be queued somewhere, not left to the sweeper.
    assert await _queued(arq_redis, queue, job_id) != []


def _not_made_result(*, past_deadline: bool) -> Any:
    now = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    deliver_by = now - timedelta(seconds=1) if past_deadline else now + timedelta(hours=1)
    work = SimpleNamespace(deliver_by=deliver_by, run_started_at=now - timedelta(minutes=5),
                           job_max_attempts=30, job_attempts=3, channel=Channel.WEBHOOK)
    sent = webhooks._Sent(None, webhooks.NOT_SENT_ERROR, webhooks.Outcome.RETRY, 0.0, now,
                          made=False)
    settings = SimpleNamespace(job_retry_base_seconds=1.0, webhook_deadline_seconds=86400,
                               webhook_max_attempts=30, webhook_retry_max_seconds=3600)
    return webhooks._result(work, 3, sent, settings)  # type: ignore[arg-type]


def _sample(name: str, labels: dict[str, str]) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_a_send_never_made_while_pending_is_counted_as_not_sent_only() -> None:
    result = _not_made_result(past_deadline=False)
    assert (result.new_status, result.counted, result.job_status) == (
        DeliveryStatus.PENDING, False, "pending")
    assert result.retry_at == result.finished_at + timedelta(seconds=1)
    labels = {"channel": "webhook"}
    before = (_sample("promo_webhook_deliveries_total", {**labels, "outcome": "not_sent"}),
              _sample("promo_webhook_attempt_duration_seconds_count", labels))
    metrics.record_deliveries([result], [])
    after = (_sample("promo_webhook_deliveries_total", {**labels, "outcome": "not_sent"}),
             _sample("promo_webhook_attempt_duration_seconds_count", labels))
    assert (after[0] - before[0], after[1] - before[1]) == (1.0, 0.0)


def test_a_send_never_made_is_no_attempt_duration_even_when_it_goes_dead() -> None:
    result = _not_made_result(past_deadline=True)
    assert (result.new_status, result.counted) == (DeliveryStatus.DEAD, False)
    labels = {"channel": "webhook"}
    before = _sample("promo_webhook_attempt_duration_seconds_count", labels)
    metrics.record_deliveries([result], [])
    assert _sample("promo_webhook_attempt_duration_seconds_count", labels) == before


# ---------------------------------------------------------------------------------------------
# 5. Huge (and tiny) values
# ---------------------------------------------------------------------------------------------


async def test_dry_run_of_a_tiny_value_has_a_small_answer(api: Api) -> None:
    await upsert(api, "tiny")
    source = HUGE_VALUE.replace("x14 * 1000000", "1 / (x14 * 1000000)")
    answer = await formulas(api).DryRunFormula(fpb.DryRunFormulaRequest(
        source=source, customer_id="tiny", rounding=ppb.ROUNDING_MODE_ROUND, decimals=2),
        metadata=api.key())
    assert answer.skip_reason == "ZERO_OR_NEGATIVE", answer.skip_reason
    assert answer.ByteSize() < 64 * 1024, answer.ByteSize()


def test_shown_number_of_large_values_is_short_and_exact_below_the_limit() -> None:
    assert shown_number(Decimal("1E+983045")) == "1.000000E+983045"
    assert shown_number(Decimal("-1E+100")) == "-1.000000E+100"
    assert shown_number(Decimal("12.500")) == "12.5"
    assert shown_number(Decimal("1E+99")) == "1" + "0" * 99


# ---------------------------------------------------------------------------------------------
# 6. Code files
# ---------------------------------------------------------------------------------------------


def test_undecodable_lines_are_counted_not_each_described(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = 0
    original = codes_module.LineError

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal made
        made += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(codes_module, "LineError", counting)
    with pytest.raises(CodeFileRejected) as caught:
        parse_code_file(b"\xff\n" * 50_000)
    assert caught.value.count == 50_000
    assert made <= 2 * REPORTED_LINE_ERRORS, made


def test_code_file_names_the_first_problems_of_both_kinds_and_counts_all() -> None:
    lines = [b"GOOD1", b"bad code", b"\xff", b"GOOD1", b"", b"ok2"] * 30
    with pytest.raises(CodeFileRejected) as caught:
        parse_code_file(b"\n".join(lines))
    rejected = caught.value
    expected, seen = [], set()
    for number, raw in enumerate(lines, start=1):
        if raw in (b"bad code", b"\xff") or raw in seen:
            expected.append(number)
        elif raw:
            seen.add(raw)
    assert rejected.count == len(expected)
    shown = [e.line for e in rejected.errors[:REPORTED_LINE_ERRORS]]
    assert shown == expected[:REPORTED_LINE_ERRORS]
    assert rejected.metadata["error_count"] == str(len(expected))
    assert rejected.metadata["lines"] == ",".join(map(str, shown))
    assert f"and {len(expected) - REPORTED_LINE_ERRORS} more" in str(rejected)


# ---------------------------------------------------------------------------------------------
# 6. Basket matching: exact against a max-flow reference
# ---------------------------------------------------------------------------------------------


def _max_flow(demands: list[int], candidates: list[list[int]], supply: list[int]) -> int:
    sets, lines = len(demands), len(supply)
    source, sink = sets + lines, sets + lines + 1
    size = sets + lines + 2
    cap = [[0] * size for _ in range(size)]
    for s, demand in enumerate(demands):
        cap[source][s] = demand
        for line in candidates[s]:
            cap[s][sets + line] = 10**9
    for line, units in enumerate(supply):
        cap[sets + line][sink] = units
    flow = 0
    while True:
        parent = [-1] * size
        parent[source] = source
        queue = deque([source])
        while queue and parent[sink] == -1:
            u = queue.popleft()
            for v in range(size):
                if parent[v] == -1 and cap[u][v] > 0:
                    parent[v] = u
                    queue.append(v)
        if parent[sink] == -1:
            return flow
        push, v = 10**9, sink
        while v != source:
            push = min(push, cap[parent[v]][v])
            v = parent[v]
        v = sink
        while v != source:
            cap[parent[v]][v] -= push
            cap[v][parent[v]] += push
            v = parent[v]
        flow += push


def test_assign_units_finds_an_assignment_whenever_one_exists() -> None:
    rng = random.Random(10)
    for _ in range(4000):
        lines = rng.randint(1, 5)
        sets = rng.randint(1, 4)
        supply = [rng.randint(0, 3) for _ in range(lines)]
        candidates = [rng.sample(range(lines), rng.randint(1, lines)) for _ in range(sets)]
        demands = [rng.randint(0, 4) for _ in range(sets)]
        feasible = _max_flow(demands, candidates, supply) == sum(demands)
        plan = assign_units(demands, candidates, supply)
        assert (plan is not None) == feasible, (demands, candidates, supply, plan)
        if plan is None:
            continue
        used = [0] * lines
        for s, held in enumerate(plan):
            assert sum(held.values()) == demands[s], (demands, candidates, supply, plan)
            assert all(units > 0 and line in candidates[s] for line, units in held.items())
            for line, units in held.items():
                used[line] += units
        assert all(u <= s for u, s in zip(used, supply, strict=True)), (supply, plan)


# ---------------------------------------------------------------------------------------------
# 3. Byte-bounded pages; 6. value sets; 4. placeholders
# ---------------------------------------------------------------------------------------------


def test_fit_page_cuts_before_the_budget_and_always_sends_one_item() -> None:
    rows = [("a" * 100, i) for i in range(10)]

    def to_pb(row: tuple[str, int]) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=row[0])

    size = to_pb(rows[0]).ByteSize() + 6
    page, messages, more = fit_page(rows, False, to_pb, budget=3 * size)
    assert (len(page), len(messages), more) == (3, 3, True)
    assert page[-1] == rows[2]  # the token continues after the last item sent
    page, messages, more = fit_page(rows, False, to_pb, budget=1)
    assert (len(page), more) == (1, True)
    page, messages, more = fit_page(rows, False, to_pb, budget=10 * size)
    assert (len(page), more) == (10, False)
    page, messages, more = fit_page(rows, True, to_pb, budget=10 * size)
    assert (len(page), more) == (10, True)


def test_in_through_cached_sets_agrees_with_equality() -> None:
    rng = random.Random(3)
    pool: list[Any] = ["a", "b", "1", Decimal("1"), Decimal("1.0"), Decimal("2.50"),
                       Decimal("-0"), Decimal("0")]
    actuals: list[Any] = [*pool, 1, 0, True, False, None, Decimal("NaN"), Decimal("2.5"), "2.5"]
    for _ in range(500):
        values = tuple(rng.sample(pool, rng.randint(1, len(pool))))
        for actual in actuals:
            assert _member(actual, values) == any(_equal(actual, v) for v in values), (
                actual, values)


def test_placeholders_with_spaces_still_work_and_a_long_run_is_refused_at_once() -> None:
    text = validate_template("got {{  event.bonus_amount }} ({{event.currency}})", field="t")
    assert render_template(text, {"bonus_amount": "5", "currency": "EUR"}) == "got 5 (EUR)"
    started = time.perf_counter()
    with pytest.raises(InvalidArgument):
        validate_template("{{" + " " * 1998, field="t")
    assert time.perf_counter() - started < 0.5
