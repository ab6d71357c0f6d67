"""Logging audit: "logs that say what happened", "secrets never logged".

What the docs promise (README "Conventions of the API" and Settings, docs/operations.md):
- PROMO_LOG_FORMAT json: "one object per line, with request id, method, principal, code, ms";
  operations.md: "One JSON line per RPC (request id, method, caller's key name, code, ms)";
  names (never keys) appear in logs.
- "Every response carries the call's `x-request-id` in its trailers, failed calls included (an
  `UNAUTHENTICATED` one too; send your own `x-request-id` to correlate with your logs)".
- "`INTERNAL` is always a bug or an outage (the log line with the same request id has the
  traceback)".
- Worker lines: `outbox job failed permanently`, `retention purge done` (already covered by
  test_operations_regressions.py and test_retention.py, not repeated here).

Every in-process record is captured by a handler on the root logger that formats it with the
service's own JsonFormatter at emit time, i.e. in the call's context (request id, method,
principal), exactly as a deployed server writes it. The JSON test runs the real `promo serve`.

Already covered elsewhere (not repeated): API keys / listener secrets / SMTP password never in
the log (test_security_audit.py), one JSON "rpc" line for an OK CreateRewardType
(test_operations_doc_audit.py), GetReward context redaction, retention purge counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import codes_pb2 as cpb_codes
from promo.v1 import codes_pb2_grpc as codes_grpc
from promo.v1 import jobs_pb2 as jpb
from promo.v1 import jobs_pb2_grpc as jpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.errors import error_info_of
from server.logs import JsonFormatter
from storage import outbox
from storage import webhooks as webhooks_repo
from tests.conftest import ADMIN_KEY, LISTENER_KEY, RUNTIME_KEY, Api
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.code_helpers import code_promotion, codes_file
from tests.e2e.promo_helpers import get_reward, promotion, reward_type, single
from tests.e2e.promo_process import REPO, clean_env
from tests.e2e.test_bonuses_api import create as create_bonus_definition
from tests.e2e.test_bonuses_api import customers as upsert_customers
from tests.e2e.test_bonuses_api import definition as bonus_definition
from tests.e2e.test_bonuses_api import events as record_events
from tests.e2e.test_bonuses_api import request as request_bonus
from tests.e2e.test_bonuses_api import results as bonus_results
from tests.e2e.test_bonuses_api import run_due_batches
from tests.webhook_listener import SECRET, WebhookListener, free_port
from workers import bonuses as _bonus_jobs  # noqa: F401  registers the bonus.batch handler
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers import webhooks
from workers.outbox import job_lease, run_outbox_job

ACCESS_MESSAGES = ("rpc", "rpc failed", "rpc crashed", "rpc cancelled")
ACCESS_FIELDS = ("request_id", "method", "principal", "code", "ms")
KEYS = (ADMIN_KEY, RUNTIME_KEY, LISTENER_KEY)
UNKNOWN_KEY = "never-configured-key-0123456789"
# Fields every line of a call carries from its context, and formatting fields: not "what changed".
_CONTEXT_FIELDS = {"ts", "level", "logger", "request_id", "method", "principal"}


# --- capture ----------------------------------------------------------------------------------


class Captured:
    """Every record at INFO and above, formatted by the service's JsonFormatter in the context of
    the code that logged it (so a call's lines carry its request id, method and principal)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def access(self, request_id: str | None = None, method: str | None = None
               ) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["msg"] in ACCESS_MESSAGES
                and (request_id is None or e.get("request_id") == request_id)
                and (method is None or str(e.get("method", "")).endswith("/" + method))]

    def of_call(self, method: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The one access line of the one call to ``method`` and the call's other lines (same
        request id) at INFO or above."""
        [line] = self.access(method=method)
        others = [e for e in self.entries if e.get("request_id") == line["request_id"]
                  and e["msg"] not in ACCESS_MESSAGES]
        return line, others

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["msg"] == message]

    def dump(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.lines.append(self.format(record))

    handler = Keep(level=logging.INFO)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def mentions(entry: dict[str, Any], value: object) -> bool:
    """Whether a line names ``value`` outside its context fields (in its message or extras)."""
    text = str(value)
    return any(text == str(v) or text in str(v) for k, v in entry.items()
               if k not in _CONTEXT_FIELDS)


def says(lines: list[dict[str, Any]], *identifiers: object) -> list[dict[str, Any]]:
    """The INFO (or higher) lines among ``lines`` that name every one of ``identifiers``."""
    return [e for e in lines if e["level"] in ("INFO", "WARNING", "ERROR")
            and all(mentions(e, i) for i in identifiers)]


def meta(role: str = "admin", request_id: str | None = None,
         key: str | None = None) -> tuple[tuple[str, str], ...]:
    pairs = [("x-api-key", key if key is not None else Api.key(role)[0][1])]
    if request_id is not None:
        pairs.append(("x-request-id", request_id))
    return tuple(pairs)


def trailer_id(trailers: Any) -> str | None:
    return next((v for k, v in (trailers or ()) if k == "x-request-id"), None)


def check_access_line(line: dict[str, Any], *, request_id: str, method: str, principal: str,
                      code: str) -> None:
    assert {f: line.get(f) for f in ("request_id", "method", "principal", "code")} == {
        "request_id": request_id, "method": method, "principal": principal, "code": code}, line
    assert isinstance(line.get("ms"), float) and line["ms"] >= 0, line
    assert not any(k in json.dumps(line) for k in (*KEYS, UNKNOWN_KEY)), line


# --- one access line per call ------------------------------------------------------------------

LIST_TYPES = "/promo.v1.RewardTypeService/ListRewardTypes"
CREATE_TYPE = "/promo.v1.RewardTypeService/CreateRewardType"
GET_PROMOTION = "/promo.v1.PromotionService/GetPromotion"


async def test_an_ok_call_has_one_access_line_with_the_clients_request_id(
        api: Api, logs: Captured) -> None:
    """The x-request-id the client sent is honoured: in the one access line and the trailers."""
    call = rtpb_grpc.RewardTypeServiceStub(api.channel).ListRewardTypes(
        rtpb.ListRewardTypesRequest(), metadata=meta(request_id="audit-ok-1"))
    await call
    assert trailer_id(await call.trailing_metadata()) == "audit-ok-1"
    [line] = logs.access(request_id="audit-ok-1")
    assert line["msg"] == "rpc" and line["level"] == "INFO"
    check_access_line(line, request_id="audit-ok-1", method=LIST_TYPES, principal="test-admin",
                      code="OK")
    assert len(logs.access()) == 1, logs.dump()


ERROR_CASES = {
    # name: (method path, request, metadata role or key, expected code, expected principal)
    "INVALID_ARGUMENT": (CREATE_TYPE, rtpb.CreateRewardTypeRequest(
        request_id="bad-type", reward_type=rtpb.RewardType(name="x", display_name="X")),
        "admin", "INVALID_ARGUMENT", "test-admin"),
    "NOT_FOUND": (GET_PROMOTION, ppb.GetPromotionRequest(promotion_code="NOPE"), "admin",
                  "NOT_FOUND", "test-admin"),
    "PERMISSION_DENIED": (CREATE_TYPE, rtpb.CreateRewardTypeRequest(
        request_id="denied", reward_type=rtpb.RewardType(
            name="cashback", display_name="Cashback", category=rtpb.REWARD_CATEGORY_AMOUNT)),
        "runtime", "PERMISSION_DENIED", "test-runtime"),
    "UNAUTHENTICATED": (LIST_TYPES, rtpb.ListRewardTypesRequest(), UNKNOWN_KEY,
                        "UNAUTHENTICATED", "anonymous"),
}


def _unary(api: Api, path: str, request: Any, metadata: Any) -> Any:
    response_type = {CREATE_TYPE: rtpb.CreateRewardTypeResponse,
                     LIST_TYPES: rtpb.ListRewardTypesResponse,
                     GET_PROMOTION: ppb.GetPromotionResponse}[path]
    return api.channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)(
        request, metadata=metadata)


@pytest.mark.parametrize("kind", list(ERROR_CASES))
async def test_each_error_kind_has_one_access_line_with_the_clients_request_id(
        api: Api, logs: Captured, kind: str) -> None:
    path, request, who, code, principal = ERROR_CASES[kind]
    rid = f"audit-{kind.lower()}"
    metadata = meta(request_id=rid, key=who) if who == UNKNOWN_KEY else meta(who, rid)
    with pytest.raises(grpc.RpcError) as caught:
        await _unary(api, path, request, metadata)
    assert caught.value.code().name == code
    assert trailer_id(caught.value.trailing_metadata()) == rid
    info = error_info_of(caught.value)
    assert info is not None
    [line] = logs.access(request_id=rid)
    check_access_line(line, request_id=rid, method=path, principal=principal, code=code)
    assert line["msg"] == "rpc failed" and line.get("reason") == info.reason, line
    assert len(logs.access()) == 1, logs.dump()


@pytest.mark.parametrize("who", ["admin", UNKNOWN_KEY])
async def test_a_generated_request_id_is_in_the_trailers_and_the_line(
        api: Api, logs: Captured, who: str) -> None:
    """No x-request-id sent: the server's own id is both in the trailers and the access line
    (OK and UNAUTHENTICATED)."""
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    call = stub.ListRewardTypes(rtpb.ListRewardTypesRequest(),
                                metadata=meta(key=who) if who == UNKNOWN_KEY else meta(who))
    with contextlib.suppress(grpc.RpcError):
        await call
    generated = trailer_id(await call.trailing_metadata())
    assert generated
    [line] = logs.access()
    assert line["request_id"] == generated, (generated, line)


async def test_the_client_streaming_upload_has_one_access_line_and_a_codes_uploaded_line(
        api: Api, logs: Captured) -> None:
    """UploadCodes (client stream): one access line with the client's id, and the upload is
    said with its promotion code, upload id and count, under the same request id."""
    await code_promotion(api, "FLASH")
    logs.lines.clear()

    async def messages() -> AsyncIterator[Any]:
        yield cpb_codes.UploadCodesRequest(promotion_code="FLASH", request_id="up-1",
                                           data=codes_file("FL", 5))

    call = codes_grpc.CodePoolServiceStub(api.channel).UploadCodes(
        messages(), metadata=meta(request_id="audit-upload"))
    answer = await call
    assert trailer_id(await call.trailing_metadata()) == "audit-upload"
    [line] = logs.access(request_id="audit-upload")
    check_access_line(line, request_id="audit-upload",
                      method="/promo.v1.CodePoolService/UploadCodes", principal="test-admin",
                      code="OK")
    [told] = logs.messages("codes uploaded")
    assert (told["request_id"], told["promotion_code"], str(told["upload_id"]),
            told["codes"]) == ("audit-upload", "FLASH", answer.upload_id, 5), told


async def test_a_call_cut_by_its_deadline_still_has_one_access_line(
        api: Api, pool: asyncpg.Pool, logs: Captured) -> None:
    """A call whose client deadline runs out while the handler waits (here on a table lock) is
    still one RPC: it must leave one access line (DEADLINE_EXCEEDED or CANCELLED)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE reward_types IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.RpcError) as caught:
            await rtpb_grpc.RewardTypeServiceStub(api.channel).ListRewardTypes(
                rtpb.ListRewardTypesRequest(), metadata=meta(request_id="audit-deadline"),
                timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.5)  # the server side notices the deadline
    await asyncio.sleep(0.5)  # the lock is gone: a handler still running would finish now
    lines = logs.access(request_id="audit-deadline")
    assert len(lines) == 1, f"access lines for the timed-out call: {lines}\n{logs.dump()}"
    assert lines[0]["code"] in ("DEADLINE_EXCEEDED", "CANCELLED"), lines


