"""Security audit through the real service: what README ("Calling it", "Settings", "Status"),
docs/operations.md, docs/webhooks.md and the role statements of the protos promise about API
keys, roles, health and reflection, secrets never logged, webhook signatures and TLS.

- Every RPC (enumerated from the generated descriptors) without a key, with an unknown key, and
  with a key of each role is checked against the role table the documents give (not against
  the code's own ROLES tables): UNAUTHENTICATED / PERMISSION_DENIED before any validation or
  database work.
- Health checking and reflection need no key.
- API keys, listener secrets (chosen, generated, rotated, refused), the SMTP password, the
  secret-encryption key and credential values of GetReward's context never reach a log line
  (captured at DEBUG in process, or from the stderr of real `promo serve` / `promo worker`
  subprocesses), nor an error message or a response.
- Webhook signatures are checked with the documented algorithm, written out here with
  hashlib/hmac (and with the plain-Python verifier copied from docs/webhooks.md).
- TLS (covered by test_tls.py for plaintext vs TLS) does not replace the API key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib
import json
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from config.settings import ApiKeyConfig, Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import codes_pb2 as codepb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from server.app import Dependencies, start_server
from server.logs import JsonFormatter
from storage import webhooks as repo
from tests.conftest import (
    ADMIN_KEY,
    LISTENER_KEY,
    RUNTIME_KEY,
    TEST_API_KEYS,
    Api,
    rpc_error_reason,
    serving_api,
)
from tests.e2e.promo_helpers import promotion, reward_type
from tests.e2e.promo_process import REPO, clean_env
from tests.integration.test_email_delivery import FROM, Relay, smtp_server
from tests.webhook_listener import WebhookListener, free_port
from workers import webhooks
from workers.outbox import run_outbox_job

ROOT = Path(__file__).resolve().parents[2]
SERVICE_MODULES = ("bonuses", "campaigns", "codes", "customers", "formulas", "listeners",
                   "products", "promotions", "reward_types", "rewards")
KEYS = {"admin": ADMIN_KEY, "runtime": RUNTIME_KEY, "listener": LISTENER_KEY}
KEY_NAMES = {"admin": "test-admin", "runtime": "test-runtime", "listener": "test-listener"}
UNKNOWN_KEY = ADMIN_KEY + "-but-not-quite"  # looks like a real key, is none
SCHEDULED = lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN
USER_AGENT = "promo-engine-webhooks/1"
DENIED = ("PERMISSION_DENIED", "ROLE_REQUIRED")
AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


# --- The documented role table ----------------------------------------------------------------

# Statements that cover a whole service ("Requires the `admin` role", "(role `listener`)", ...):
# reward_types.proto, promotions.proto, rewards.proto, codes.proto, formulas.proto,
# listeners.proto + docs/webhooks.md ("ListenerService (role admin)"), campaigns.proto; README:
# "runtime (promotion systems: GetReward and friends), listener (webhook listeners: the clearance
# calls)".
SERVICE_WIDE_ROLES = {
    "promo.v1.RewardTypeService": "admin",
    "promo.v1.PromotionService": "admin",
    "promo.v1.RewardService": "runtime",
    "promo.v1.CodePoolService": "admin",
    "promo.v1.FormulaService": "admin",
    "promo.v1.ListenerService": "admin",
    "promo.v1.CampaignService": "admin",
    "promo.v1.ClearanceService": "listener",
    # jobs.proto: "Every call requires the `admin` role."
    "promo.v1.JobService": "admin",
}
# customers.proto: "Writes (UpsertCustomers, RecordEvents) need the `runtime` role ... Reads
# need `admin`."
CUSTOMER_ROLES = {"UpsertCustomers": "runtime", "RecordEvents": "runtime",
                  "GetCustomer": "admin", "ListCustomers": "admin",
                  "ListCustomerEvents": "admin"}


def _products_table() -> dict[str, str]:
    """docs/products.md: the `| RPC | role | what it does |` table."""
    roles: dict[str, str] = {}
    text = (ROOT / "docs" / "products.md").read_text()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] in ("admin", "runtime", "listener"):
            for name in re.findall(r"`([A-Za-z]+)`", cells[0]):
                roles[name] = cells[1]
    return roles


def _bonus_roles() -> dict[str, str]:
    """bonuses.proto groups the RPCs under `// Admin: ...` and `// Runtime: ...` comments;
    docs/bonuses.md: "RequestBonusCalculation (runtime or admin)"."""
    roles: dict[str, str] = {}
    current: str | None = None
    text = (ROOT / "protos" / "promo" / "v1" / "bonuses.proto").read_text()
    body = text.split("service BonusService {", 1)[1].split("\n}", 1)[0]
    for line in body.splitlines():
        heading = re.match(r"\s*//\s*(Admin|Runtime)\b", line)
        if heading:
            current = heading.group(1).lower()
        rpc = re.match(r"\s*rpc\s+(\w+)\(", line)
        if rpc and current:
            roles[rpc.group(1)] = current
    return roles


def documented_roles() -> dict[str, str]:
    """Full method path -> the non-admin role the documents give it ("admin" when only admin).
    Admin may call everything (README)."""
    table: dict[str, str] = {}
    for service, role in SERVICE_WIDE_ROLES.items():
        for rpc in RPCS:
            if rpc.service == service:
                table[rpc.path] = role
    for name, role in CUSTOMER_ROLES.items():
        table[f"/promo.v1.CustomerService/{name}"] = role
    for name, role in _products_table().items():
        table[f"/promo.v1.ProductPromotionService/{name}"] = role
    for name, role in _bonus_roles().items():
        table[f"/promo.v1.BonusService/{name}"] = role
    return table


def may_call(role: str | set[str], path: str) -> bool:
    roles = {role} if isinstance(role, str) else role
    return "admin" in roles or DOC_ROLES.get(path) in roles


# --- Every RPC from the descriptors -----------------------------------------------------------

@dataclass(frozen=True)
class Rpc:
    path: str
    service: str
    name: str
    request_type: Any
    client_streaming: bool


def _all_rpcs() -> list[Rpc]:
    out: list[Rpc] = []
    for name in SERVICE_MODULES:
        module = importlib.import_module(f"promo.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append(Rpc(f"/{service.full_name}/{method.name}", service.full_name,
                               method.name, getattr(module, method.input_type.name),
                               method.client_streaming))
    return out


RPCS = _all_rpcs()
DOC_ROLES = documented_roles()


@dataclass(frozen=True)
class Outcome:
    code: str
    reason: str | None
    details: str
    trailers: tuple[tuple[str, Any], ...]

    @property
    def pair(self) -> tuple[str, str | None]:
        return self.code, self.reason

    def mentions(self, secret: str) -> bool:
        """Whether the secret appears in the message or any trailer (the google.rpc status
        details included, raw bytes)."""
        if secret in self.details:
            return True
        for _, value in self.trailers:
            raw = value if isinstance(value, bytes) else str(value).encode()
            if secret.encode() in raw:
                return True
        return False


async def _outcome(call: Any) -> Outcome:
    try:
        await call
    except grpc.RpcError as exc:
        try:
            reason = rpc_error_reason(exc)
        except ValueError:
            reason = None
        return Outcome(exc.code().name, reason, exc.details() or "",
                       tuple(exc.trailing_metadata() or ()))  # type: ignore[attr-defined]
    return Outcome("OK", None, "", ())


async def call_rpc(channel: aio.Channel, rpc: Rpc, metadata: tuple[tuple[str, str], ...],
                   request: Message | None = None) -> Outcome:
    message = request if request is not None else rpc.request_type()
    if rpc.client_streaming:
        stream = channel.stream_unary(rpc.path, request_serializer=rpc.request_type
                                      .SerializeToString, response_deserializer=lambda r: r)

        async def one() -> AsyncIterator[Message]:
            yield message
        return await _outcome(stream(one(), metadata=metadata, timeout=15))
    unary = channel.unary_unary(rpc.path, request_serializer=rpc.request_type.SerializeToString,
                                response_deserializer=lambda r: r)
    return await _outcome(unary(message, metadata=metadata, timeout=15))


def by_path(path: str) -> Rpc:
    return next(r for r in RPCS if r.path == path)


def x_api_key(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# --- Logs, captured as they are written -----------------------------------------------------

@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log record of this process at DEBUG, formatted by the service's JSON formatter
    in the call's own context (request id, method, principal), plus the raw record. The local
    SMTP relay's own log (aiosmtpd, logger "mail.log") is not the engine's and is left out."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith("mail."):
                return
            with contextlib.suppress(Exception):
                lines.append(self.format(record))
            lines.append(repr(vars(record)))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out


def leaked(texts: list[str], secrets: dict[str, str]) -> dict[str, list[str]]:
    """Which secrets (by label) appear in which texts (cut for the report)."""
    found: dict[str, list[str]] = {}
    for label, secret in secrets.items():
        hits = [t[:300] for t in texts if secret in t]
        if hits:
            found[label] = hits[:3]
    return found


# --- Webhook helpers ---------------------------------------------------------------------------

async def emit(pool: asyncpg.Pool, now: datetime, *,
               event_type: EventType = EventType.SCHEDULED_CAMPAIGN,
               payload: dict[str, Any] | None = None) -> str:
    async with pool.acquire() as conn, conn.transaction():
        emitted = await repo.emit_event(conn, event_type=event_type, now=now,
                                        payload=payload or {"campaign_id": "spring"})
    assert emitted is not None
    return emitted.event_id


async def deliver_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    """Every due delivery job through the outbox runner (the arq entry point), on the pinned
    clock that the listener's timestamp check shares."""
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


