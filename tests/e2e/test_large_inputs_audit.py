"""Large inputs and documented limits: at the limit, one past it, far past it.

For every RPC that takes a list or a blob, the documented limit is sent and must be applied in
full; one past it (and far past it) must be a clear INVALID_ARGUMENT naming the limit, with
nothing written (checked in the database). tests/e2e/test_fuzz_audit.py covers single hostile
fields (only "never INTERNAL"); this file checks the limits' exact edges and what was stored.

Found correct: UpsertCustomers and RecordEvents (10,000 / 10,001 / 100,000: BATCH_TOO_LARGE,
nothing stored, not even the request id); UploadCodes (a 1 MiB message and a file of exactly
10 MiB accepted; 1 MiB + 1, a 3 MB message, 10 MiB + 1: UPLOAD_CHUNK_TOO_LARGE /
CODE_FILE_TOO_LARGE, nothing added; 100,000 bad lines summarised in a short message);
CreateCampaign / AddCampaignTargets / ForecastCampaign (100,000 / 100,001), campaign promotions
(20 / 21), UpdateCustomerPromotionStatus (10,000 / 10,001, nothing applied);
RequestBonusCalculation (10,000 / 10,001), ApproveBonusResults (1,000 / 1,001, no ledger entry);
message templates (2,000 / 2,001) and variables (50 / 51); BonusSchedule (100,001 refused);
AssignProductLists / RemoveProductLists (10,000 customers, 1,000 products / one more),
product-set discounts (10 sets of 1,000 products / 11 sets, 1,001 products), EvaluateBasket
(1,000 / 1,001 lines); formulas (10,000 / 10,001 / 100,000 characters, 150 chained steps /
400, 9,999 nested unary minuses refused at once).

Defects found and fixed (each test failed before its fix):

1. The server's receive limit (server/app.py:79, grpc.max_receive_message_length 32 MiB) is
   documented nowhere, and the documented per-item limits allow requests far larger (10,000
   customers x 100 properties x 1,000 characters, 10,000 events x 50 attributes x 500
   characters). 350 customers with full properties (36 MB, 3.5% of the batch limit) get a bare
   RESOURCE_EXHAUSTED from gRPC core ("Received message larger than max"), without the
   ErrorInfo every error is documented to carry. Now README ("Message sizes") documents the
   limit, the bare RESOURCE_EXHAUSTED and splitting batches by size.
   test_documented_valid_upsert_over_32_mib_is_refused_as_documented
2. ListCustomers pages by count only (server/customers.py:145, core/pagination.py:38): 50
   customers within the documented property limits are a 5 MB page, which a default client
   (4 MB receive limit) cannot read: the DEFAULT page fails with RESOURCE_EXHAUSTED, so those
   customers cannot be listed at all. Now every List page also ends before the item that
   would pass 3 MiB (server/page_bytes.py).
   test_list_customers_default_page_reaches_a_default_client
3. GetProcessedCampaignCustomers (server/campaigns.py:214, 224-225): the documented page of
   10,000 repeats every promotion code (up to 20, 64 characters each) on each customer; with
   20 codes of 40 characters the page is 8.5 MB and a default listener client fails with
   RESOURCE_EXHAUSTED. Now bounded the same way.
   test_largest_clearance_page_reaches_a_default_client
4. CreateBonusSchedule (server/bonuses.py:307-309, limit core/bonuses/rules.py:339) echoes all
   of the up to 100,000 customer ids in its answer (and ListBonusSchedules in every page): 100,000
   ids of 48 characters make a 5 MB answer, so the client gets RESOURCE_EXHAUSTED although the
   schedule WAS created (a retry then replays the same oversized answer). Now the ids may take
   at most 3 MiB (INVALID_BONUS_RULE naming the cap and campaign_id as the way out).
   test_schedule_with_100000_customers_is_answered
5. Message templates (CreateBonusDefinition / UpdateBonusDefinition): the placeholder regex
   core/bonuses/messages.py:23 (run at :35 and :44) backtracks cubically on "{{" followed by
   spaces with no "}}": 800 characters take ~1.2 s, the allowed 2,000 ~16 s, all on the
   server's event loop (every other call of that process waits). Now a linear pattern, the
   spaces stripped in Python. test_unclosed_placeholder_template_is_refused_quickly
6. Formula nesting (core/formula/parser.py:389-391) counts the innermost operand as a level, so
   50 nested operations ("-" x 50 + "1", or 1+(1+(...)) 50 deep) are refused as "nested more
   than 50 levels", while the contract (formulas.proto: "50 levels of nesting") allows 50; 49
   is the real limit. Now a leaf is no level. test_formula_nested_50_levels_is_accepted
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import campaigns_pb2_grpc as campb_grpc
from promo.v1 import codes_pb2 as codepb
from promo.v1 import codes_pb2_grpc as codepb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import products_pb2 as prodpb
from promo.v1 import products_pb2_grpc as prodpb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import ts
from tests.e2e.code_helpers import code_promotion, pool_counts
from tests.e2e.promo_helpers import promotion, reward_type

MiB = 1024 * 1024


def readme_text() -> str:
    return (Path(__file__).resolve().parents[2] / "README.md").read_text()


# --- helpers ----------------------------------------------------------------------------------


def customers_stub(api: Api) -> custpb_grpc.CustomerServiceStub:
    return custpb_grpc.CustomerServiceStub(api.channel)


def campaigns_stub(api: Api) -> campb_grpc.CampaignServiceStub:
    return campb_grpc.CampaignServiceStub(api.channel)


def clearance_stub(api: Api) -> campb_grpc.ClearanceServiceStub:
    return campb_grpc.ClearanceServiceStub(api.channel)


def products_stub(api: Api) -> prodpb_grpc.ProductPromotionServiceStub:
    return prodpb_grpc.ProductPromotionServiceStub(api.channel)


def bonus_stub(api: Api) -> bpb_grpc.BonusServiceStub:
    return bpb_grpc.BonusServiceStub(api.channel)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """The call's error; fails the test when it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        await call
    error = caught.value
    assert isinstance(error, grpc.aio.AioRpcError)
    return error