# --- INTERNAL ---------------------------------------------------------------------------------


async def _crash_list_types(api: Api, pool: asyncpg.Pool, rid: str) -> grpc.RpcError:
    await pool.execute("ALTER TABLE reward_types RENAME TO reward_types_gone")
    with pytest.raises(grpc.RpcError) as caught:
        await rtpb_grpc.RewardTypeServiceStub(api.channel).ListRewardTypes(
            rtpb.ListRewardTypesRequest(), metadata=meta(request_id=rid))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    return caught.value


async def test_internal_errors_log_the_traceback_with_the_request_id_and_hide_it_from_clients(
        api: Api, pool: asyncpg.Pool, logs: Captured) -> None:
    error = await _crash_list_types(api, pool, "audit-crash")
    details = error.details() or ""
    assert "Traceback" not in details and "reward_types" not in details
    assert "relation" not in details and "SELECT" not in details.upper()
    assert error_info_of(error) is not None and error_info_of(error).reason == "INTERNAL"
    assert trailer_id(error.trailing_metadata()) == "audit-crash"
    [crashed] = logs.messages("rpc crashed")
    assert (crashed["level"], crashed["request_id"], crashed["method"],
            crashed["principal"]) == ("ERROR", "audit-crash", LIST_TYPES, "test-admin")
    assert "Traceback" in crashed["exc"] and "UndefinedTable" in crashed["exc"], crashed