def documented_v1(secret: str, timestamp: str, body: bytes) -> str:
    """docs/webhooks.md: signed = Promo-Timestamp + "." + raw body bytes;
    v1 = hex(HMAC-SHA256(key = UTF-8 bytes of the secret, message = signed))."""
    signed = timestamp.encode() + b"." + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def v1_values(header: str) -> list[str]:
    values = [part.strip() for part in header.split(",")]
    assert all(v.startswith("v1=") for v in values), header
    return [v[3:] for v in values]


async def register(api: Api, url: str, *, request_id: str, secret: str = "",
                   event_type: int = SCHEDULED) -> lpb.RegisterListenerResponse:
    response: lpb.RegisterListenerResponse = await lpb_grpc.ListenerServiceStub(
        api.channel).RegisterListener(lpb.RegisterListenerRequest(
            request_id=request_id, listener=lpb.Listener(event_type=event_type,  # type: ignore[arg-type]
                                                         url=url, secret=secret)),
        metadata=api.key())
    return response


async def rotate(api: Api, listener_id: int, *, request_id: str,
                 secret: str = "") -> lpb.UpdateListenerResponse:
    response: lpb.UpdateListenerResponse = await lpb_grpc.ListenerServiceStub(
        api.channel).UpdateListener(lpb.UpdateListenerRequest(
            request_id=request_id, listener=lpb.Listener(listener_id=listener_id, secret=secret),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    return response


# ============================================================================================
# Roles and API keys
# ============================================================================================

def test_the_documented_role_table_names_every_rpc() -> None:
    """README: every RPC except health and reflection needs a key and a role. Every RPC of every
    service must have a documented role, and the documents must name no RPC that does not
    exist."""
    paths = {r.path for r in RPCS}
    undocumented = sorted(paths - set(DOC_ROLES))
    unknown = sorted(set(DOC_ROLES) - paths)
    assert (undocumented, unknown) == ([], [])
    assert len(paths) == len(RPCS) > 70


async def test_every_rpc_without_a_key_is_unauthenticated(api: Api) -> None:
    """README: "A missing ... key gets UNAUTHENTICATED" (ErrorInfo reason MISSING_API_KEY), and
    the failed call still carries its x-request-id in the trailers."""
    wrong: dict[str, object] = {}
    for rpc in RPCS:
        request_id = f"audit-{rpc.name}"
        outcome = await call_rpc(api.channel, rpc, (("x-request-id", request_id),))
        trailers = dict(outcome.trailers)
        if outcome.pair != ("UNAUTHENTICATED", "MISSING_API_KEY") or \
                trailers.get("x-request-id") != request_id:
            wrong[rpc.path] = (outcome.pair, outcome.details, trailers.get("x-request-id"))
    assert wrong == {}


async def test_every_rpc_with_an_unknown_key_is_unauthenticated_and_never_echoes_it(
        api: Api) -> None:
    """README: an unknown key gets UNAUTHENTICATED; the error (message, ErrorInfo, trailers)
    must not echo the key, whichever header carried it."""
    wrong: dict[str, object] = {}
    for rpc in RPCS:
        for metadata in (x_api_key(UNKNOWN_KEY), bearer(UNKNOWN_KEY)):
            outcome = await call_rpc(api.channel, rpc, metadata)
            if outcome.pair != ("UNAUTHENTICATED", "INVALID_API_KEY") or \
                    outcome.mentions(UNKNOWN_KEY):
                wrong[f"{rpc.path} ({metadata[0][0]})"] = (outcome.pair, outcome.details)
    assert wrong == {}


@pytest.mark.parametrize("role", ["runtime", "listener"])
async def test_a_key_is_denied_exactly_where_the_docs_do_not_grant_its_role(
        api: Api, role: str) -> None:
    """README: "a key without the role PERMISSION_DENIED"; the role of each RPC as the documents
    give it. Denied calls (empty, invalid requests) are refused before any validation; allowed
    calls get past the check. The message names the key's name, never the key."""
    wrong: dict[str, object] = {}
    for rpc in RPCS:
        request_id = f"{role}-{rpc.name}"
        outcome = await call_rpc(api.channel, rpc,
                                 (*api.key(role), ("x-request-id", request_id)))
        allowed = may_call(role, rpc.path)
        if allowed and outcome.code in AUTH_CODES:
            wrong[rpc.path] = ("documented as allowed", outcome.pair, outcome.details)
        elif not allowed and (outcome.pair != DENIED or KEY_NAMES[role] not in outcome.details
                              or dict(outcome.trailers).get("x-request-id") != request_id):
            wrong[rpc.path] = ("documented as denied", outcome.pair, outcome.details)
        if outcome.mentions(KEYS[role]):
            wrong[rpc.path + " (echoes the key)"] = outcome.details
    assert wrong == {}


async def test_admin_may_call_every_rpc(api: Api) -> None:
    """README: `admin` (operators: everything)."""
    wrong = {}
    for rpc in RPCS:
        outcome = await call_rpc(api.channel, rpc, api.key("admin"))
        if outcome.code in AUTH_CODES:
            wrong[rpc.path] = (outcome.pair, outcome.details)
    assert wrong == {}


async def test_a_key_with_two_roles_may_call_what_either_role_may(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Settings: PROMO_API_KEYS entries carry a list of roles; a key with runtime and listener
    may call the RPCs of both and nothing else."""
    both = "bridge-key-runtime-and-listener-0123"
    keyed = settings.model_copy(update={"api_keys": [
        *TEST_API_KEYS, ApiKeyConfig(name="bridge", key=SecretStr(both),
                                     roles=["runtime", "listener"])]})
    wrong: dict[str, object] = {}
    async with serving_api(keyed, pool, clock) as api:
        for rpc in RPCS:
            outcome = await call_rpc(api.channel, rpc, x_api_key(both))
            allowed = may_call({"runtime", "listener"}, rpc.path)
            if allowed == (outcome.code in AUTH_CODES) or (not allowed and outcome.pair != DENIED):
                wrong[rpc.path] = (allowed, outcome.pair, outcome.details)
    assert wrong == {}


async def test_bearer_authorization_is_checked_like_x_api_key(api: Api) -> None:
    """README: the key is sent "as `x-api-key: KEY` or `authorization: Bearer KEY`": the same
    roles apply through either header; another scheme carries no key."""
    wrong: dict[str, object] = {}
    for role, key in KEYS.items():
        for rpc in RPCS:
            outcome = await call_rpc(api.channel, rpc, bearer(key))
            allowed = may_call(role, rpc.path)
            if allowed == (outcome.code in AUTH_CODES) or (not allowed and outcome.pair != DENIED):
                wrong[f"{role} {rpc.path}"] = (allowed, outcome.pair)
    list_types = by_path("/promo.v1.RewardTypeService/ListRewardTypes")
    basic = await call_rpc(api.channel, list_types,
                           (("authorization", "Basic " + base64.b64encode(
                               f"x:{ADMIN_KEY}".encode()).decode()),))
    assert wrong == {}
    assert basic.pair == ("UNAUTHENTICATED", "MISSING_API_KEY")


async def test_the_configured_sha256_is_not_itself_a_key(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Settings: a key may be configured by its `key_sha256`; the hash is what the server
    keeps, and presenting the hash instead of the key must not authenticate."""
    secret_key = "ops-key-configured-by-hash-0123456789"
    digest = hashlib.sha256(secret_key.encode()).hexdigest()
    keyed = settings.model_copy(update={"api_keys": [
        ApiKeyConfig(name="ops", key_sha256=digest.upper(), roles=["admin"])]})
    list_types = by_path("/promo.v1.RewardTypeService/ListRewardTypes")
    async with serving_api(keyed, pool, clock) as api:
        with_key = await call_rpc(api.channel, list_types, x_api_key(secret_key))
        with_hash = await call_rpc(api.channel, list_types, x_api_key(digest))
        with_upper = await call_rpc(api.channel, list_types, x_api_key(digest.upper()))
    assert with_key.code == "OK"
    assert with_hash.pair == with_upper.pair == ("UNAUTHENTICATED", "INVALID_API_KEY")


async def test_a_server_without_keys_refuses_every_rpc_but_health(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """With PROMO_API_KEYS empty (the default `[]`) no key is known: every RPC is
    UNAUTHENTICATED, the former admin key included; health still answers without a key."""
    bare = settings.model_copy(update={"api_keys": []})
    async with serving_api(bare, pool, clock) as api:
        outcomes = {rpc.path: (await call_rpc(api.channel, rpc, api.key("admin"))).pair
                    for rpc in RPCS}
        health = await health_pb2_grpc.HealthStub(api.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
    assert {p: o for p, o in outcomes.items()
            if o != ("UNAUTHENTICATED", "INVALID_API_KEY")} == {}
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def _row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'")]
        return {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}


async def test_refused_calls_with_valid_requests_write_nothing(
        api: Api, pool: asyncpg.Pool) -> None:
    """The role check comes before any work: well-formed mutating requests from a key without
    the role (or without a key) are refused and leave every table as it was (no row, no stored
    request id)."""
    await reward_type(api)
    await promotion(api, "VIP25")
    before = await _row_counts(pool)
    cases = [
        ("/promo.v1.RewardTypeService/CreateRewardType", api.key("runtime"),
         rtpb.CreateRewardTypeRequest(request_id="rt-x", reward_type=rtpb.RewardType(
             name="spins", display_name="Spins", category=rtpb.REWARD_CATEGORY_UNITS))),
        ("/promo.v1.RewardService/GetReward", api.key("listener"),
         rpb.GetRewardRequest(promotion_code="VIP25", customer_id="c1", request_id="gr-1")),
        ("/promo.v1.RewardService/GetReward", (),
         rpb.GetRewardRequest(promotion_code="VIP25", customer_id="c1", request_id="gr-2")),
        ("/promo.v1.ListenerService/RegisterListener", api.key("runtime"),
         lpb.RegisterListenerRequest(request_id="l-1", listener=lpb.Listener(
             event_type=SCHEDULED, url="https://hooks.example.com/x"))),
        ("/promo.v1.ListenerService/RegisterListener", api.key("listener"),
         lpb.RegisterListenerRequest(request_id="l-2", listener=lpb.Listener(
             event_type=SCHEDULED, url="https://hooks.example.com/x"))),
        ("/promo.v1.CustomerService/UpsertCustomers", api.key("listener"),
         custpb.UpsertCustomersRequest(request_id="u-1", customers=[
             custpb.Customer(customer_id="c1")])),
        ("/promo.v1.PromotionService/DeactivatePromotion", api.key("runtime"),
         ppb.DeactivatePromotionRequest(request_id="d-1", promotion_code="VIP25")),
        ("/promo.v1.CodePoolService/UploadCodes", api.key("runtime"),
         codepb.UploadCodesRequest(request_id="up-1", promotion_code="VIP25",
                                   data=b"CODE-1\nCODE-2\n")),
    ]
    outcomes = {f"{path} {meta[0][1][:12] if meta else 'no key'}":
                (await call_rpc(api.channel, by_path(path), meta, request)).pair
                for path, meta, request in cases}
    assert all(pair[0] in AUTH_CODES for pair in outcomes.values()), outcomes
    assert await _row_counts(pool) == before


# ============================================================================================
# Health and reflection
# ============================================================================================

async def test_health_check_and_watch_need_no_key(api: Api) -> None:
    """README: "Every RPC except health checking and reflection needs an API key";
    operations.md: the load balancer's health check "needs no API key"."""
    health = health_pb2_grpc.HealthStub(api.channel)
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    services = sorted({r.service for r in RPCS})
    per_service = {s: (await health.Check(health_pb2.HealthCheckRequest(service=s),
                                          timeout=5)).status for s in services}
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    first = await watch.read()
    watch.cancel()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert overall.status == serving
    assert per_service == dict.fromkeys(services, serving)
    assert first.status == serving  # type: ignore[union-attr]


async def test_reflection_lists_and_describes_services_without_a_key(api: Api) -> None:
    """README: "grpcurl -plaintext 127.0.0.1:50051 list" works without a key (reflection is
    on): every promo service is listed and its descriptor can be fetched."""
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="promo.v1.RewardService")

    answers = [a async for a in stub.ServerReflectionInfo(requests(), timeout=5)]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {r.service for r in RPCS} <= listed
    assert "grpc.health.v1.Health" in listed
    assert answers[1].WhichOneof("message_response") == "file_descriptor_response"


# ============================================================================================
# Secrets never logged, never echoed
# ============================================================================================

async def test_api_keys_never_reach_the_log_and_log_lines_name_the_key(api: Api) -> None:
    """Settings: "only their SHA-256 is kept in memory; names (never keys) appear in logs";
    operations.md: one JSON line per RPC with "caller's key name". Calls with each key through
    both headers, refused ones and an unknown key included, at DEBUG."""
    list_types = by_path("/promo.v1.RewardTypeService/ListRewardTypes")
    create_type = by_path("/promo.v1.RewardTypeService/CreateRewardType")
    get_reward = by_path("/promo.v1.RewardService/GetReward")
    with captured_logs() as lines:
        ok = await call_rpc(api.channel, list_types, bearer(ADMIN_KEY))
        await call_rpc(api.channel, list_types, api.key("admin"))
        denied = await call_rpc(api.channel, create_type, api.key("runtime"))
        await call_rpc(api.channel, get_reward, bearer(LISTENER_KEY))
        unknown = await call_rpc(api.channel, list_types, x_api_key(UNKNOWN_KEY))
    assert (ok.code, denied.pair, unknown.pair) == (
        "OK", DENIED, ("UNAUTHENTICATED", "INVALID_API_KEY"))
    assert leaked(lines, {"admin": ADMIN_KEY, "runtime": RUNTIME_KEY,
                          "listener": LISTENER_KEY, "unknown": UNKNOWN_KEY}) == {}
    by_call = {(e.get("method"), e.get("code")): e.get("principal") for e in json_lines(lines)
               if e.get("msg") in ("rpc", "rpc failed")}
    assert by_call[(list_types.path, "OK")] == "test-admin"
    assert by_call[(create_type.path, "PERMISSION_DENIED")] == "test-runtime"
    assert by_call[(get_reward.path, "PERMISSION_DENIED")] == "test-listener"
    assert by_call[(list_types.path, "UNAUTHENTICATED")] == "anonymous"


async def test_chosen_listener_secrets_never_reach_logs_or_responses(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: GetListener/ListListeners "never return a secret"; listeners.proto:
    the secret is "Input only, never returned". A chosen secret, a retry, a rotation to another
    chosen secret and a signed delivery at DEBUG: no log line, no response and no delivery
    record holds either secret."""
    first, second = "chosen-secret-ALPHA-0123456789", "chosen-secret-BRAVO-9876543210"
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    responses: list[Message] = []
    with captured_logs() as lines:
        created = await register(api, listener.url, request_id="reg-1", secret=first)
        responses += [created, await register(api, listener.url, request_id="reg-1",
                                              secret=first)]
        listener_id = created.listener.listener_id
        responses.append(await rotate(api, listener_id, request_id="rot-1", secret=second))
        responses.append(await stub.GetListener(lpb.GetListenerRequest(listener_id=listener_id),
                                                metadata=api.key()))
        responses.append(await stub.ListListeners(lpb.ListListenersRequest(),
                                                  metadata=api.key()))
        listener.secrets = [second, first]
        await emit(pool, clock.now())
        assert await deliver_due(pool, settings, clock) == ["done"]
        deliveries = await stub.ListDeliveries(lpb.ListDeliveriesRequest(), metadata=api.key())
        responses.append(deliveries)
        responses.append(await stub.GetDelivery(lpb.GetDeliveryRequest(
            delivery_id=deliveries.deliveries[0].delivery_id), metadata=api.key()))
    [got] = listener.received
    assert got.verify_error is None
    texts = [*lines, *(str(r) for r in responses),
             *(r.SerializeToString().decode("latin-1") for r in responses)]
    assert leaked(texts, {"first": first, "second": second}) == {}


async def test_generated_secrets_are_returned_once_and_never_logged(api: Api) -> None:
    """docs/webhooks.md: "No secret: the server generates 32 random bytes (43 URL-safe
    characters) and returns them once in generated_secret (and to a retry with the same
    request_id)"; rotation with an empty secret likewise. Neither reaches a log line or a read."""
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    with captured_logs() as lines:
        created = await register(api, "https://hooks.example.com/a", request_id="gen-1")
        retried = await register(api, "https://hooks.example.com/a", request_id="gen-1")
        listener_id = created.listener.listener_id
        rotated = await rotate(api, listener_id, request_id="gen-rot")
        read = await stub.GetListener(lpb.GetListenerRequest(listener_id=listener_id),
                                      metadata=api.key())
        listed = await stub.ListListeners(lpb.ListListenersRequest(), metadata=api.key())
    generated, fresh = created.generated_secret, rotated.generated_secret
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", generated)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", fresh) and fresh != generated
    assert retried.generated_secret == generated
    reads = [str(read), str(listed), read.SerializeToString().decode("latin-1"),
             listed.SerializeToString().decode("latin-1")]
    assert leaked([*lines, *reads], {"generated": generated, "rotated": fresh}) == {}


BAD_SECRETS = {
    "too short": "tiny-s3cr3t!",
    "trailing space": "trailing-space-SECRET-0123 ",
    "sealed prefix": "enc:v1:deadbeef:not-really-sealed-SECRET",
    "too long": ("LongSecret-" * 30)[:300],
    "control character": "tab\tinside-the-SECRET-value",
}


async def test_refused_secrets_are_not_echoed_in_errors_or_logs(api: Api) -> None:
    """docs/webhooks.md: a bad `secret` is INVALID_ARGUMENT (INVALID_SECRET). The refusal
    names the field, never the value (on RegisterListener and UpdateListener), and no log line
    holds it."""
    created = await register(api, "https://hooks.example.com/a", request_id="base")
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    wrong: dict[str, object] = {}
    with captured_logs() as lines:
        for label, secret in BAD_SECRETS.items():
            registered = await _outcome(stub.RegisterListener(lpb.RegisterListenerRequest(
                request_id=f"bad-{len(secret)}", listener=lpb.Listener(
                    event_type=SCHEDULED, url="https://hooks.example.com/b", secret=secret)),
                metadata=api.key()))
            updated = await _outcome(stub.UpdateListener(lpb.UpdateListenerRequest(
                request_id=f"bad-u-{len(secret)}", listener=lpb.Listener(
                    listener_id=created.listener.listener_id, secret=secret),
                update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key()))
            probe = secret.strip()[:12] if label != "too long" else "LongSecret-LongSecret"
            for rpc, outcome in (("Register", registered), ("Update", updated)):
                if outcome.pair != ("INVALID_ARGUMENT", "INVALID_SECRET") or \
                        outcome.mentions(probe):
                    wrong[f"{rpc} {label}"] = (outcome.pair, outcome.details)
    secrets = {label: (s.strip()[:12] if label != "too long" else "LongSecret-LongSecret")
               for label, s in BAD_SECRETS.items()}
    assert wrong == {}
    assert leaked(lines, secrets) == {}


async def _context_logged(api: Api, context: dict[str, str]) -> tuple[dict[str, str],
                                                                       list[str]]:
    await reward_type(api)
    await promotion(api)
    with captured_logs() as lines:
        granted = await api.channel.unary_unary(
            "/promo.v1.RewardService/GetReward",
            request_serializer=rpb.GetRewardRequest.SerializeToString,
            response_deserializer=rpb.GetRewardResponse.FromString)(
            rpb.GetRewardRequest(promotion_code="VIP25", customer_id="alice",
                                 request_id="ctx-1", context=context),
            metadata=api.key("runtime"), timeout=10)
    assert granted.HasField("grant")
    [entry] = [e for e in json_lines(lines) if e.get("msg") == "get reward context"]
    return entry["activation_context"], lines


async def test_get_reward_context_credentials_are_redacted(api: Api) -> None:
    """README (Status) and rewards.proto: GetReward's context is logged, "values of keys that
    name a credential redacted". Common spellings of passwords, secrets, tokens, API keys,
    authorization headers, sessions, cookies and private keys."""
    names = ["password", "Passwd", "client_secret", "access_token", "refreshToken", "api_key",
             "apiKey", "X-API-Key", "Authorization", "credentials", "session_id", "Cookie",
             "private_key", "passphrase"]
    context = {name: f"VALUE-{i}-{uuid.uuid4().hex}" for i, name in enumerate(names)}
    context["channel"] = "sms-campaign-42"
    shown, lines = await _context_logged(api, context)
    assert shown["channel"] == "sms-campaign-42"
    assert {n: shown.get(n) for n in names} == dict.fromkeys(names, "[redacted]")
    assert leaked(lines, {n: context[n] for n in names}) == {}


async def test_get_reward_context_common_credential_abbreviations_are_redacted(
        api: Api) -> None:
    """The same promise for keys that name a credential by a common short name: a password
    (`pwd`), a bearer token (`bearer`), a JSON web token (`jwt`), an access key
    (`access_key`)."""
    names = ["pwd", "bearer", "jwt", "access_key"]
    context = {name: f"VALUE-{i}-{uuid.uuid4().hex}" for i, name in enumerate(names)}
    shown, lines = await _context_logged(api, context)
    assert {n: shown.get(n) for n in names} == dict.fromkeys(names, "[redacted]")
    assert leaked(lines, context) == {}


async def test_the_smtp_password_is_never_logged_or_recorded(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Settings / docs/webhooks.md: PROMO_SMTP_PASSWORD is "a secret, never logged or shown".
    A real relay first refuses the login (535: FAILED), then, redelivered, accepts it; the
    worker path runs at DEBUG. Neither the log, the delivery log (last_error, attempts) nor any
    response holds the password."""
    password = "smtp-PASSWORD-" + uuid.uuid4().hex
    port = free_port()
    mail = settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_from": FROM,
        "smtp_username": "promo", "smtp_password": SecretStr(password),
        "smtp_starttls": False, "smtp_timeout_seconds": 2.0})
    relay = Relay()
    accept = {"now": False}
    logins: list[str] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append(auth_data.password.decode())
        return AuthResult(success=accept["now"], handled=False)  # False: reply 535

    responses: list[Message] = []
    with smtp_server(relay, port, auth_required=True, auth_require_tls=False,
                     authenticator=authenticate), captured_logs() as lines:
        async with serving_api(mail, pool, clock) as api:
            stub = lpb_grpc.ListenerServiceStub(api.channel)
            await stub.RegisterListener(lpb.RegisterListenerRequest(
                request_id="mail-1", listener=lpb.Listener(
                    event_type=lpb.EVENT_TYPE_CODE_POOL_THRESHOLD,
                    channel=lpb.LISTENER_CHANNEL_EMAIL, email_recipients=["ops@example.com"])),
                metadata=api.key())
            await emit(pool, clock.now(), event_type=EventType.CODE_POOL_THRESHOLD,
                       payload={"promotion_code": "LOYALTY10", "remaining": 40, "total": 1000,
                                "threshold": "50"})
            await deliver_due(pool, mail, clock)
            listed = await stub.ListDeliveries(lpb.ListDeliveriesRequest(), metadata=api.key())
            failed = listed.deliveries[0]
            responses += [listed, await stub.GetDelivery(lpb.GetDeliveryRequest(
                delivery_id=failed.delivery_id), metadata=api.key())]
            accept["now"] = True
            await stub.RedeliverEvent(lpb.RedeliverEventRequest(
                request_id="again", delivery_id=failed.delivery_id), metadata=api.key())
            await deliver_due(pool, mail, clock)
            responses.append(await stub.GetDelivery(lpb.GetDeliveryRequest(
                delivery_id=failed.delivery_id), metadata=api.key()))
    assert failed.status == lpb.DELIVERY_STATUS_FAILED
    assert responses[-1].delivery.status == lpb.DELIVERY_STATUS_DELIVERED  # type: ignore[attr-defined]
    assert set(logins) == {password} and len(relay.accepted) == 1  # PLAIN, LOGIN, PLAIN
    async with pool.acquire() as conn:
        rows = [str(dict(r)) for table in ("webhook_deliveries", "webhook_attempts",
                                           "outbox_jobs")
                for r in await conn.fetch(f"SELECT * FROM {table}")]
    texts = [*lines, *rows, *(str(r) for r in responses)]
    assert leaked(texts, {"smtp password": password}) == {}


async def test_promo_serve_and_worker_at_debug_never_print_a_secret(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path) -> None:
    """The real `promo serve` and `promo worker` with PROMO_LOG_LEVEL=DEBUG, API keys in
    PROMO_API_KEYS, an SMTP password, a secret-encryption key; calls with good, refused and
    unknown keys; a listener registered with a chosen secret gets a signed webhook and an
    e-mail goes through the relay with AUTH. Their whole output holds none of the secrets."""
    password = "smtp-PASSWORD-" + uuid.uuid4().hex
    chosen = "chosen-webhook-SECRET-" + uuid.uuid4().hex[:12]
    sealing = base64.b64encode(bytes(range(40, 72))).decode()
    grpc_port, smtp_port = free_port(), free_port()
    env = clean_env(
        PROMO_DATABASE_URL=settings.database_url or "", PROMO_REDIS_URL=settings.redis_url or "",
        PROMO_QUEUE_NAME=settings.queue_name, PROMO_GRPC_PORT=str(grpc_port),
        PROMO_LOG_LEVEL="DEBUG", PROMO_LOG_FORMAT="json", PROMO_MIGRATE_ON_START="false",
        PROMO_API_KEYS=json.dumps([
            {"name": "ops-admin", "key": ADMIN_KEY, "roles": ["admin"]},
            {"name": "ops-runtime", "key": RUNTIME_KEY, "roles": ["runtime"]}]),
        PROMO_SECRET_ENCRYPTION_KEYS=sealing, PROMO_SMTP_HOST="127.0.0.1",
        PROMO_SMTP_PORT=str(smtp_port), PROMO_SMTP_USERNAME="promo",
        PROMO_SMTP_PASSWORD=password, PROMO_SMTP_FROM="alerts@promo.example.com",
        PROMO_SMTP_STARTTLS="false", PROMO_SWEEPER_INTERVAL_SECONDS="1",
        PROMO_JOB_RETRY_BASE_SECONDS="0.05", PROMO_JOB_RETRY_MAX_SECONDS="0.5",
        PROMO_WEBHOOK_RETRY_MAX_SECONDS="0.5",
        PROMO_SHUTDOWN_GRACE_SECONDS="1")
    relay = Relay()
    logins: list[str] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        logins.append(auth_data.password.decode())
        return AuthResult(success=auth_data.password.decode() == password, handled=False)

    hook = await WebhookListener(secrets=[chosen]).start()
    outputs = {name: tmp_path / f"{name}.log" for name in ("serve", "worker")}
    procs: list[asyncio.subprocess.Process] = []
    try:
        with smtp_server(relay, smtp_port, auth_required=True, auth_require_tls=False,
                         authenticator=authenticate):
            for name, out in outputs.items():
                with out.open("wb") as sink:
                    procs.append(await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "cli.main", name, env=env, cwd=REPO,
                        stdout=sink, stderr=sink))
            async with aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), timeout=30)
                api = Api(channel=channel, address=f"127.0.0.1:{grpc_port}")
                stub = lpb_grpc.ListenerServiceStub(channel)
                await stub.RegisterListener(lpb.RegisterListenerRequest(
                    request_id="hook", listener=lpb.Listener(
                        event_type=lpb.EVENT_TYPE_CODE_POOL_THRESHOLD, url=hook.url,
                        secret=chosen)), metadata=bearer(ADMIN_KEY))
                await stub.RegisterListener(lpb.RegisterListenerRequest(
                    request_id="mail", listener=lpb.Listener(
                        event_type=lpb.EVENT_TYPE_CODE_POOL_THRESHOLD,
                        channel=lpb.LISTENER_CHANNEL_EMAIL,
                        email_recipients=["ops@example.com"])), metadata=api.key())
                list_types = by_path("/promo.v1.RewardTypeService/ListRewardTypes")
                refused = [await call_rpc(channel, list_types, x_api_key(RUNTIME_KEY)),
                           await call_rpc(channel, list_types, x_api_key(UNKNOWN_KEY)),
                           await call_rpc(channel, list_types, bearer(UNKNOWN_KEY))]
                assert [o.code for o in refused] == ["PERMISSION_DENIED", "UNAUTHENTICATED",
                                                     "UNAUTHENTICATED"]
                await emit(pool, datetime.now(UTC), event_type=EventType.CODE_POOL_THRESHOLD,
                           payload={"promotion_code": "LOYALTY10", "remaining": 40,
                                    "total": 1000, "threshold": "50"})
                for _ in range(200):
                    if hook.processed and relay.accepted:
                        break
                    await asyncio.sleep(0.1)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await hook.stop()
    text = {name: out.read_text(errors="replace") for name, out in outputs.items()}
    assert hook.processed and relay.accepted and logins == [password], text
    assert '"level": "DEBUG"' in text["worker"] + text["serve"]  # DEBUG really was on
    assert '"principal": "ops-admin"' in text["serve"]
    assert leaked(list(text.values()), {
        "admin key": ADMIN_KEY, "runtime key": RUNTIME_KEY, "unknown key": UNKNOWN_KEY,
        "webhook secret": chosen, "smtp password": password, "sealing key": sealing}) == {}


# ============================================================================================
# Webhook signatures
# ============================================================================================

async def test_a_delivery_is_signed_as_documented(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md, "What a listener receives" and "Verifying the signature": the headers,
    `Promo-Timestamp` the Unix seconds of the attempt (the pinned clock), `Promo-Signature`
    `v1=<hex>` of HMAC-SHA256(secret, timestamp "." raw body), the body the exact bytes the
    delivery log shows."""
    secret = "documented-secret-0123456789abcdef"
    listener.secrets = [secret]
    created = await register(api, listener.url, request_id="r1", secret=secret)
    event_id = await emit(pool, clock.now())
    assert await deliver_due(pool, settings, clock) == ["done"]
    [got] = listener.received
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    [delivery] = (await stub.ListDeliveries(lpb.ListDeliveriesRequest(),
                                            metadata=api.key())).deliveries
    detail = await stub.GetDelivery(lpb.GetDeliveryRequest(delivery_id=delivery.delivery_id),
                                    metadata=api.key())
    headers = got.headers
    timestamp = str(int(clock.now().timestamp()))
    assert {k: headers.get(k.lower()) for k in (
        "Content-Type", "Promo-Event-Id", "Promo-Event-Type", "Promo-Timestamp",
        "Promo-Delivery-Id", "Promo-Delivery-Attempt", "User-Agent")} == {
        "Content-Type": "application/json", "Promo-Event-Id": event_id,
        "Promo-Event-Type": "5", "Promo-Timestamp": timestamp,
        "Promo-Delivery-Id": str(delivery.delivery_id), "Promo-Delivery-Attempt": "1",
        "User-Agent": USER_AGENT}
    assert headers["promo-signature"] == f"v1={documented_v1(secret, timestamp, got.body)}"
    assert got.body == detail.event_body.encode()
    assert json.loads(got.body)["event_id"] == event_id
    assert delivery.listener_id == created.listener.listener_id
    assert delivery.status == lpb.DELIVERY_STATUS_DELIVERED


async def test_a_retry_is_signed_at_its_own_time_over_the_same_body(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """"Promo-Timestamp: Unix seconds when this attempt was signed"; "The body is the same
    bytes on every attempt"; the attempt number counts up."""
    secret = "retry-secret-0123456789abcdef"
    listener.secrets = [secret]
    listener.answer(503)
    await register(api, listener.url, request_id="r1", secret=secret)
    await emit(pool, clock.now())
    await deliver_due(pool, settings, clock)
    clock.advance(timedelta(seconds=42))
    assert await deliver_due(pool, settings, clock) == ["done"]
    first, second = listener.received
    stamps = [r.headers["promo-timestamp"] for r in (first, second)]
    assert stamps == [str(int((clock.now() - timedelta(seconds=42)).timestamp())),
                      str(int(clock.now().timestamp()))]
    assert first.body == second.body
    assert [r.headers["promo-delivery-attempt"] for r in (first, second)] == ["1", "2"]
    for got in (first, second):
        assert got.headers["promo-signature"] == \
            f"v1={documented_v1(secret, got.headers['promo-timestamp'], got.body)}"


async def test_a_non_ascii_secret_signs_with_its_utf8_bytes(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: a secret is 16-256 printable characters; "its UTF-8 bytes are the HMAC
    key"."""
    secret = "clé-secrète-ünïcødé-✓-0123"
    listener.secrets = [secret]
    await register(api, listener.url, request_id="r1", secret=secret)
    await emit(pool, clock.now())
    assert await deliver_due(pool, settings, clock) == ["done"]
    [got] = listener.received
    timestamp = got.headers["promo-timestamp"]
    assert v1_values(got.headers["promo-signature"]) == [
        documented_v1(secret, timestamp, got.body)]


async def test_a_rotation_signs_with_new_then_previous_during_the_grace_only(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: after UpdateListener sets a new secret "the previous secret keeps
    signing for PROMO_WEBHOOK_SECRET_GRACE_SECONDS (default 24 h)": `v1=<hex>, v1=<hex>` (new
    secret first); "Each attempt reads the listener's current URL and secret: an update applies
    to deliveries already pending". After the grace only the new secret signs."""
    old, new = "rotation-OLD-secret-0123456789", "rotation-NEW-secret-9876543210"
    listener.secrets = [new, old]
    listener.answer(500)
    created = await register(api, listener.url, request_id="r1", secret=old)
    await emit(pool, clock.now())
    await deliver_due(pool, settings, clock)  # attempt 1: 500, signed with the old secret only
    rotated_at = clock.now()
    await rotate(api, created.listener.listener_id, request_id="rot", secret=new)
    clock.advance(timedelta(minutes=1))
    await deliver_due(pool, settings, clock)  # attempt 2 of the pending delivery
    clock.set(rotated_at + timedelta(seconds=settings.webhook_secret_grace_seconds, minutes=1))
    await emit(pool, clock.now())
    await deliver_due(pool, settings, clock)
    before, during, after = listener.received

    def expected(got: Any, *secrets: str) -> list[str]:
        return [documented_v1(s, got.headers["promo-timestamp"], got.body) for s in secrets]

    assert v1_values(before.headers["promo-signature"]) == expected(before, old)
    assert v1_values(during.headers["promo-signature"]) == expected(during, new, old)
    assert v1_values(after.headers["promo-signature"]) == expected(after, new)
    assert settings.webhook_secret_grace_seconds == 86400


async def test_a_generated_rotation_signs_with_the_secret_returned_once(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: "`secret` in the mask with an empty value generates a new one
    (returned once)"; the delivery is signed with it first, then the previous generated one."""
    created = await register(api, listener.url, request_id="r1")
    rotated = await rotate(api, created.listener.listener_id, request_id="rot")
    old, new = created.generated_secret, rotated.generated_secret
    listener.secrets = [new, old]
    await emit(pool, clock.now())
    assert await deliver_due(pool, settings, clock) == ["done"]
    [got] = listener.received
    timestamp = got.headers["promo-timestamp"]
    assert v1_values(got.headers["promo-signature"]) == [
        documented_v1(new, timestamp, got.body), documented_v1(old, timestamp, got.body)]


def _documented_verifier() -> Any:
    """The plain-Python verifier of docs/webhooks.md (the block after `<!-- plain-python -->`)."""
    text = (ROOT / "docs" / "webhooks.md").read_text()
    block = text.split("<!-- plain-python -->", 1)[1].split("```python", 1)[1]
    namespace: dict[str, Any] = {}
    exec(block.split("```", 1)[0], namespace)
    return namespace["verify_promo_webhook"]


async def test_the_documented_plain_python_verifier_accepts_a_real_delivery(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md gives a verifier "without our package, in plain Python" that checks the
    timestamp against the real clock: a real delivery signed now passes it; a changed body, a
    wrong secret or a timestamp older than 5 minutes do not."""
    clock.set(datetime.now(UTC))
    secret = "plain-python-secret-0123456789"
    listener.secrets = [secret]
    await register(api, listener.url, request_id="r1", secret=secret)
    await emit(pool, clock.now())
    assert await deliver_due(pool, settings, clock) == ["done"]
    [got] = listener.received
    verify = _documented_verifier()
    headers = {k.title(): v for k, v in got.headers.items()}
    assert verify(secret, headers, got.body) is True
    assert verify(secret, headers, got.body + b" ") is False
    assert verify("another-secret-0123456789", headers, got.body) is False
    stale = int(time.time()) - 301
    stale_headers = {**headers, "Promo-Timestamp": str(stale),
                     "Promo-Signature": f"v1={documented_v1(secret, str(stale), got.body)}"}
    assert verify(secret, stale_headers, got.body) is False


async def test_a_listener_url_with_credentials_is_refused_on_update_too(api: Api) -> None:
    """docs/webhooks.md: `url` has "no user name or password (the signature authenticates us;
    credentials would sit in logs and in every delivery row)": UpdateListener refuses one as
    RegisterListener does, without echoing the password, and keeps the old URL."""
    created = await register(api, "https://hooks.example.com/a", request_id="r1")
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    password = "Hunter2-PASSWORD-xyz"
    with captured_logs() as lines:
        outcome = await _outcome(stub.UpdateListener(lpb.UpdateListenerRequest(
            request_id="u1", listener=lpb.Listener(
                listener_id=created.listener.listener_id,
                url=f"https://ops:{password}@hooks.example.com/b"),
            update_mask=field_mask_pb2.FieldMask(paths=["url"])), metadata=api.key()))
    current = await stub.GetListener(lpb.GetListenerRequest(
        listener_id=created.listener.listener_id), metadata=api.key())
    assert outcome.pair == ("INVALID_ARGUMENT", "INVALID_URL")
    assert not outcome.mentions(password)
    assert current.listener.url == "https://hooks.example.com/a"
    assert leaked(lines, {"password": password}) == {}


# ============================================================================================
# TLS
# ============================================================================================

async def test_tls_and_mutual_tls_do_not_replace_the_api_key(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path) -> None:
    """Settings: with PROMO_TLS_CERT_FILE/KEY_FILE the server speaks TLS only, and with
    PROMO_TLS_CLIENT_CA_FILE it requires client certificates. Neither is an API key: over TLS,
    and with a client certificate, a call without a key is still UNAUTHENTICATED and one with a
    key of the wrong role PERMISSION_DENIED; health needs neither."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, root = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    root.write_bytes(ca.cert_pem.bytes())
    client = ca.issue_cert("promo-system")
    results: dict[str, tuple[str, ...]] = {}
    for mode, update in (("tls", {"tls_cert_file": chain, "tls_key_file": key}),
                         ("mtls", {"tls_cert_file": chain, "tls_key_file": key,
                                   "tls_client_ca_file": root})):
        running = await start_server(settings.model_copy(update=update),
                                     Dependencies(pool=pool))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root.read_bytes(),
            private_key=client.private_key_pem.bytes() if mode == "mtls" else None,
            certificate_chain=(b"".join(b.bytes() for b in client.cert_chain_pems)
                               if mode == "mtls" else None))
        try:
            async with aio.secure_channel(f"localhost:{running.port}", credentials) as channel:
                stub = rtpb_grpc.RewardTypeServiceStub(channel)
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
                outcomes = [await _outcome(stub.ListRewardTypes(
                    rtpb.ListRewardTypesRequest(), metadata=meta, timeout=5))
                    for meta in ((), x_api_key(RUNTIME_KEY), x_api_key(ADMIN_KEY))]
                results[mode] = (str(health.status), *(o.code for o in outcomes))
        finally:
            await running.stop(0)
    serving = str(health_pb2.HealthCheckResponse.SERVING)
    assert results == dict.fromkeys(("tls", "mtls"), (serving, "UNAUTHENTICATED",
                                                      "PERMISSION_DENIED", "OK"))