def check_limit_error(error: grpc.aio.AioRpcError, reason: str, *names: str) -> None:
    """A clear refusal: INVALID_ARGUMENT, a google.rpc ErrorInfo with ``reason``, and a message
    naming each of ``names`` (the limit, the field)."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    info = error_info_of(error)
    assert info is not None, error.details()
    assert info.reason == reason, (info.reason, error.details())
    for name in names:
        assert name in (error.details() or ""), (name, error.details())


async def count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    value = await pool.fetchval(sql, *args)
    return int(value)


async def upsert_customers(api: Api, ids: list[str], request_id: str) -> None:
    for start in range(0, len(ids), 10_000):
        await customers_stub(api).UpsertCustomers(custpb.UpsertCustomersRequest(
            request_id=f"{request_id}-{start}", customers=[
                custpb.Customer(customer_id=c, currency="EUR") for c in ids[start:start + 10_000]]),
            metadata=api.key("runtime"))


def event(external_id: str, customer_id: str, when: datetime,
          attributes: dict[str, str] | None = None) -> custpb.Event:
    return custpb.Event(external_id=external_id, customer_id=customer_id, kind="deposit",
                        amount="10", currency="EUR", occurred_at=ts(when),
                        attributes=attributes or {})


# --- customers and events ---------------------------------------------------------------------


async def test_upsert_customers_at_limit_and_past(api: Api, pool: asyncpg.Pool) -> None:
    stub = customers_stub(api)
    response = await stub.UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id="up-limit", customers=[custpb.Customer(customer_id=f"c{i:05d}")
                                          for i in range(10_000)]), metadata=api.key("runtime"))
    assert response.created_count == 10_000
    assert await count(pool, "SELECT count(*) FROM customers") == 10_000

    for n in (10_001, 100_000):
        error = await refused(stub.UpsertCustomers(custpb.UpsertCustomersRequest(
            request_id=f"up-{n}", customers=[custpb.Customer(customer_id=f"x{i:06d}")
                                             for i in range(n)]), metadata=api.key("runtime")))
        check_limit_error(error, "BATCH_TOO_LARGE", "10,000")
    assert await count(pool, "SELECT count(*) FROM customers") == 10_000
    assert await count(pool, "SELECT count(*) FROM idempotency_keys") == 1


async def test_record_events_at_limit_and_past(api: Api, pool: asyncpg.Pool,
                                               clock: FixedClock) -> None:
    stub = customers_stub(api)
    when = clock.now() - timedelta(hours=1)
    response = await stub.RecordEvents(custpb.RecordEventsRequest(
        request_id="ev-limit", create_missing_customers=True,
        events=[event(f"e{i:05d}", f"c{i % 500:03d}", when) for i in range(10_000)]),
        metadata=api.key("runtime"))
    assert (response.inserted_count, response.created_customer_count) == (10_000, 500)
    assert await count(pool, "SELECT count(*) FROM events") == 10_000

    for n in (10_001, 100_000):
        error = await refused(stub.RecordEvents(custpb.RecordEventsRequest(
            request_id=f"ev-{n}", create_missing_customers=True,
            events=[event(f"n{i:06d}", f"new{i % 700:03d}", when) for i in range(n)]),
            metadata=api.key("runtime")))
        check_limit_error(error, "BATCH_TOO_LARGE", "10,000")
    assert await count(pool, "SELECT count(*) FROM events") == 10_000
    assert await count(pool, "SELECT count(*) FROM customers") == 500


async def test_documented_valid_upsert_over_32_mib_is_refused_as_documented(
        api: Api, pool: asyncpg.Pool) -> None:
    """README "Message sizes": a request over 32 MiB is refused by gRPC itself with
    RESOURCE_EXHAUSTED (the one error without an ErrorInfo), and nothing is written; the
    per-item limits allow such batches, so the README says to split them by size. (Found: the
    limit was documented nowhere.)"""
    # 350 customers (3.5% of the 10,000 allowed), each with the documented maximum of 100
    # properties of at most 1,000 characters: about 36 MB.
    value = "v" * 1000
    request = custpb.UpsertCustomersRequest(request_id="big-props", customers=[
        custpb.Customer(customer_id=f"c{i:03d}", properties={
            f"p{j:02d}": custpb.PropertyValue(string_value=value) for j in range(100)})
        for i in range(350)])
    assert request.ByteSize() > 32 * MiB
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await customers_stub(api).UpsertCustomers(request, metadata=api.key("runtime"))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert "larger than max" in (info.value.details() or "")
    assert await count(pool, "SELECT count(*) FROM customers") == 0
    readme = readme_text()
    assert "a request may be at most 32 MiB" in readme
    assert "RESOURCE_EXHAUSTED" in readme


async def test_list_customers_default_page_reaches_a_default_client(api: Api) -> None:
    value = "v" * 1000
    await customers_stub(api).UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id="props", customers=[
            custpb.Customer(customer_id=f"c{i:03d}", properties={
                f"p{j:02d}": custpb.PropertyValue(string_value=value) for j in range(100)})
            for i in range(50)]), metadata=api.key("runtime"))
    seen: list[str] = []
    token = ""
    while True:
        page = await customers_stub(api).ListCustomers(
            custpb.ListCustomersRequest(page_token=token), metadata=api.key())
        seen += [c.customer_id for c in page.customers]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 50


# --- promo code uploads -----------------------------------------------------------------------


async def stream(api: Api, code: str, request_id: str,
                 chunks: list[bytes]) -> codepb.UploadCodesResponse:
    async def messages() -> Any:
        yield codepb.UploadCodesRequest(promotion_code=code, request_id=request_id,
                                        data=chunks[0])
        for chunk in chunks[1:]:
            yield codepb.UploadCodesRequest(data=chunk)

    return await codepb_grpc.CodePoolServiceStub(api.channel).UploadCodes(
        messages(), metadata=api.key())


def padded_file(prefix: str, codes: int, size: int) -> bytes:
    """``codes`` 64-character codes, then blank lines (skipped) up to exactly ``size`` bytes."""
    body = "".join(f"{prefix}{i:08d}".ljust(64, "x") + "\n" for i in range(codes)).encode()
    assert len(body) <= size
    return body + b"\n" * (size - len(body))


def chunked(data: bytes, size: int = MiB) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def test_upload_chunk_of_exactly_1_mib_and_one_byte_more(api: Api,
                                                               pool: asyncpg.Pool) -> None:
    await code_promotion(api, "FLASH")
    exact = padded_file("A", 16_000, MiB)
    response = await stream(api, "FLASH", "up-1mib", [exact])
    assert response.codes_added == 16_000
    for label, data in (("1 MiB + 1", padded_file("B", 16_000, MiB + 1)),
                        ("3 MB", padded_file("C", 40_000, 3 * MiB))):
        error = await refused(stream(api, "FLASH", f"up-{label}", [data]))
        check_limit_error(error, "UPLOAD_CHUNK_TOO_LARGE", "1,048,576")
    assert await pool_counts(pool, "FLASH") == (16_000, 0, 16_000)
    assert await count(pool, "SELECT count(*) FROM code_uploads") == 1


async def test_upload_file_of_exactly_10_mib_and_one_byte_more(api: Api,
                                                               pool: asyncpg.Pool) -> None:
    await code_promotion(api, "FLASH")
    data = padded_file("A", 160_000, 10 * MiB)
    response = await stream(api, "FLASH", "up-10mib", chunked(data))
    assert response.codes_added == 160_000
    over = padded_file("B", 1_000, 10 * MiB + 1)
    error = await refused(stream(api, "FLASH", "up-over", chunked(over)))
    check_limit_error(error, "CODE_FILE_TOO_LARGE", "10 MB")
    assert await pool_counts(pool, "FLASH") == (160_000, 0, 160_000)
    assert await count(pool, "SELECT count(*) FROM code_uploads") == 1


async def test_upload_with_100000_bad_lines_is_summarised(api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "FLASH")
    data = b"".join(b"bad code %d\n" % i for i in range(100_000))
    error = await refused(stream(api, "FLASH", "up-bad", chunked(data)))
    check_limit_error(error, "CODE_FILE_REJECTED", "100000 problem lines", "line 1:")
    assert len(error.details() or "") <= 2000
    info = error_info_of(error)
    assert info is not None and info.metadata["error_count"] == "100000"
    assert await pool_counts(pool, "FLASH") == (0, 0, 0)


# --- campaigns and clearance ------------------------------------------------------------------


async def promotions(api: Api, *codes: str) -> None:
    await reward_type(api)
    for code in codes:
        await promotion(api, code)


def campaign(campaign_id: str, clock: FixedClock, codes: list[str]) -> campb.Campaign:
    return campb.Campaign(campaign_id=campaign_id, name=campaign_id,
                          execute_at=ts(clock.now() + timedelta(days=2)),
                          conditional_execution=True, promotion_codes=codes)


async def test_campaign_targets_at_limit_and_past(api: Api, pool: asyncpg.Pool,
                                                  clock: FixedClock) -> None:
    await promotions(api, "VIP25")
    stub = campaigns_stub(api)
    error = await refused(stub.CreateCampaign(campb.CreateCampaignRequest(
        request_id="c-over", campaign=campaign("over", clock, ["VIP25"]),
        customer_ids=[f"c{i:06d}" for i in range(100_001)]), metadata=api.key()))
    check_limit_error(error, "TOO_MANY_ENTRIES", "100000")
    assert await count(pool, "SELECT count(*) FROM campaigns") == 0

    await stub.CreateCampaign(campb.CreateCampaignRequest(
        request_id="c-ok", campaign=campaign("ok", clock, ["VIP25"])), metadata=api.key())
    added = await stub.AddCampaignTargets(campb.AddCampaignTargetsRequest(
        request_id="t-limit", campaign_id="ok",
        customer_ids=[f"c{i:06d}" for i in range(100_000)]), metadata=api.key())
    assert (added.added, added.target_count) == (100_000, 100_000)
    error = await refused(stub.AddCampaignTargets(campb.AddCampaignTargetsRequest(
        request_id="t-over", campaign_id="ok",
        customer_ids=[f"d{i:06d}" for i in range(100_001)]), metadata=api.key()))
    check_limit_error(error, "TOO_MANY_ENTRIES", "100000")
    assert await count(pool, "SELECT count(*) FROM campaign_targets") == 100_000
    assert await count(pool, "SELECT target_count FROM campaigns") == 100_000

    # ForecastCampaign's customer list shares the (undocumented) 100,000 limit.
    error = await refused(clearance_stub(api).ForecastCampaign(campb.ForecastCampaignRequest(
        campaign_id="ok", customer_ids=[f"c{i:06d}" for i in range(100_001)]),
        metadata=api.key("listener")))
    check_limit_error(error, "TOO_MANY_ENTRIES", "100000")


async def test_campaign_promotions_at_limit_and_past(api: Api, pool: asyncpg.Pool,
                                                     clock: FixedClock) -> None:
    codes = [f"P{i:02d}" for i in range(21)]
    await promotions(api, *codes)
    stub = campaigns_stub(api)
    created = await stub.CreateCampaign(campb.CreateCampaignRequest(
        request_id="c-20", campaign=campaign("twenty", clock, codes[:20])), metadata=api.key())
    assert len(created.campaign.promotion_codes) == 20
    error = await refused(stub.CreateCampaign(campb.CreateCampaignRequest(
        request_id="c-21", campaign=campaign("twentyone", clock, codes)), metadata=api.key()))
    check_limit_error(error, "TOO_MANY_PROMOTIONS", "20")
    assert await count(pool, "SELECT count(*) FROM campaigns") == 1


async def test_update_statuses_at_limit_and_past(api: Api, pool: asyncpg.Pool,
                                                 clock: FixedClock) -> None:
    await promotions(api, "VIP25")
    ids = [f"c{i:05d}" for i in range(10_001)]
    await campaigns_stub(api).CreateCampaign(campb.CreateCampaignRequest(
        request_id="c", campaign=campaign("camp", clock, ["VIP25"]), customer_ids=ids),
        metadata=api.key())
    stub = clearance_stub(api)
    done = await stub.UpdateCustomerPromotionStatus(campb.UpdateCustomerPromotionStatusRequest(
        campaign_id="camp", request_id="s-limit", statuses=[
            campb.CustomerPromotionStatus(customer_id=c, approved=True) for c in ids[:10_000]]),
        metadata=api.key("listener"))
    assert (done.updated, list(done.unknown_customer_ids)) == (10_000, [])
    error = await refused(stub.UpdateCustomerPromotionStatus(
        campb.UpdateCustomerPromotionStatusRequest(
            campaign_id="camp", request_id="s-over", statuses=[
                campb.CustomerPromotionStatus(customer_id=c, approved=False) for c in ids]),
        metadata=api.key("listener")))
    check_limit_error(error, "TOO_MANY_ENTRIES", "10000")
    assert await count(pool, "SELECT count(*) FROM campaign_targets WHERE approved") == 10_000
    assert await count(pool, "SELECT count(*) FROM campaign_targets WHERE approved IS NULL") == 1


async def test_largest_clearance_page_reaches_a_default_client(api: Api,
                                                               clock: FixedClock) -> None:
    codes = [f"PROMOTION-{i:02d}-".ljust(40, "x") for i in range(20)]
    await promotions(api, *codes)
    await campaigns_stub(api).CreateCampaign(campb.CreateCampaignRequest(
        request_id="c", campaign=campaign("camp", clock, codes),
        customer_ids=[f"c{i:05d}" for i in range(10_000)]), metadata=api.key())
    seen = 0
    token = ""
    while True:
        page = await clearance_stub(api).GetProcessedCampaignCustomers(
            campb.GetProcessedCampaignCustomersRequest(campaign_id="camp", page_size=10_000,
                                                       page_token=token),
            metadata=api.key("listener"))
        seen += len(page.customers)
        token = page.next_page_token
        if not token:
            break
    assert seen == 10_000


# --- dynamic bonuses --------------------------------------------------------------------------


async def manual_definition(api: Api, definition_id: str = "manual", **kw: Any) -> None:
    await bonus_api.create(api, bonus_api.definition(
        definition_id, "last(deposit.amount) * 50%", approval_mode=bpb.APPROVAL_MODE_MANUAL,
        batch_window_seconds=60, **kw))


async def test_bonus_request_at_limit_and_past(api: Api, pool: asyncpg.Pool) -> None:
    ids = [f"c{i:05d}" for i in range(10_001)]
    await upsert_customers(api, ids, "cust")
    await manual_definition(api)
    await bonus_api.request(api, "manual", ids[:10_000], "req-limit")
    assert await count(pool, "SELECT count(*) FROM bonus_requests") == 10_000
    error = await refused(bonus_api.request(api, "manual", ids, "req-over"))
    check_limit_error(error, "TOO_MANY_ITEMS", "10000", "customer_ids")
    assert await count(pool, "SELECT count(*) FROM bonus_requests") == 10_000


async def test_approve_bonus_results_at_limit_and_past(api: Api, pool: asyncpg.Pool,
                                                       settings: Settings,
                                                       clock: FixedClock) -> None:
    ids = [f"c{i:04d}" for i in range(1_001)]
    await manual_definition(api)
    await customers_stub(api).RecordEvents(custpb.RecordEventsRequest(
        request_id="ev", create_missing_customers=True,
        events=[event(f"e-{c}", c, clock.now() - timedelta(hours=1)) for c in ids]),
        metadata=api.key("runtime"))
    await bonus_api.request(api, "manual", ids, "req")
    clock.advance(timedelta(minutes=2))
    assert await bonus_api.run_due_batches(pool, settings, clock) == 1
    bonus_ids = [str(r["bonus_id"]) for r in await pool.fetch(
        "SELECT bonus_id FROM bonus_results WHERE status = 'CALCULATED' ORDER BY customer_id")]
    assert len(bonus_ids) == 1_001
    stub = bonus_stub(api)
    error = await refused(stub.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
        request_id="ap-over", bonus_ids=bonus_ids), metadata=api.key()))
    check_limit_error(error, "TOO_MANY_ITEMS", "1000", "bonus_ids")
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 0
    approved = await stub.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
        request_id="ap-limit", bonus_ids=bonus_ids[:1_000]), metadata=api.key())
    assert len(approved.results) == 1_000
    assert {r.status for r in approved.results} == {bpb.BONUS_STATUS_ISSUED}
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 1_000
    assert await count(pool,
                       "SELECT count(*) FROM bonus_results WHERE status = 'CALCULATED'") == 1


async def test_message_templates_and_variables_at_limit_and_past(api: Api,
                                                                 pool: asyncpg.Pool) -> None:
    at_limit = ("{{event.bonus_amount}} " * 100)[:2000]
    at_limit = at_limit[:at_limit.rindex("}}") + 2].ljust(2000, ".")
    variables = [fpb.FormulaVariable(name=f"v{i:02d}", value=str(i)) for i in range(50)]
    await manual_definition(api, "limit", calculated_message=at_limit, variables=variables)
    stored = await bonus_stub(api).GetBonusDefinition(bpb.GetBonusDefinitionRequest(
        definition_id="limit"), metadata=api.key())
    assert stored.definition.calculated_message == at_limit
    assert len(stored.definition.variables) == 50

    error = await refused(manual_definition(api, "over", calculated_message=at_limit + "."))
    check_limit_error(error, "INVALID_MESSAGE_TEMPLATE", "2000", "calculated_message")
    error = await refused(manual_definition(api, "vars", variables=[
        *variables, fpb.FormulaVariable(name="v50", value="1")]))
    check_limit_error(error, "INVALID_VARIABLE", "50")
    assert await count(pool, "SELECT count(*) FROM bonus_definitions") == 1


async def test_unclosed_placeholder_template_is_refused_quickly(api: Api) -> None:
    template = "{{" + " " * 798  # 800 characters, well inside the 2,000 allowed
    started = time.perf_counter()
    error = await refused(manual_definition(api, "slow", skipped_message=template))
    elapsed = time.perf_counter() - started
    check_limit_error(error, "INVALID_MESSAGE_TEMPLATE", "skipped_message")
    assert elapsed < 0.3, f"CreateBonusDefinition held the server for {elapsed:.2f} s"


async def test_schedule_with_100000_customers_is_answered(api: Api, pool: asyncpg.Pool) -> None:
    """Every answer about a schedule carries its customer ids, so they may take at most 3 MiB:
    100,000 ids of 48 characters (5 MB) are refused with a message naming the cap and the way
    out, nothing stored; 100,000 ids of 28 characters are created and the answer reaches a
    default client (4 MiB limit). (Found: the 5 MB schedule was created and its answer was
    RESOURCE_EXHAUSTED at the client, and so was every retry's.)"""
    await manual_definition(api)
    long_ids = [f"customer-{i:06d}-".ljust(48, "x") for i in range(100_000)]
    ids = [f"customer-{i:06d}-".ljust(28, "x") for i in range(100_000)]
    # Setup only (UpsertCustomers is tested above): the customers the schedule names.
    await pool.execute("INSERT INTO customers (customer_id) SELECT unnest($1::text[])",
                       long_ids + ids)
    stub = bonus_stub(api)
    error = await refused(stub.CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id="s-over", schedule=bpb.BonusSchedule(
            schedule_id="over", definition_id="manual", weekday=1, local_time="06:00",
            time_zone="UTC", customer_ids=[*ids, "one-more"])), metadata=api.key()))
    check_limit_error(error, "INVALID_BONUS_RULE", "100000")
    error = await refused(stub.CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id="s-long", schedule=bpb.BonusSchedule(
            schedule_id="long", definition_id="manual", weekday=1, local_time="06:00",
            time_zone="UTC", customer_ids=long_ids)), metadata=api.key()))
    check_limit_error(error, "INVALID_BONUS_RULE", "3,145,728")
    assert "campaign_id" in (error.details() or "")
    assert await count(pool, "SELECT count(*) FROM bonus_schedules") == 0
    schedule = bpb.BonusSchedule(schedule_id="weekly", definition_id="manual", weekday=1,
                                 local_time="06:00", time_zone="UTC", customer_ids=ids)
    created = await stub.CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id="s-limit", schedule=schedule), metadata=api.key())
    assert created.schedule.schedule_id == "weekly"
    assert len(created.schedule.customer_ids) == 100_000
    listed = await stub.ListBonusSchedules(bpb.ListBonusSchedulesRequest(), metadata=api.key())
    assert [s.schedule_id for s in listed.schedules] == ["weekly"]