async def test_an_internal_error_access_line_carries_the_code_like_every_other(
        api: Api, pool: asyncpg.Pool, logs: Captured) -> None:
    """"One JSON line per RPC (request id, method, caller's key name, code, ms)": the INTERNAL
    call's one line must say code INTERNAL (dashboards and greps filter on code)."""
    await _crash_list_types(api, pool, "audit-crash-code")
    [line] = logs.access(request_id="audit-crash-code")
    check_access_line(line, request_id="audit-crash-code", method=LIST_TYPES,
                      principal="test-admin", code="INTERNAL")


# --- state changes the operator traces -----------------------------------------------------------


async def test_promotion_created_updated_activated_deactivated_are_logged(
        api: Api, logs: Captured) -> None:
    await reward_type(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.CreatePromotion(ppb.CreatePromotionRequest(
        request_id="p-create", activate=False, promotion=ppb.Promotion(
            promotion_code="AUDIT1", name="Audit", rewards=[single()])), metadata=api.key())
    await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="p-update", promotion=ppb.Promotion(promotion_code="AUDIT1", name="Audit 2"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=api.key())
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="p-activate", promotion_code="AUDIT1"), metadata=api.key())
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="p-deactivate", promotion_code="AUDIT1"), metadata=api.key())
    missing = []
    for method in ("CreatePromotion", "UpdatePromotion", "ActivatePromotion",
                   "DeactivatePromotion"):
        _, others = logs.of_call(method)
        if not says(others, "AUDIT1"):
            missing.append((method, others))
    assert not missing, f"no INFO line naming promotion AUDIT1 for: {missing}"


