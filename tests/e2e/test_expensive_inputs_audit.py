"""Small inputs that are expensive to process: CPU or memory denial of service.

Every call below stays within the documented limits. Expected: it finishes (or is refused with
INVALID_ARGUMENT) in well under a second, and the server stays responsive meanwhile. The server
of these tests runs on the test's own event loop, as in production on one loop per process, so
a call that computes for seconds synchronously delays every other call of that process: the
longest stall of the event loop during the call is measured where it matters.

DEFECTS, all fixed (each test failed before its fix; times of one call here before, on a
2-core machine; "stall": the longest time the server's event loop, so every other call of
that process, was blocked meanwhile):

1. ValidateFormula / DryRunFormula take any number of variables (server/formulas.py:59-82, no
   count check; bonus definitions allow 50, core/bonuses/definitions.py:41,188), and an
   unknown name in the formula runs difflib.get_close_matches over every variable name
   (core/formula/compiler.py:423-424), ~1 ms per 199-character name (names under 200
   characters escape difflib's autojunk). 2,500 variables (a 0.5 MB request) and one unknown
   name: 2.4-2.7 s, all of it a stall; 32 MiB of them: minutes. The same request with a known
   name: 0.25 s. Should be refused past 50 variables (as for definitions) or the hint bounded.
   Now at most 50 variables (INVALID_VARIABLE).
   test_unknown_name_hint_over_many_formula_variables_is_cheap
2. DryRunFormula of a 300-character formula squaring a 30-digit number 15 times
   (x1 = x0 * x0 ...: 10^983045, under the decimal context's Emax) answers 5,898,483 bytes:
   the value is written out in full in raw_value (server/formulas.py:172 via
   core/money.py:plain), amount, value_after_rounding and value_after_cap (the rounding
   context is sized from the value, core/rounding.py:_context_for, so ROUND with 8 places
   makes a million digits) and twice in the explanation (core/formula/evaluator.py:154,184).
   The default client gets RESOURCE_EXHAUSTED ("Received message larger than max"), contrary
   to README's "Answers stay under gRPC's default 4 MiB client limit". Should skip such a value
   (as results do with AMOUNT_TOO_LARGE) and never print more than a few dozen digits.
   Now a value of 28 integer digits or more is not rounded (SKIPPED AMOUNT_TOO_LARGE, or the
   cap) and is shown in scientific notation (core.money.shown_number).
   test_dry_run_of_a_huge_value_has_a_small_answer
3. The same formula in a dynamic-bonus batch: each result is SKIPPED (AMOUNT_TOO_LARGE) but its
   row stores raw_value (storage/bonuses.py:613-614, ~1 MB) and the explanation
   (storage/bonuses.py:989, ~2 MB): 2,949,292 characters per customer, so one request for the
   allowed 10,000 customers writes ~30 GB (and the worker holds a chunk's worth in memory).
   Now stored in scientific notation too. test_bonus_batch_of_a_huge_value_stores_small_rows
4. UploadCodes: a file of bad lines builds a LineError with an f-string for every one of them
   (core/codes.py:169-184; only 10 are reported), on the event loop (server/codes.py:96), ~3 us
   per line against ~0.1 us on the fast path: 1.5 MiB of ",\\n" (786,432 lines) take 2.9-3.9 s,
   1 MiB 1.9 s, all a stall; in-process the allowed 10 MiB take 14 s and 870 MB of memory
   (duplicates "a\\n": 19 s, 1.3 GB). A good file of 200,000 lines: 1.8 s, stall 0.15 s.
   Should count the lines past the reported ones without building them, off the event loop.
   Now only the reported lines are described (the rest counted), and files from 256 KiB on
   are parsed on a thread. test_code_file_of_bad_lines_is_rejected_quickly
5. EvaluateBasket: a product-set discount whose sets share products (one set of all 1,000
   products needing 900, eight sets of the first 100 needing 11 each, the discounted set of
   all needing 13: one unit short) fails the in-order matching, then
   core/products/matching.py:assign_units moves ~1,000 single units, each found by a
   breadth-first search over 1,000 lines x 10 sets (matching.py:38-58, the inner loop over
   every set per line), and fails: ~1.2 s per such discount, for every basket, on the event
   loop (server/products.py:154). Two such discounts: 2.2-3.0 s per call, all a stall.
   Now a set's first free line is found by a pointer that only moves forward, each line knows
   its holders, and more units wanted than all lines have is refused at once.
   test_basket_with_overlapping_sets_is_evaluated_quickly
6. RecordEvents with an automation rule whose filter is `game not in (...)` with 4,900 values
   (9,800 characters, under the 10,000 limit; repeated values allowed): filter_matches compares
   every value for every event (core/formula/memory.py:88-91, via core/bonuses/rules.py:246
   from storage/bonus_triggers.py:250), ~2-3 ms per event per rule, on the event loop: 800
   events 3.2 s (stall 2.4 s), 1,000 up to 4.3 s, the allowed 10,000 ~20-30 s, per rule.
   Should match through a set (or dedupe and cap the list). Now through sets.
   test_rule_filter_with_a_long_value_list_records_events_quickly

CHECKED AND FOUND CORRECT (fast, bounded):
- every `re` pattern in core/, server/, storage/ (ids, names, kinds, currencies, decimals,
  NUMERIC_ATTRIBUTE, codes, secret keys of the activation context, reward formula positions):
  bounded quantifiers or single alternations, linear; the placeholder one was already fixed;
- decimals of a million digits / exponents ("9"*10^6, "1e"+"9"*10^6, "0."+"0"*10^6+"1"):
  INVALID_DECIMAL at once; the formula language has no power operator, numbers are at most
  30 characters, round() takes 0..8 places, floor of huge values is cheap, overflow past
  Emax is a TYPE_ERROR skip;
- formulas of 10,000 characters (flat sums, repeated nesting at the allowed depth, 64
  aggregates with long filter lists, 9,999 newlines or unary minuses, long unknown names,
  150 chained squarings): answered in 0.1-0.4 s; a DryRun of 64 filtered aggregates over
  1,000 events 0.5 s (one SQL query); evaluating a compiled 10,000-character formula for one
  customer is linear (~0.1 ms: no loops, memoised names), so batches and GetReward are not
  slowed by the formula itself;
- GetReward with a CALCULATED formula of value 10^983045: cut to the type's maximum, fast;
  GetReward with 50,000 context entries: logged entries bounded, fast;
- time zone names (100,000 characters, "../" traversals, directories, tzdata.zi):
  INVALID_TIME_ZONE at once; page tokens (1 MB, 50,000-deep JSON, 4,300-digit integers):
  INVALID_PAGE_TOKEN at once; listener URLs of 2,048 characters of brackets, colons and
  percent signs: INVALID_URL (or accepted) at once.
"""