# --- product promotions -----------------------------------------------------------------------


async def coffee(api: Api) -> None:
    await products_stub(api).CreatePersonalizedPromotion(prodpb.CreatePersonalizedPromotionRequest(
        request_id="pp", personalized_promotion=prodpb.PersonalizedPromotion(
            backend_id="coffee", name="Your coffee")), metadata=api.key())


async def test_assign_product_lists_at_limit_and_past(api: Api, pool: asyncpg.Pool) -> None:
    ids = [f"c{i:05d}" for i in range(10_001)]
    await upsert_customers(api, ids, "cust")
    await coffee(api)
    stub = products_stub(api)
    products = [f"p{i:04d}" for i in range(1_001)]

    def assign(request_id: str, customers: list[str],
               product_ids: list[str]) -> Any:
        return stub.AssignProductLists(prodpb.AssignProductListsRequest(
            request_id=request_id, personalized_promotion_id="coffee", customer_ids=customers,
            product_ids=product_ids), metadata=api.key())

    error = await refused(assign("a-many", ids, products[:2]))
    check_limit_error(error, "INVALID_CUSTOMER_IDS", "10000")
    error = await refused(assign("a-long", ids[:1], products))
    check_limit_error(error, "TOO_MANY_PRODUCTS", "1000")
    assert await count(pool, "SELECT count(*) FROM customer_product_lists") == 0

    assert (await assign("a-limit", ids[:10_000], products[:2])).created_count == 10_000
    assert (await assign("a-1000", ids[-1:], products[:1_000])).created_count == 1
    view = await stub.GetCustomerProductPromotions(prodpb.GetCustomerProductPromotionsRequest(
        customer_id=ids[-1]), metadata=api.key())
    assert len(view.promotions[0].product_ids) == 1_000
    error = await refused(stub.RemoveProductLists(prodpb.RemoveProductListsRequest(
        request_id="r-over", personalized_promotion_id="coffee", customer_ids=[*ids, "x"]),
        metadata=api.key()))
    check_limit_error(error, "INVALID_CUSTOMER_IDS", "10000")
    assert await count(pool, "SELECT count(*) FROM customer_product_lists") == 10_001