async def test_a_grant_made_by_get_reward_is_traceable_to_grant_customer_and_promotion(
        api: Api, logs: Captured) -> None:
    """GetReward: the docs allow one line per call; that line (or another of the call) must
    name what was granted: the grant id, the customer and the promotion."""
    await reward_type(api)
    await promotion(api)
    logs.lines.clear()
    granted = await get_reward(api, "cust-77")
    assert granted.grant.grant_id
    line, others = logs.of_call("GetReward")
    assert says([line, *others], granted.grant.grant_id, "cust-77", "VIP25"), (
        f"GetReward's lines: {[line, *others]}")


async def test_a_revoked_grant_is_logged_with_its_id_and_outcome(
        api: Api, logs: Captured) -> None:
    await reward_type(api)
    await promotion(api)
    granted = await get_reward(api, "cust-9")
    await rpb_grpc.RewardServiceStub(api.channel).RevokeGrant(rpb.RevokeGrantRequest(
        request_id="audit-revoke", grant_id=granted.grant.grant_id, reason="fraud"),
        metadata=meta("runtime", "audit-revoke-call"))
    [told] = logs.messages("grant revoke")
    assert (told["request_id"], str(told["grant_id"]), told["outcome"], told["principal"]) == (
        "audit-revoke-call", granted.grant.grant_id, "REVOKED", "test-runtime"), told