from __future__ import annotations

import asyncio
import base64
import random
import string
import time
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import codes_pb2 as codepb
from promo.v1 import codes_pb2_grpc as codepb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import products_pb2 as prodpb
from promo.v1 import products_pb2_grpc as prodpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import ts
from tests.e2e.code_helpers import code_promotion, pool_counts
from tests.e2e.promo_helpers import get_reward, promotion, reward_type

MiB = 1024 * 1024
FAST = 1.5  # seconds: generous for a noisy 2-core machine where the healthy time is ms
NAME_CHARS = string.ascii_letters + string.digits + "_"

# A 30-digit number squared 15 times: 10^983045, under the decimal context's Emax (999,999).
HUGE_VALUE = "\n".join(
    ["x0 = 999999999999999999999999999999 * 999999999999999999999999999999",
     *(f"x{i} = x{i - 1} * x{i - 1}" for i in range(1, 15)), "x14 * 1000000"])


# --- helpers ----------------------------------------------------------------------------------


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    """(the answer or the grpc error, seconds)."""
    start = time.perf_counter()
    try:
        result: Any = await call
    except grpc.aio.AioRpcError as error:
        result = error
    return result, time.perf_counter() - start


async def with_loop_stall(call: Awaitable[Any]) -> tuple[Any, float, float]:
    """(answer or error, seconds of ``call``, the longest stall of the event loop meanwhile).

    The server runs on this test's event loop (as in production, one loop per process), so
    the longest time a ticker here waited beyond its 5 ms sleep is the longest time every other
    call of that server process waited."""
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            stall = max(stall, time.perf_counter() - before - 0.005)

    watcher = asyncio.ensure_future(ticker())
    try:
        result, elapsed = await timed(call)
    finally:
        done = True
        await watcher
    return result, elapsed, stall


def reason_of(result: Any) -> str | None:
    if isinstance(result, grpc.aio.AioRpcError):
        info = error_info_of(result)
        return info.reason if info is not None else result.code().name
    return None