async def test_discount_sets_and_basket_lines_at_limit_and_past(api: Api,
                                                                pool: asyncpg.Pool) -> None:
    await upsert_customers(api, ["shopper"], "cust")
    stub = products_stub(api)
    products = [f"p{i:04d}" for i in range(1_001)]

    def discount(discount_id: str, sets: int, per_set: int) -> Any:
        return stub.CreateProductSetDiscount(prodpb.CreateProductSetDiscountRequest(
            request_id=discount_id, product_set_discount=prodpb.ProductSetDiscount(
                discount_id=discount_id, name=discount_id,
                discount_type=prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="10",
                product_sets=[prodpb.ProductSet(
                    name=f"set {k}", product_ids=products[:per_set], required_quantity=10,
                    gets_discount=k == sets - 1, discounted_quantity=10 if k == sets - 1 else 0)
                    for k in range(sets)])), metadata=api.key())

    error = await refused(discount("eleven", 11, 10))
    check_limit_error(error, "INVALID_PRODUCT_SET", "10")
    error = await refused(discount("wide", 1, 1_001))
    check_limit_error(error, "TOO_MANY_PRODUCTS", "1000")
    assert await count(pool, "SELECT count(*) FROM product_set_discounts") == 0
    await discount("limit", 10, 1_000)

    def basket(lines: int) -> Any:
        return stub.EvaluateBasket(prodpb.EvaluateBasketRequest(customer_id="shopper", lines=[
            prodpb.BasketLine(product_id=products[i % 1_000], quantity=1, unit_price="1.00")
            for i in range(lines)]), metadata=api.key())

    evaluation = (await basket(1_000)).evaluation
    assert evaluation.basket_total == "1000.00"
    assert evaluation.discount_total == "1.00", evaluation.outcomes
    error = await refused(basket(1_001))
    check_limit_error(error, "INVALID_BASKET", "1000")