async def test_campaign_created_and_cancelled_are_logged(
        api: Api, clock: FixedClock, logs: Captured) -> None:
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "audit-camp", clock.now() + timedelta(days=2),
                          customers=["c1", "c2"])
    await cpb_grpc.CampaignServiceStub(api.channel).CancelCampaign(cpb.CancelCampaignRequest(
        request_id="cancel-1", campaign_id="audit-camp"), metadata=api.key())
    missing = [(m, others) for m in ("CreateCampaign", "CancelCampaign")
               for _, others in [logs.of_call(m)] if not says(others, "audit-camp")]
    assert not missing, f"no INFO line naming campaign audit-camp for: {missing}"


async def test_campaign_execution_by_the_worker_is_logged_with_id_and_counts(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        logs: Captured) -> None:
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=1)
    await create_campaign(api, "exec-camp", execute_at, customers=["c1", "c2", "c3"],
                          conditional=False)
    job_id = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")
    clock.set(execute_at)
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    assert await run_outbox_job(ctx, job_id) == "done"
    [told] = logs.messages("campaign executed")
    assert (told["level"], told["campaign_id"], told["approved"], told["rejected"]) == (
        "INFO", "exec-camp", 3, 0), told
    [done] = logs.messages("outbox job done")
    assert (done["outbox_job_id"], done["kind"]) == (job_id, "campaign.execute")


async def test_listener_registered_updated_unregistered_are_logged_without_the_secret(
        api: Api, logs: Captured) -> None:
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    created = await stub.RegisterListener(lpb.RegisterListenerRequest(
        request_id="l-reg", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url="https://hooks.example.com/a",
            secret=SECRET)), metadata=api.key())
    listener_id = created.listener.listener_id
    await stub.UpdateListener(lpb.UpdateListenerRequest(
        request_id="l-upd", listener=lpb.Listener(listener_id=listener_id, active=False),
        update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
    await stub.UnregisterListener(lpb.UnregisterListenerRequest(
        request_id="l-del", listener_id=listener_id), metadata=api.key())
    assert SECRET not in logs.dump()
    missing = [(m, others) for m in ("RegisterListener", "UpdateListener", "UnregisterListener")
               for _, others in [logs.of_call(m)] if not says(others, listener_id)]
    assert not missing, f"no INFO line naming listener {listener_id} for: {missing}"


async def _bonus_batch(api: Api, pool: asyncpg.Pool, settings: Settings,
                       clock: FixedClock, approval: int) -> None:
    await create_bonus_definition(api, bonus_definition(
        "audit-10", "sum(deposit.amount) * 10%", approval_mode=approval))
    await upsert_customers(api, ("b1", "EUR", "UTC"), ("b2", "EUR", "UTC"))
    now = clock.now()
    await record_events(api, "dep", ("b1", "deposit", "100", now - timedelta(hours=1), {}),
                        ("b2", "deposit", "50", now - timedelta(hours=1), {}))
    await request_bonus(api, "audit-10", ["b1", "b2"], "bonus-req-1", role="admin")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1


async def test_a_computed_bonus_batch_is_logged_with_its_batch_and_definition_and_counts(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        logs: Captured) -> None:
    """The batch line must let an operator find the batch: ListBonusBatches shows batch_id and
    definition_id, and the line must carry them, besides the counts."""
    await _bonus_batch(api, pool, settings, clock, bpb.APPROVAL_MODE_MANUAL)
    [batch] = (await bpb_grpc.BonusServiceStub(api.channel).ListBonusBatches(
        bpb.ListBonusBatchesRequest(definition_id="audit-10"), metadata=api.key())).batches
    [told] = logs.messages("bonus batch done")
    assert told["customers"] == 2, told
    assert told.get("CALCULATED") == 2, told
    assert (told.get("definition_id"), str(told.get("batch_id"))) == (
        "audit-10", str(batch.batch_id)), f"bonus batch done line: {told}"


async def test_bonus_results_approved_and_rejected_are_logged(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        logs: Captured) -> None:
    await _bonus_batch(api, pool, settings, clock, bpb.APPROVAL_MODE_MANUAL)
    by_customer = {r.customer_id: r.bonus_id for r in await bonus_results(
        api, definition_id="audit-10")}
    stub = bpb_grpc.BonusServiceStub(api.channel)
    await stub.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
        request_id="approve-1", bonus_ids=[by_customer["b1"]]), metadata=api.key())
    await stub.RejectBonusResults(bpb.RejectBonusResultsRequest(
        request_id="reject-1", bonus_ids=[by_customer["b2"]], reason="abuse"),
        metadata=api.key())
    missing = [(m, others) for m, bonus_id in (("ApproveBonusResults", by_customer["b1"]),
                                               ("RejectBonusResults", by_customer["b2"]))
               for _, others in [logs.of_call(m)] if not says(others, bonus_id)]
    assert not missing, f"no INFO line naming the bonus id for: {missing}"