def formulas(api: Api) -> fpb_grpc.FormulaServiceStub:
    return fpb_grpc.FormulaServiceStub(api.channel)


def customers_stub(api: Api) -> custpb_grpc.CustomerServiceStub:
    return custpb_grpc.CustomerServiceStub(api.channel)


async def upsert(api: Api, *ids: str) -> None:
    await customers_stub(api).UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id=f"cust-{ids[0]}", customers=[
            custpb.Customer(customer_id=c, currency="EUR", time_zone="UTC") for c in ids]),
        metadata=api.key())


def shuffled_name(rng: random.Random, length: int = 199) -> str:
    """An identifier of ``length`` characters, each character at most 4 times: no character
    is "popular" for difflib, so its SequenceMatcher does the full work."""
    chars = list((NAME_CHARS * 4)[:length - 1])
    rng.shuffle(chars)
    return "z" + "".join(chars)


# --- 1. formula variables and the "did you mean" hint -----------------------------------------


async def test_many_formula_variables_with_a_known_name_are_cheap(api: Api) -> None:
    """50 variables (the limit, as a bonus definition's) are cheap; 2,500 are refused at once
    with INVALID_VARIABLE (they were accepted, and an unknown name's hint took 2.5 s)."""
    rng = random.Random(7)
    names = [shuffled_name(rng) for _ in range(2_500)]
    variables = [fpb.FormulaVariable(name=n, value="1") for n in names]
    answer, elapsed = await timed(formulas(api).ValidateFormula(fpb.ValidateFormulaRequest(
        source=f"{names[0]} * 2", variables=variables[:50]), metadata=api.key()))
    assert reason_of(answer) is None, answer
    assert elapsed < FAST, elapsed
    answer, elapsed = await timed(formulas(api).ValidateFormula(fpb.ValidateFormulaRequest(
        source=f"{names[0]} * 2", variables=variables), metadata=api.key()))
    assert reason_of(answer) == "INVALID_VARIABLE", answer
    assert elapsed < FAST, elapsed


async def test_unknown_name_hint_over_many_formula_variables_is_cheap(api: Api) -> None:
    rng = random.Random(7)
    variables = [fpb.FormulaVariable(name=shuffled_name(rng), value="1") for _ in range(2_500)]
    request = fpb.ValidateFormulaRequest(source=f"{shuffled_name(rng)} * 2", variables=variables)
    answer, elapsed, stall = await with_loop_stall(
        formulas(api).ValidateFormula(request, metadata=api.key()))
    assert reason_of(answer) is not None  # unknown name, or too many variables
    assert elapsed < FAST and stall < FAST, (elapsed, stall)


# --- 2, 3. values of a million digits ---------------------------------------------------------


async def test_dry_run_of_a_huge_value_has_a_small_answer(api: Api) -> None:
    await upsert(api, "huge")
    answer, elapsed = await timed(formulas(api).DryRunFormula(fpb.DryRunFormulaRequest(
        source=HUGE_VALUE, customer_id="huge", rounding=ppb.ROUNDING_MODE_ROUND, decimals=8),
        metadata=api.key()))
    assert not isinstance(answer, grpc.aio.AioRpcError), (answer.code(), answer.details())
    assert answer.ByteSize() < 64 * 1024, answer.ByteSize()
    assert elapsed < FAST, elapsed


async def test_dry_run_of_an_overflowing_value_is_a_cheap_skip(api: Api) -> None:
    await upsert(api, "over")
    source = HUGE_VALUE.replace("x14 * 1000000", "x15 = x14 * x14\nx15")
    answer, elapsed = await timed(formulas(api).DryRunFormula(fpb.DryRunFormulaRequest(
        source=source, customer_id="over", rounding=ppb.ROUNDING_MODE_ROUND, decimals=8),
        metadata=api.key()))
    assert reason_of(answer) is None, answer
    assert answer.outcome == fpb.DRY_RUN_OUTCOME_SKIPPED and answer.skip_reason == "TYPE_ERROR"
    assert answer.ByteSize() < 64 * 1024 and elapsed < FAST, (answer.ByteSize(), elapsed)