# --- formulas ---------------------------------------------------------------------------------


async def validate(api: Api, formula: str) -> Any:
    return await fpb_grpc.FormulaServiceStub(api.channel).ValidateFormula(
        fpb.ValidateFormulaRequest(source=formula), metadata=api.key())


async def test_formula_length_and_chained_steps_at_limit_and_past(api: Api) -> None:
    flat = "+".join(["sum(deposit.amount)"] * 500)  # 9,999 characters, no nesting
    await validate(api, flat.ljust(10_000))
    for source in (flat.ljust(10_001), flat.ljust(100_000)):
        error = await refused(validate(api, source))
        check_limit_error(error, "FORMULA_INVALID", "10000")
    chain = "\n".join(["a0 = 1", *(f"a{i} = a{i - 1} + 1" for i in range(1, 150)), "a149"])
    await validate(api, chain)
    chain = "\n".join(["a0 = 1", *(f"a{i} = a{i - 1} + 1" for i in range(1, 400)), "a399"])
    error = await refused(validate(api, chain))
    check_limit_error(error, "FORMULA_INVALID", "300")
    error = await refused(validate(api, "-" * 9_999 + "1"))  # 10,000 characters, all nesting
    check_limit_error(error, "FORMULA_INVALID", "50 levels")


async def test_formula_nested_50_levels_is_accepted(api: Api) -> None:
    await validate(api, "-" * 49 + "1")
    await validate(api, "1+(" * 49 + "1" + ")" * 49)
    error = await refused(validate(api, "-" * 51 + "1"))
    check_limit_error(error, "FORMULA_INVALID", "50 levels")
    await validate(api, "-" * 50 + "1")  # 50 levels of nesting: the documented limit