async def test_retrying_a_dead_job_is_logged_with_the_job_and_the_caller(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        logs: Captured) -> None:
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=1)
    await create_campaign(api, "dead-camp", execute_at, customers=["c1"], conditional=False)
    job_id = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")
    await pool.execute("UPDATE outbox_jobs SET max_attempts = 1 WHERE id = $1", job_id)
    clock.set(execute_at)
    async with pool.acquire() as conn:
        assert await outbox.start_attempt(conn, job_id, now=clock.now(),
                                          lease=job_lease(settings)) is not None
        clock.set(clock.now() + job_lease(settings) + timedelta(seconds=1))
        assert [b.id for b in await outbox.bury_interrupted_jobs(conn, now=clock.now())] == [
            job_id]
    await jpb_grpc.JobServiceStub(api.channel).RetryJob(jpb.RetryJobRequest(
        request_id="retry-1", job_id=str(job_id)), metadata=meta(request_id="audit-retry"))
    [told] = logs.messages("dead job retried")
    assert (told["level"], told["request_id"], told["principal"], told["outbox_job_id"],
            told["kind"], told["last_error"]) == (
        "INFO", "audit-retry", "test-admin", job_id, "campaign.execute",
        "interrupted 1 times"), told


async def _deliver_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    async with pool.acquire() as conn:
        job_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'webhook.deliver' AND status = 'pending'"
            " AND due_at <= $1 ORDER BY id", clock.now())]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await webhooks.setup(ctx)
    try:
        return [await run_outbox_job(ctx, job_id) for job_id in job_ids]
    finally:
        await webhooks.teardown(ctx)


async def _emit(pool: asyncpg.Pool, clock: FixedClock) -> str:
    async with pool.acquire() as conn, conn.transaction():
        emitted = await webhooks_repo.emit_event(
            conn, event_type=EventType.SCHEDULED_CAMPAIGN, now=clock.now(),
            payload={"campaign_id": "spring"})
    assert emitted is not None
    return emitted.event_id


async def test_webhook_delivery_outcomes_are_logged(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener, logs: Captured) -> None:
    """A refused attempt: one WARNING naming delivery, event, listener, HTTP status and outcome;
    a delivered one: the job's INFO "delivery batch" line counts it (successes are DEBUG per
    delivery, as workers/webhooks.py documents)."""
    created = await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(
        lpb.RegisterListenerRequest(request_id="hook", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=listener.url, secret=SECRET)),
        metadata=api.key())
    listener_id = created.listener.listener_id
    listener.answer(503)
    event_id = await _emit(pool, clock)
    assert len(await _deliver_due(pool, settings, clock)) == 1  # the job is retried later
    [failed] = logs.messages("delivery attempt")
    assert (failed["level"], failed["event_id"], failed["listener_id"], failed["status_code"],
            failed["outcome"], failed["attempt"]) == (
        "WARNING", event_id, listener_id, 503, "PENDING", 1), failed
    assert failed["delivery_id"]
    logs.lines.clear()
    clock.advance(timedelta(minutes=10))
    assert await _deliver_due(pool, settings, clock) == ["done"], logs.dump()
    [batch] = logs.messages("delivery batch")
    assert (batch["level"], batch["claimed"], batch.get("delivered")) == ("INFO", 1, 1), batch
    assert SECRET not in logs.dump()