async def test_bonus_batch_of_a_huge_value_stores_small_rows(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await bonus_api.create(api, bonus_api.definition(
        "huge", HUGE_VALUE, data_mode=bpb.BONUS_DATA_MODE_PROPERTIES_ONLY, period=None,
        rounding=ppb.ROUNDING_MODE_ROUND, decimals=6))
    ids = [f"h{i}" for i in range(3)]
    await upsert(api, *ids)
    await bonus_api.request(api, "huge", ids, "req-huge")
    clock.advance(timedelta(minutes=5))
    start = time.perf_counter()
    assert await bonus_api.run_due_batches(pool, settings, clock) == 1
    elapsed = time.perf_counter() - start
    rows = await pool.fetch(
        """SELECT status, skip_reason, length(coalesce(raw_value, '')) AS raw,
                  length(coalesce(explanation, '')) AS explained FROM bonus_results""")
    assert len(rows) == 3
    assert all(r["skip_reason"] == "AMOUNT_TOO_LARGE" for r in rows), rows
    largest = max(r["raw"] + r["explained"] for r in rows)
    assert largest < 10_000, f"{largest:,} characters stored for one customer"
    assert elapsed < FAST * 2, elapsed


async def test_get_reward_with_a_huge_calculated_value_is_cut_quickly(api: Api) -> None:
    await reward_type(api, "cashback", max_value="100")
    await promotion(api, "HUGE", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED, formula=HUGE_VALUE,
        rounding=ppb.ROUNDING_MODE_ROUND, decimals=6)])
    await upsert(api, "g1")
    answer, elapsed = await timed(get_reward(api, "g1", "HUGE"))
    assert reason_of(answer) is None, answer
    assert answer.ByteSize() < 64 * 1024 and elapsed < FAST, (answer.ByteSize(), elapsed)
    assert "100" in str(answer), answer


# --- formulas: the worst 10,000 characters ----------------------------------------------------


WORST_FORMULAS = {
    "flat sum of 5,000 terms": "+".join(["1"] * 5_000)[:9_999],
    "190 times 24 nested parentheses": "+".join(["(" * 24 + "1" + ")" * 24] * 190),
    "64 aggregates with long filters": "+".join(
        f"sum(deposit.amount where game in ({', '.join(f'{j}' for j in range(i, i + 30))}))"
        for i in range(64)),
    "9,999 newlines": "\n" * 9_999 + "1",
    "long unknown name": "a" * 9_999,
    "9,999 unary minuses": "-" * 9_999 + "1",
    "deep chain of names": "\n".join(
        ["a0 = 1", *(f"a{i} = a{i - 1} * a{i - 1}" for i in range(1, 150)), "a149"]),
}


@pytest.mark.parametrize("label", sorted(WORST_FORMULAS))
async def test_worst_formulas_compile_quickly(api: Api, label: str) -> None:
    source = WORST_FORMULAS[label]
    assert len(source) <= 10_000
    answer, elapsed = await timed(formulas(api).ValidateFormula(
        fpb.ValidateFormulaRequest(source=source), metadata=api.key()))
    assert reason_of(answer) in (None, "FORMULA_INVALID", "FORMULA_SYNTAX"), answer
    assert elapsed < FAST, elapsed


async def test_dry_run_with_64_filtered_aggregates_over_1000_events(api: Api,
                                                                    clock: FixedClock) -> None:
    await upsert(api, "agg")
    await customers_stub(api).RecordEvents(custpb.RecordEventsRequest(
        request_id="agg-events", events=[custpb.Event(
            external_id=f"e{i}", customer_id="agg", kind="deposit", amount=f"{i}.5",
            currency="EUR", occurred_at=ts(clock.now() - timedelta(minutes=i + 1)),
            attributes={"game": str(i % 97)}) for i in range(1_000)]), metadata=api.key())
    source = WORST_FORMULAS["64 aggregates with long filters"]
    answer, elapsed = await timed(formulas(api).DryRunFormula(fpb.DryRunFormulaRequest(
        source=source, customer_id="agg", period=fpb.TransactionPeriod(
            time_back=fpb.TransactionPeriod.TimeBack(amount=1, unit=fpb.TIME_UNIT_DAYS))),
        metadata=api.key()))
    assert reason_of(answer) is None, answer
    assert answer.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT and len(answer.aggregates) == 64
    assert elapsed < FAST, elapsed


# --- 4. promo code files ----------------------------------------------------------------------


async def stream(api: Api, code: str, request_id: str, data: bytes) -> codepb.UploadCodesResponse:
    async def messages() -> Any:
        yield codepb.UploadCodesRequest(promotion_code=code, request_id=request_id,
                                        data=data[:MiB])
        for offset in range(MiB, len(data), MiB):
            yield codepb.UploadCodesRequest(data=data[offset:offset + MiB])

    return await codepb_grpc.CodePoolServiceStub(api.channel).UploadCodes(
        messages(), metadata=api.key())


async def test_code_file_of_bad_lines_is_rejected_quickly(api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "FLASH")
    answer, elapsed, stall = await with_loop_stall(
        stream(api, "FLASH", "up-commas", b",\n" * (3 * MiB // 4)))
    assert reason_of(answer) == "CODE_FILE_REJECTED", answer
    assert await pool_counts(pool, "FLASH") == (0, 0, 0)
    assert elapsed < FAST and stall < FAST, (elapsed, stall)


async def test_code_file_of_many_short_valid_lines_is_quick(api: Api) -> None:
    """The baseline: a good file of as many lines takes the fast path (the database's COPY
    takes most of the time, off the event loop)."""
    await code_promotion(api, "FLASH")
    data = b"".join(b"%x\n" % i for i in range(200_000))  # 1.2 MB, 200,000 codes
    answer, elapsed, stall = await with_loop_stall(stream(api, "FLASH", "up-short", data))
    assert reason_of(answer) is None, answer
    assert answer.codes_added == 200_000
    assert stall < FAST / 2 and elapsed < FAST * 4, (elapsed, stall)


# --- 5. baskets -------------------------------------------------------------------------------


PRODUCTS = [f"p{i:04d}" for i in range(1_000)]


def overlapping_discount(discount_id: str) -> prodpb.ProductSetDiscount:
    """Sets sharing products so that the in-order matching fails and the exact assignment
    moves single units for a long time before it fails too (one unit short)."""
    sets = [prodpb.ProductSet(name="wide", product_ids=PRODUCTS, required_quantity=900)]
    sets += [prodpb.ProductSet(name=f"narrow {k}", product_ids=PRODUCTS[:100],
                               required_quantity=11) for k in range(8)]
    sets.append(prodpb.ProductSet(name="discounted", product_ids=PRODUCTS, required_quantity=13,
                                  gets_discount=True, discounted_quantity=1))
    return prodpb.ProductSetDiscount(discount_id=discount_id, name=discount_id,
                                     discount_type=prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF,
                                     value="10", product_sets=sets)


async def test_basket_with_overlapping_sets_is_evaluated_quickly(api: Api) -> None:
    await upsert(api, "shopper")
    stub = prodpb_grpc.ProductPromotionServiceStub(api.channel)
    for discount_id in ("overlap-a", "overlap-b"):
        await stub.CreateProductSetDiscount(prodpb.CreateProductSetDiscountRequest(
            request_id=discount_id, product_set_discount=overlapping_discount(discount_id)),
            metadata=api.key())
    request = prodpb.EvaluateBasketRequest(customer_id="shopper", lines=[
        prodpb.BasketLine(product_id=p, quantity=1, unit_price="1.00") for p in PRODUCTS])
    answer, elapsed, stall = await with_loop_stall(
        stub.EvaluateBasket(request, metadata=api.key()))
    assert reason_of(answer) is None, answer
    assert [o.applied for o in answer.evaluation.outcomes] == [False, False]
    assert elapsed < FAST and stall < FAST, (elapsed, stall)


# --- 6. automation rule filters ---------------------------------------------------------------


async def test_rule_filter_with_a_long_value_list_records_events_quickly(
        api: Api, clock: FixedClock) -> None:
    await bonus_api.create(api, bonus_api.definition("bets", "sum(bet.amount) * 10%"))
    values = ",".join(str(i % 10) for i in range(4_900))
    rule_filter = f"game not in ({values})"
    assert len(rule_filter) < 10_000
    await bonus_api.rule(api, bpb.BonusRule(
        rule_id="long-filter", definition_id="bets", event_kind="bet", filter=rule_filter,
        every=1_000_000, period_mode=bpb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    await upsert(api, "bettor")
    request = custpb.RecordEventsRequest(request_id="bets", events=[custpb.Event(
        external_id=f"b{i}", customer_id="bettor", kind="bet", amount="1", currency="EUR",
        occurred_at=ts(clock.now() - timedelta(seconds=i + 1)), attributes={"game": "x"})
        for i in range(800)])
    answer, elapsed, stall = await with_loop_stall(
        customers_stub(api).RecordEvents(request, metadata=api.key()))
    assert reason_of(answer) is None, answer
    assert elapsed < FAST and stall < FAST, (elapsed, stall)


# --- other parsed text: decimals, time zones, page tokens, URLs, context ----------------------


DECIMALS = {
    "a million nines": "9" * 1_000_000,
    "an exponent of a million digits": "1e" + "9" * 1_000_000,
    "a million zeros after the point": "0." + "0" * 1_000_000 + "1",
    "a million-digit negative exponent": "5e-" + "9" * 1_000_000,
}


@pytest.mark.parametrize("label", sorted(DECIMALS))
async def test_long_decimals_are_refused_at_once(api: Api, label: str) -> None:
    answer, elapsed = await timed(rtpb_grpc.RewardTypeServiceStub(api.channel).CreateRewardType(
        rtpb.CreateRewardTypeRequest(request_id="rt", reward_type=rtpb.RewardType(
            name="cash", display_name="Cash", category=1, max_value=DECIMALS[label])),
        metadata=api.key()))
    assert reason_of(answer) == "INVALID_DECIMAL", answer
    assert elapsed < FAST, elapsed


ZONES = ["A" * 100_000, "../" * 2_000 + "UTC", "Europe/" * 5_000 + "Berlin", "Europe",
         "tzdata.zi", "zone1970.tab", "/dev/zero", "Etc/" + "GMT+1" * 10_000]


async def test_odd_time_zone_names_are_refused_at_once(api: Api, clock: FixedClock) -> None:
    await upsert(api, "tz")
    for zone in ZONES:
        answer, elapsed = await timed(formulas(api).DryRunFormula(fpb.DryRunFormulaRequest(
            source="count(deposit) + 1", customer_id="tz", period=fpb.TransactionPeriod(
                fixed=fpb.TransactionPeriod.Fixed(
                    start=ts(clock.now() - timedelta(days=1)), end=ts(clock.now()),
                    time_zone=zone))), metadata=api.key()))
        assert reason_of(answer) == "INVALID_TIME_ZONE", (zone[:20], answer)
        assert elapsed < FAST, (zone[:20], elapsed)


def token(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


TOKENS = {
    "1 MB of JSON": token(b'{"a": ["' + b"x" * MiB + b'"], "f": "0", "c": "0"}'),
    "50,000 nested lists": token(b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    "4,300-digit integers": token(b'{"a": [' + b",".join([b"9" * 4_300] * 200) + b"]}"),
    "4,301-digit integer": token(b'{"a": [' + b"9" * 4_301 + b"]}"),
    "a million characters of garbage": "A" * 1_000_000,
}


@pytest.mark.parametrize("label", sorted(TOKENS))
async def test_forged_page_tokens_are_refused_at_once(api: Api, label: str) -> None:
    answer, elapsed = await timed(rtpb_grpc.RewardTypeServiceStub(api.channel).ListRewardTypes(
        rtpb.ListRewardTypesRequest(page_token=TOKENS[label]), metadata=api.key()))
    assert reason_of(answer) == "INVALID_PAGE_TOKEN", answer
    assert elapsed < FAST, elapsed


URLS = ["http://" + "[" * 2_041, "http://a:" + "9" * 2_039, "https://" + "%" * 2_040,
        "http://[" + ":" * 2_038 + "]", "http://a/" + "?#" * 1_019, "http://" + "a." * 1_020,
        "http://" + "\u00e9" * 2_041]


async def test_pathological_listener_urls_are_handled_at_once(api: Api) -> None:
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    for index, url in enumerate(URLS):
        assert len(url) <= 2_048
        answer, elapsed = await timed(stub.RegisterListener(lpb.RegisterListenerRequest(
            request_id=f"l{index}", listener=lpb.Listener(
                event_type=lpb.EVENT_TYPE_CAMPAIGN_EXECUTED, url=url)), metadata=api.key()))
        assert reason_of(answer) in (None, "INVALID_URL"), (url[:20], answer)
        assert elapsed < FAST, (url[:20], elapsed)


async def test_get_reward_with_a_huge_context_map_is_quick(api: Api) -> None:
    await reward_type(api)
    await promotion(api)
    await upsert(api, "ctx")
    context = {f"{i:06d}-password-token-" + "k" * 40: "v" * 100 for i in range(50_000)}
    answer, elapsed = await timed(get_reward(api, "ctx", context=context))
    assert reason_of(answer) in (None, "INVALID_CONTEXT", "INVALID_ARGUMENT"), answer
    assert elapsed < FAST * 2, elapsed