# --- JSON format of the real process -----------------------------------------------------


async def test_promo_serve_json_logs_are_one_object_per_line_with_the_fields(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path) -> None:
    """PROMO_LOG_FORMAT=json on the real `promo serve`: every line of its output is one JSON
    object; each call (OK, each error kind, INTERNAL) has exactly one access line with request
    id, method, principal (never a key), code and ms; the INTERNAL one's traceback stays inside
    its one line."""
    port = free_port()
    env = clean_env(
        PROMO_DATABASE_URL=settings.database_url or "", PROMO_REDIS_URL=settings.redis_url or "",
        PROMO_QUEUE_NAME=settings.queue_name, PROMO_GRPC_PORT=str(port),
        PROMO_LOG_LEVEL="INFO", PROMO_LOG_FORMAT="json", PROMO_MIGRATE_ON_START="false",
        PROMO_SHUTDOWN_GRACE_SECONDS="1", PROMO_API_KEYS=json.dumps([
            {"name": "ops-admin", "key": ADMIN_KEY, "roles": ["admin"]},
            {"name": "ops-runtime", "key": RUNTIME_KEY, "roles": ["runtime"]}]))
    out = tmp_path / "serve.log"
    calls: dict[str, tuple[str, str, str]] = {}  # request id -> (method, principal, code)
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "serve", env=env, cwd=REPO, stdout=sink,
            stderr=sink)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            api = Api(channel=channel, address=f"127.0.0.1:{port}")
            for kind, (path, request, who, code, _) in ERROR_CASES.items():
                rid = f"json-{kind.lower()}-{uuid.uuid4().hex[:6]}"
                key = {"admin": ADMIN_KEY, "runtime": RUNTIME_KEY}.get(who, who)
                principal = {"admin": "ops-admin", "runtime": "ops-runtime"}.get(who, "anonymous")
                with pytest.raises(grpc.RpcError):
                    await _unary(api, path, request, meta(request_id=rid, key=key))
                calls[rid] = (path, principal, code)
            await _unary(api, LIST_TYPES, rtpb.ListRewardTypesRequest(),
                         meta(request_id="json-ok", key=ADMIN_KEY))
            calls["json-ok"] = (LIST_TYPES, "ops-admin", "OK")
            await pool.execute("ALTER TABLE reward_types RENAME TO reward_types_gone")
            with pytest.raises(grpc.RpcError):
                await _unary(api, LIST_TYPES, rtpb.ListRewardTypesRequest(),
                             meta(request_id="json-crash", key=ADMIN_KEY))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    text = out.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    not_json = []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            not_json.append(line)
    assert not not_json, f"lines that are not one JSON object:\n{not_json}"
    assert not any(k in text for k in (*KEYS, UNKNOWN_KEY))
    for rid, (path, principal, code) in calls.items():
        [line] = [e for e in entries if e.get("request_id") == rid
                  and e.get("msg") in ACCESS_MESSAGES]
        check_access_line(line, request_id=rid, method=path, principal=principal, code=code)
    [crashed] = [e for e in entries if e.get("request_id") == "json-crash"
                 and e.get("msg") in ACCESS_MESSAGES]
    assert "Traceback" in crashed.get("exc", ""), crashed
    assert (crashed["method"], crashed["principal"], crashed["level"]) == (
        LIST_TYPES, "ops-admin", "ERROR"), crashed
    assert isinstance(crashed.get("ms"), float), crashed
