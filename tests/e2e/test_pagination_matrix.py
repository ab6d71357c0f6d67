"""Paging matrix over every List RPC (README "Calling it", DESIGN "Contract style",
server/page_tokens.py, core/pagination.py).

Every RPC whose request has a ``page_token`` (found in the generated descriptors of the
promo.v1 *_pb2 modules) has one row in LISTS: a builder that makes N items through the real API
(and, for results, batches, ledger entries and deliveries, the real outbox job functions a worker
runs) and returns the items' ids in the documented order, plus filter variants with their
expected ids. Every row is checked for:

- paging with several page sizes (1, 2, 3, a mixed sequence, N, N + 1) lists every item exactly
  once, in order, every page as full as it can be, next_page_token empty exactly on the last
  page; the same for each filter variant;
- page_size 0 is the default (50; GetProcessedCampaignCustomers: 1000), a page_size above the
  maximum (1000; GetProcessedCampaignCustomers: 10,000) is lowered to it (checked with more than
  the maximum where the items can be made in bulk), a negative page_size is INVALID_ARGUMENT
  INVALID_PAGE_SIZE;
- a token that was edited, truncated or garbled, one sent to any other List RPC, or one used
  with other filters (or another parent id) is INVALID_ARGUMENT INVALID_PAGE_TOKEN.

KEYSET rows insert and delete items between pages for representative Lists: the rest of the
listing neither repeats nor skips the other items.

Orders: documented ones are quoted from the protos/docs; where no order is documented the row
says so and the engine's own stable order is asserted (the listing must at least be complete,
without repeats, and stable across pages).
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import pkgutil
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

import promo.v1
from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import jobs_pb2 as jpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import products_pb2 as prodpb
from promo.v1 import promotions_pb2 as ppb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.promo_helpers import reward_type, single
from tests.e2e.test_bonuses_api import create as create_definition
from tests.e2e.test_bonuses_api import definition, run_due_batches
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers.outbox import run_outbox_job

# --- the List RPCs, from the descriptors ------------------------------------------------------


def _list_methods() -> dict[str, MethodDescriptor]:
    found: dict[str, MethodDescriptor] = {}
    for info in pkgutil.iter_modules(promo.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"promo.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if "page_token" in method.input_type.fields_by_name:
                    assert method.name not in found, f"two List RPCs named {method.name}"
                    found[method.name] = method
    return found


METHODS = _list_methods()

# Required request fields of each List, for sending it a token of another List.
PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "ListCustomerEvents": {"customer_id": "x1"},
    "ListCustomerBonusLedger": {"customer_id": "x1"},
    "GetProcessedCampaignCustomers": {"campaign_id": "x1"},
    "ListProductLists": {"personalized_promotion_id": "x1"},
}


def _items_field(method: MethodDescriptor) -> str:
    [name] = [f.name for f in method.output_type.fields
              if f.is_repeated and f.type == FieldDescriptor.TYPE_MESSAGE]
    return name


async def call(api: Api, rpc: str, **fields: Any) -> Any:
    method = METHODS[rpc]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    stub = api.channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString)
    return await stub(request_cls(**fields), metadata=api.key())


def items_of(rpc: str, response: Any) -> list[Any]:
    return list(getattr(response, _items_field(METHODS[rpc])))


# --- rows ----------------------------------------------------------------------------------------


@dataclass
class Env:
    api: Api
    pool: asyncpg.Pool
    settings: Settings
    clock: FixedClock


@dataclass
class Listing:
    """What a builder made: the request fields every call needs, the ids in the listing's
    order, and filter variants (request fields over ``base``) with their expected ids."""

    base: dict[str, Any]
    expected: list[str]
    variants: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    rpc: str
    build: Callable[[Env, int], Awaitable[Listing]]
    id_of: Callable[[Any], str]
    sort_key: Callable[[Any], Any]  # the order the listing must follow (ascending)
    strict: bool  # sort keys are unique
    order: str  # where the order comes from
    default: int = 50
    maximum: int = 1000
    bulk: int = 0  # items to make for the maximum check (0: not cheap, not checked)


def rid() -> str:
    return uuid.uuid4().hex


def shuffled(values: Iterable[Any], seed: int = 7) -> list[Any]:
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


def stamp(value: Any) -> datetime:
    dt: datetime = value.ToDatetime(UTC)
    return dt


async def full_listing(env: Env, rpc: str, fields: dict[str, Any]) -> list[Any]:
    """Every item, in pages of the maximum (the reference the builders derive ids from when
    the server assigns them)."""
    out: list[Any] = []
    token = ""
    for _ in range(200):
        response = await call(env.api, rpc, **fields, page_size=1000, page_token=token)
        out += items_of(rpc, response)
        token = response.next_page_token
        if not token:
            return out
    raise AssertionError(f"{rpc}: no end after 200 pages")


async def upsert_customers(env: Env, ids: list[str]) -> None:
    for start in range(0, len(ids), 10_000):
        await call_any(env.api, "promo.v1.CustomerService", "UpsertCustomers",
                       custpb.UpsertCustomersRequest(request_id=rid(), customers=[
                           custpb.Customer(customer_id=c, currency="EUR", time_zone="UTC")
                           for c in ids[start:start + 10_000]]),
                       custpb.UpsertCustomersResponse)


async def call_any(api: Api, service: str, method: str, request: Any, response_cls: Any) -> Any:
    stub = api.channel.unary_unary(f"/{service}/{method}",
                                   request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_cls.FromString)
    return await stub(request, metadata=api.key())


# builders -------------------------------------------------------------------------------------


async def build_reward_types(env: Env, n: int) -> Listing:
    names = [f"rt{i:05d}" for i in range(n)]
    for name in shuffled(names):
        await reward_type(env.api, name)
    return Listing(base={}, expected=sorted(names))


async def create_promotion(env: Env, code: str, name: str, *, activate: bool,
                           reward: ppb.PromotionReward) -> None:
    await call_any(env.api, "promo.v1.PromotionService", "CreatePromotion",
                   ppb.CreatePromotionRequest(request_id=f"create-{code}", activate=activate,
                                              promotion=ppb.Promotion(
                                                  promotion_code=code, name=name,
                                                  time_zone="UTC", rewards=[reward])),
                   ppb.CreatePromotionResponse)


async def build_promotions(env: Env, n: int) -> Listing:
    await reward_type(env.api, "cash")
    codes = [f"pr{i:05d}" for i in range(n)]
    external = ppb.PromotionReward(reward_type="cash", kind=ppb.REWARD_KIND_EXTERNAL)
    for i in shuffled(range(n)):
        await create_promotion(
            env, codes[i], f"Gold offer {i}" if i % 3 == 0 else f"Plain offer {i}",
            activate=i % 2 == 0, reward=external if i % 4 == 1 else single("cash"))

    def pick(test: Callable[[int], bool]) -> list[str]:
        return [codes[i] for i in range(n) if test(i)]

    active = ppb.PROMOTION_STATUS_ACTIVE
    return Listing(base={}, expected=codes, variants=[
        ({"statuses": [active]}, pick(lambda i: i % 2 == 0)),
        ({"search": "gold"}, pick(lambda i: i % 3 == 0)),
        ({"reward_kinds": [ppb.REWARD_KIND_EXTERNAL]}, pick(lambda i: i % 4 == 1)),
        ({"search": "OFFER", "statuses": [active], "reward_kinds": [ppb.REWARD_KIND_SINGLE]},
         pick(lambda i: i % 2 == 0 and i % 4 != 1)),
    ])


async def active_promotion(env: Env) -> None:
    await reward_type(env.api, "cashback")
    await create_promotion(env, "VIP25", "VIP", activate=True, reward=single())


async def create_campaign(env: Env, campaign_id: str, *, customers: list[str],
                          conditional: bool, execute_in: timedelta) -> None:
    await call_any(env.api, "promo.v1.CampaignService", "CreateCampaign",
                   campb.CreateCampaignRequest(
                       request_id=f"create-{campaign_id}", customer_ids=customers,
                       campaign=campb.Campaign(
                           campaign_id=campaign_id, name=f"Campaign {campaign_id}",
                           execute_at=ts(env.clock.now() + execute_in),
                           conditional_execution=conditional, promotion_codes=["VIP25"])),
                   campb.CreateCampaignResponse)


async def build_campaigns(env: Env, n: int) -> Listing:
    await active_promotion(env)
    ids = [f"cp{i:05d}" for i in range(n)]
    for i in shuffled(range(n)):
        await create_campaign(env, ids[i], customers=["c1"], conditional=i % 2 == 0,
                              execute_in=timedelta(days=2))
    for i in range(0, n, 3):
        await call_any(env.api, "promo.v1.CampaignService", "CancelCampaign",
                       campb.CancelCampaignRequest(request_id=rid(), campaign_id=ids[i]),
                       campb.CancelCampaignResponse)
    cancelled = [ids[i] for i in range(n) if i % 3 == 0]
    return Listing(base={}, expected=ids, variants=[
        ({"statuses": [campb.CAMPAIGN_STATUS_CANCELLED]}, cancelled),
        ({"statuses": [campb.CAMPAIGN_STATUS_SCHEDULED]},
         [c for c in ids if c not in cancelled]),
        ({"statuses": [campb.CAMPAIGN_STATUS_SCHEDULED, campb.CAMPAIGN_STATUS_CANCELLED]}, ids),
    ])


async def build_campaign_targets(env: Env, n: int) -> Listing:
    await active_promotion(env)
    targets = [f"t{i:06d}" for i in range(n)]
    await create_campaign(env, "gp-main", customers=shuffled(targets), conditional=True,
                          execute_in=timedelta(days=2))
    other = ["t000001", "t000004", "zz-other-1", "zz-other-2"]
    await create_campaign(env, "gp-other", customers=other, conditional=True,
                          execute_in=timedelta(days=2))
    return Listing(base={"campaign_id": "gp-main"}, expected=targets,
                   variants=[({"campaign_id": "gp-other"}, sorted(other))])


async def build_customers(env: Env, n: int) -> Listing:
    ids = [f"cu{i:06d}" for i in range(n)]
    await upsert_customers(env, shuffled(ids))
    return Listing(base={}, expected=ids)


EVENT_KINDS = ("deposit", "bet", "win")


async def record_events(env: Env, rows: list[tuple[str, str, str, datetime]]) -> None:
    """(external_id, customer_id, kind, occurred_at) rows, in one batch."""
    for start in range(0, len(rows), 10_000):
        await call_any(env.api, "promo.v1.CustomerService", "RecordEvents",
                       custpb.RecordEventsRequest(request_id=rid(), events=[
                           custpb.Event(external_id=e, customer_id=c, kind=k, amount="1",
                                        currency="EUR", occurred_at=ts(when))
                           for e, c, k, when in rows[start:start + 10_000]]),
                       custpb.RecordEventsResponse)


async def build_events(env: Env, n: int) -> Listing:
    """Newest first (occurred_at, then event_id, descending); several events share an
    occurred_at, and occurred_at is not in recording order."""
    await upsert_customers(env, ["ev1", "ev2"])
    base_time = env.clock.now() - timedelta(hours=1)
    spread = max(2, n // 3)
    rows = [(f"e{i:06d}", "ev1", EVENT_KINDS[i % 3],
             base_time - timedelta(minutes=(i * 7) % spread)) for i in range(n)]
    rows += [(f"x{i}", "ev2", "bet", base_time) for i in range(3)]
    await record_events(env, rows)
    # Within one batch event_id follows external_id order (customers.proto).
    ordered = sorted((r for r in rows if r[1] == "ev1"), key=lambda r: (r[3], r[0]),
                     reverse=True)
    ids = [r[0] for r in ordered]
    return Listing(base={"customer_id": "ev1"}, expected=ids, variants=[
        ({"kinds": ["deposit"]}, [r[0] for r in ordered if r[2] == "deposit"]),
        ({"kinds": ["win", "deposit"]}, [r[0] for r in ordered if r[2] != "bet"]),
        ({"customer_id": "ev2"}, ["x2", "x1", "x0"]),
    ])


async def run_jobs(env: Env, kind: str, limit: int | None = None) -> int:
    ctx = {"pool": env.pool, "clock": env.clock, "settings": env.settings}
    ids = [r["id"] for r in await env.pool.fetch(
        "SELECT id FROM outbox_jobs WHERE kind = $1 AND status = 'pending' AND due_at <= $2"
        " ORDER BY id", kind, env.clock.now())][:limit]
    for job_id in ids:
        assert await run_outbox_job(ctx, job_id) == "done"
    return len(ids)


async def build_jobs(env: Env, n: int) -> Listing:
    """Newest first by id (not documented in jobs.proto; docs/operations.md and
    test_jobs_api say so). A conditional campaign makes 2 jobs, another 1."""
    await active_promotion(env)
    conditional = n // 3
    for i in range(n - conditional):
        await create_campaign(env, f"jb{i:05d}", customers=["c1"], conditional=i < conditional,
                              execute_in=timedelta(minutes=10))
    done = await run_jobs(env, "campaign.notify", limit=conditional // 2)
    jobs = await full_listing(env, "ListJobs", {})
    assert len(jobs) == n, [(j.job_id, j.kind) for j in jobs]
    ids = [j.job_id for j in jobs]
    return Listing(base={}, expected=ids, variants=[
        ({"kind": "campaign.notify"}, [j.job_id for j in jobs if j.kind == "campaign.notify"]),
        ({"status": jpb.JOB_STATUS_PENDING},
         [j.job_id for j in jobs if j.status == jpb.JOB_STATUS_PENDING]),
        ({"kind": "campaign.notify", "status": jpb.JOB_STATUS_DONE},
         [j.job_id for j in jobs if j.status == jpb.JOB_STATUS_DONE][:done]),
    ])


async def register(env: Env, i: int, event_type: int) -> int:
    response = await call_any(env.api, "promo.v1.ListenerService", "RegisterListener",
                              lpb.RegisterListenerRequest(request_id=rid(), listener=lpb.Listener(
                                  event_type=event_type,  # type: ignore[arg-type]
                                  url=f"https://hooks.example.com/l{i}",
                                  secret="listener-secret-0123456789abcdef")),
                              lpb.RegisterListenerResponse)
    listener_id: int = response.listener.listener_id
    return listener_id


async def unregister(env: Env, listener_id: int) -> None:
    await call_any(env.api, "promo.v1.ListenerService", "UnregisterListener",
                   lpb.UnregisterListenerRequest(request_id=rid(), listener_id=listener_id),
                   lpb.UnregisterListenerResponse)


SCHEDULED = lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN
EXECUTED = lpb.EVENT_TYPE_CAMPAIGN_EXECUTED


async def build_listeners(env: Env, n: int) -> Listing:
    types = [SCHEDULED if i % 2 == 0 else EXECUTED for i in range(n)]
    ids = [str(await register(env, i, t)) for i, t in enumerate(types)]
    return Listing(base={}, expected=ids, variants=[
        ({"event_type": SCHEDULED}, [x for x, t in zip(ids, types, strict=True)
                                     if t == SCHEDULED]),
        ({"event_type": EXECUTED}, [x for x, t in zip(ids, types, strict=True)
                                    if t == EXECUTED]),
    ])


async def notify_campaigns(env: Env, prefix: str, count: int) -> None:
    """``count`` conditional campaigns whose clearance notification is due now, notified."""
    for i in range(count):
        await create_campaign(env, f"{prefix}{i:05d}", customers=["c1"], conditional=True,
                              execute_in=timedelta(minutes=10))
    assert await run_jobs(env, "campaign.notify") == count


async def build_deliveries(env: Env, n: int) -> Listing:
    """Newest first (listeners.proto, docs/webhooks.md): 3 listeners, ceil(n/3) events."""
    await active_promotion(env)
    listeners = [await register(env, i, SCHEDULED) for i in range(3)]
    await notify_campaigns(env, "dl", math.ceil(n / 3))
    await unregister(env, listeners[2])  # its deliveries are CANCELLED, kept
    items = await full_listing(env, "ListDeliveries", {})
    assert len(items) == 3 * math.ceil(n / 3)
    ids = [str(d.delivery_id) for d in items]
    one_event = items[-1].event_id

    def pick(test: Callable[[Any], bool]) -> list[str]:
        return [str(d.delivery_id) for d in items if test(d)]

    return Listing(base={}, expected=ids, variants=[
        ({"listener_id": listeners[0]}, pick(lambda d: d.listener_id == listeners[0])),
        ({"statuses": [lpb.DELIVERY_STATUS_CANCELLED]},
         pick(lambda d: d.status == lpb.DELIVERY_STATUS_CANCELLED)),
        ({"statuses": [lpb.DELIVERY_STATUS_PENDING], "listener_id": listeners[1]},
         pick(lambda d: d.status == lpb.DELIVERY_STATUS_PENDING
              and d.listener_id == listeners[1])),
        ({"event_id": one_event}, pick(lambda d: d.event_id == one_event)),
        ({"event_type": SCHEDULED}, ids),
    ])


async def personalized(env: Env, backend_id: str, name: str, *, lock: bool = False) -> None:
    await call_any(env.api, "promo.v1.ProductPromotionService", "CreatePersonalizedPromotion",
                   prodpb.CreatePersonalizedPromotionRequest(
                       request_id=rid(), personalized_promotion=prodpb.PersonalizedPromotion(
                           backend_id=backend_id, name=name, lock_after_first_apply=lock)),
                   prodpb.CreatePersonalizedPromotionResponse)


async def delete_personalized(env: Env, backend_id: str) -> None:
    await call_any(env.api, "promo.v1.ProductPromotionService", "DeletePersonalizedPromotion",
                   prodpb.DeletePersonalizedPromotionRequest(request_id=rid(),
                                                             backend_id=backend_id),
                   prodpb.DeletePersonalizedPromotionResponse)


async def build_personalized(env: Env, n: int) -> Listing:
    ids = [f"pp{i:05d}" for i in range(n)]
    for i in shuffled(range(n)):
        await personalized(env, ids[i], f"Gold coffee {i}" if i % 3 == 0 else f"Tea {i}",
                           lock=i % 2 == 0)
    return Listing(base={}, expected=ids, variants=[
        ({"search": "gold"}, [ids[i] for i in range(n) if i % 3 == 0]),
        ({"lock_after_first_apply": True}, [ids[i] for i in range(n) if i % 2 == 0]),
        ({"lock_after_first_apply": False}, [ids[i] for i in range(n) if i % 2 == 1]),
        ({"search": "TEA", "lock_after_first_apply": False},
         [ids[i] for i in range(n) if i % 2 == 1 and i % 3 != 0]),
    ])


async def assign(env: Env, promotion: str, customer_ids: list[str]) -> None:
    await call_any(env.api, "promo.v1.ProductPromotionService", "AssignProductLists",
                   prodpb.AssignProductListsRequest(
                       request_id=rid(), personalized_promotion_id=promotion,
                       customer_ids=customer_ids, product_ids=["espresso", "latte"]),
                   prodpb.AssignProductListsResponse)


async def build_product_lists(env: Env, n: int) -> Listing:
    ids = [f"pl{i:06d}" for i in range(n)]
    await upsert_customers(env, ids)
    await personalized(env, "plp", "Coffee")
    await personalized(env, "plq", "Tea")
    await assign(env, "plp", shuffled(ids))
    other = [ids[1], ids[0], ids[-1]]
    await assign(env, "plq", other)
    return Listing(base={"personalized_promotion_id": "plp"}, expected=ids,
                   variants=[({"personalized_promotion_id": "plq"}, sorted(other))])


async def create_discount(env: Env, discount_id: str, linked: str = "") -> None:
    sets = [prodpb.ProductSet(name="Basics", product_ids=["bread", "butter"],
                              required_quantity=1, gets_discount=not linked,
                              discounted_quantity=0 if linked else 1)]
    if linked:
        sets.append(prodpb.ProductSet(name="Yours", personalized_promotion_id=linked,
                                      required_quantity=1, gets_discount=True,
                                      discounted_quantity=1))
    await call_any(env.api, "promo.v1.ProductPromotionService", "CreateProductSetDiscount",
                   prodpb.CreateProductSetDiscountRequest(
                       request_id=rid(), product_set_discount=prodpb.ProductSetDiscount(
                           discount_id=discount_id, name=f"Deal {discount_id}",
                           discount_type=prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="10",
                           product_sets=sets)),
                   prodpb.CreateProductSetDiscountResponse)


async def build_discounts(env: Env, n: int) -> Listing:
    await personalized(env, "ppa", "A")
    await personalized(env, "ppb", "B")
    ids = [f"ds{i:05d}" for i in range(n)]
    linked = ["ppa" if i % 3 == 0 else "ppb" if i % 3 == 1 else "" for i in range(n)]
    for i in shuffled(range(n)):
        await create_discount(env, ids[i], linked[i])
    return Listing(base={}, expected=ids, variants=[
        ({"personalized_promotion_id": "ppa"}, [ids[i] for i in range(n) if linked[i] == "ppa"]),
        ({"personalized_promotion_id": "ppb"}, [ids[i] for i in range(n) if linked[i] == "ppb"]),
    ])


SUM_10 = "sum(deposit.amount) * 10%"


async def build_definitions(env: Env, n: int) -> Listing:
    ids = [f"df{i:05d}" for i in range(n)]
    for i in shuffled(range(n)):
        await create_definition(env.api, definition(ids[i], SUM_10))
    return Listing(base={}, expected=ids)


async def build_rules(env: Env, n: int) -> Listing:
    await create_definition(env.api, definition("rd", SUM_10))
    ids = [f"ru{i:05d}" for i in range(n)]
    for i in shuffled(range(n)):
        await call_any(env.api, "promo.v1.BonusService", "CreateBonusRule",
                       bpb.CreateBonusRuleRequest(request_id=rid(), rule=bpb.BonusRule(
                           rule_id=ids[i], definition_id="rd", event_kind="bet", every=1)),
                       bpb.CreateBonusRuleResponse)
    return Listing(base={}, expected=ids)


async def build_schedules(env: Env, n: int) -> Listing:
    await create_definition(env.api, definition("sd", SUM_10))
    await upsert_customers(env, ["s1"])
    ids = [f"sc{i:05d}" for i in range(n)]
    for i in shuffled(range(n)):
        await call_any(env.api, "promo.v1.BonusService", "CreateBonusSchedule",
                       bpb.CreateBonusScheduleRequest(request_id=rid(), schedule=bpb.BonusSchedule(
                           schedule_id=ids[i], definition_id="sd", customer_ids=["s1"],
                           local_time="12:00", time_zone="UTC")),
                       bpb.CreateBonusScheduleResponse)
    return Listing(base={}, expected=ids)


async def request_bonus(env: Env, definition_id: str, customer_ids: list[str]) -> None:
    await call_any(env.api, "promo.v1.BonusService", "RequestBonusCalculation",
                   bpb.RequestBonusCalculationRequest(request_id=rid(),
                                                      definition_id=definition_id,
                                                      customer_ids=customer_ids),
                   bpb.RequestBonusCalculationResponse)


async def next_window(env: Env) -> None:
    env.clock.advance(timedelta(minutes=5))
    await run_due_batches(env.pool, env.settings, env.clock)


async def bonus_customers(env: Env, ids: list[str], with_deposit: Callable[[int], bool]) -> None:
    await upsert_customers(env, ids)
    when = env.clock.now() - timedelta(hours=2)
    await record_events(env, [(f"dep-{c}", c, "deposit", when)
                              for i, c in enumerate(ids) if with_deposit(i)])


async def build_results(env: Env, n: int) -> Listing:
    """Newest first (docs/bonuses.md). Two windows, so calculate_time differs."""
    await create_definition(env.api, definition("ra", SUM_10))
    await create_definition(env.api, definition("rb", SUM_10))
    ids = [f"r{i:05d}" for i in range(n)]
    await bonus_customers(env, ids, lambda i: i % 2 == 0)
    half = n // 2
    await request_bonus(env, "ra", ids[:half])
    await next_window(env)
    second_window = env.clock.now()
    await request_bonus(env, "ra", ids[half:])
    await request_bonus(env, "rb", ids[:3])
    await next_window(env)
    results = await full_listing(env, "ListBonusResults", {})
    assert sorted((r.definition_id, r.customer_id) for r in results) == sorted(
        [("ra", c) for c in ids] + [("rb", c) for c in ids[:3]])

    def pick(test: Callable[[Any], bool]) -> list[str]:
        return [r.bonus_id for r in results if test(r)]

    return Listing(base={}, expected=[r.bonus_id for r in results], variants=[
        ({"definition_id": "rb"}, pick(lambda r: r.definition_id == "rb")),
        ({"statuses": [bpb.BONUS_STATUS_SKIPPED]},
         pick(lambda r: r.status == bpb.BONUS_STATUS_SKIPPED)),
        ({"definition_id": "ra", "statuses": [bpb.BONUS_STATUS_ISSUED]},
         pick(lambda r: r.definition_id == "ra" and r.status == bpb.BONUS_STATUS_ISSUED)),
        ({"customer_id": ids[0]}, pick(lambda r: r.customer_id == ids[0])),
        ({"calculated_after": ts(second_window)},
         pick(lambda r: stamp(r.calculate_time) >= second_window)),
    ])


async def build_batches(env: Env, n: int) -> Listing:
    """n - 2 definitions in one window, then two more windows of the first."""
    assert n >= 3
    ids = [f"bb{i:05d}" for i in range(n - 2)]
    for d in ids:
        await create_definition(env.api, definition(d, SUM_10))
    await bonus_customers(env, ["b1"], lambda i: True)
    for d in ids:
        await request_bonus(env, d, ["b1"])
    await next_window(env)
    for _ in range(2):
        await request_bonus(env, ids[0], ["b1"])
        await next_window(env)
    batches = await full_listing(env, "ListBonusBatches", {})
    assert len(batches) == n
    return Listing(base={}, expected=[str(b.batch_id) for b in batches], variants=[
        ({"definition_id": ids[0]}, [str(b.batch_id) for b in batches
                                     if b.definition_id == ids[0]]),
        ({"definition_id": ids[1]}, [str(b.batch_id) for b in batches
                                     if b.definition_id == ids[1]]),
    ])


async def build_ledger(env: Env, n: int) -> Listing:
    """Newest first (docs/bonuses.md): n issued results of one customer."""
    await create_definition(env.api, definition("lg", SUM_10))
    await bonus_customers(env, ["l1", "l2"], lambda i: True)
    for _ in range(n):
        await request_bonus(env, "lg", ["l1"])
    for _ in range(3):
        await request_bonus(env, "lg", ["l2"])
    await next_window(env)
    entries = await full_listing(env, "ListCustomerBonusLedger", {"customer_id": "l1"})
    assert len(entries) == n and {e.customer_id for e in entries} == {"l1"}
    other = await full_listing(env, "ListCustomerBonusLedger", {"customer_id": "l2"})
    assert len(other) == 3
    return Listing(base={"customer_id": "l1"}, expected=[str(e.entry_id) for e in entries],
                   variants=[({"customer_id": "l2"}, [str(e.entry_id) for e in other])])


def text_id(attribute: str) -> Callable[[Any], str]:
    return lambda item: str(getattr(item, attribute))


def ascending(attribute: str) -> Callable[[Any], Any]:
    return lambda item: getattr(item, attribute)


def descending_int(attribute: str) -> Callable[[Any], Any]:
    return lambda item: -int(getattr(item, attribute))


def event_key(item: Any) -> Any:
    return (-stamp(item.occurred_at).timestamp(), -item.event_id)


LISTS: dict[str, Row] = {row.rpc: row for row in [
    Row("ListRewardTypes", build_reward_types, text_id("name"), ascending("name"), True,
        "not documented; engine: by name"),
    Row("ListPromotions", build_promotions, text_id("promotion_code"),
        ascending("promotion_code"), True, "promotions.proto: ordered by code"),
    Row("ListCampaigns", build_campaigns, text_id("campaign_id"), ascending("campaign_id"), True,
        "not documented; engine: by campaign_id"),
    Row("GetProcessedCampaignCustomers", build_campaign_targets, text_id("customer_id"),
        ascending("customer_id"), True, "campaigns.proto: ordered by customer id",
        default=1000, maximum=10_000, bulk=10_001),
    Row("ListCustomers", build_customers, text_id("customer_id"), ascending("customer_id"),
        True, "not documented; engine: by customer_id", bulk=1001),
    Row("ListCustomerEvents", build_events, text_id("external_id"), event_key, True,
        "customers.proto: newest first (occurred_at, then event_id)", bulk=1001),
    Row("ListJobs", build_jobs, text_id("job_id"), descending_int("job_id"), True,
        "jobs.proto: none; test_jobs_api: newest first by id"),
    Row("ListListeners", build_listeners, text_id("listener_id"), ascending("listener_id"),
        True, "docs/webhooks.md: pages by id"),
    Row("ListDeliveries", build_deliveries, text_id("delivery_id"),
        descending_int("delivery_id"), True, "listeners.proto: newest first"),
    Row("ListPersonalizedPromotions", build_personalized, text_id("backend_id"),
        ascending("backend_id"), True, "products.proto: ordered by backend_id"),
    Row("ListProductLists", build_product_lists, text_id("customer_id"),
        ascending("customer_id"), True, "products.proto: ordered by customer_id", bulk=1001),
    Row("ListProductSetDiscounts", build_discounts, text_id("discount_id"),
        ascending("discount_id"), True, "products.proto: ordered by discount_id"),
    Row("ListBonusDefinitions", build_definitions, text_id("definition_id"),
        ascending("definition_id"), True, "not documented; engine: by definition_id"),
    Row("ListBonusResults", build_results, text_id("bonus_id"),
        lambda r: -stamp(r.calculate_time).timestamp(), False,
        "docs/bonuses.md: newest first", bulk=1001),
    Row("ListBonusBatches", build_batches, text_id("batch_id"), descending_int("batch_id"),
        True, "not documented; engine: newest first by batch_id"),
    Row("ListCustomerBonusLedger", build_ledger, text_id("entry_id"),
        descending_int("entry_id"), True, "docs/bonuses.md: newest first"),
    Row("ListBonusRules", build_rules, text_id("rule_id"), ascending("rule_id"), True,
        "not documented; engine: by rule_id"),
    Row("ListBonusSchedules", build_schedules, text_id("schedule_id"),
        ascending("schedule_id"), True, "not documented; engine: by schedule_id"),
]}

ROWS = sorted(LISTS)
BULK_ROWS = sorted(name for name, row in LISTS.items() if row.bulk)


@pytest.fixture
def env(api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> Env:
    return Env(api=api, pool=pool, settings=settings, clock=clock)


# --- paging helpers ------------------------------------------------------------------------------


@dataclass
class Page:
    ids: list[str]
    more: bool
    size: int


async def walk(env: Env, row: Row, fields: dict[str, Any], sizes: Callable[[int], int],
               limit: int) -> list[Page]:
    pages: list[Page] = []
    token = ""
    for number in range(limit):
        size = sizes(number)
        response = await call(env.api, row.rpc, **fields, page_size=size, page_token=token)
        pages.append(Page([row.id_of(x) for x in items_of(row.rpc, response)],
                          bool(response.next_page_token), size))
        token = response.next_page_token
        if not token:
            break
    return pages


def walk_problems(label: str, pages: list[Page], expected: list[str], row: Row) -> list[str]:
    problems: list[str] = []
    seen = [i for p in pages for i in p.ids]
    if seen != expected:
        counts = Counter(seen)
        repeated = sorted(i for i, c in counts.items() if c > 1)
        skipped = sorted(set(expected) - set(seen))
        extra = sorted(set(seen) - set(expected))
        detail = (f"repeated {repeated[:5]}, skipped {skipped[:5]}, unexpected {extra[:5]}"
                  if repeated or skipped or extra else "same items, other order")
        problems.append(f"{label}: listed {len(seen)} of {len(expected)}: {detail}; "
                        f"got {seen[:12]}..., want {expected[:12]}...")
    listed = 0
    for number, page in enumerate(pages):
        want = min(page.size if page.size > 0 else row.default, row.maximum,
                   len(expected) - listed)
        if len(page.ids) != want:
            problems.append(f"{label}: page {number} (page_size {page.size}) has "
                            f"{len(page.ids)} items, want {want}")
        listed += len(page.ids)
        last = number == len(pages) - 1
        if not last and listed >= len(expected):
            problems.append(f"{label}: page {number} ends the listing but has a "
                            "next_page_token")
        if last and page.more:
            problems.append(f"{label}: still a next_page_token after {len(pages)} pages")
    if pages and not pages[-1].more and listed < len(expected):
        problems.append(f"{label}: next_page_token empty after {listed} of {len(expected)}")
    return problems


async def refusal(call_: Awaitable[Any]) -> tuple[Any, str | None, str]:
    try:
        await call_
    except grpc.RpcError as exc:  # an aio error is also a grpc.RpcError
        return exc.code(), rpc_error_reason(exc), exc.details() or ""
    return "OK", None, ""


INVALID_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


# --- the matrix ----------------------------------------------------------------------------------


def test_the_table_covers_every_list_rpc_in_the_descriptors() -> None:
    assert set(METHODS) == set(LISTS), (
        f"List RPCs without a row: {sorted(set(METHODS) - set(LISTS))}; "
        f"rows without an RPC: {sorted(set(LISTS) - set(METHODS))}")
    assert len(METHODS) >= 18
    for name, method in METHODS.items():
        fields = method.input_type.fields_by_name
        assert fields["page_size"].type == FieldDescriptor.TYPE_INT32, name
        assert "next_page_token" in method.output_type.fields_by_name, name
        _items_field(method)


@pytest.mark.parametrize("rpc", ROWS)
async def test_every_item_once_in_order_with_several_page_sizes(env: Env, rpc: str) -> None:
    row = LISTS[rpc]
    listing = await row.build(env, 10)
    expected = listing.expected
    count = len(expected)
    assert count >= 7, f"builder made only {count} items"
    problems: list[str] = []

    full = await call(env.api, rpc, **listing.base, page_size=1000)
    keys = [row.sort_key(x) for x in items_of(rpc, full)]
    if keys != sorted(keys) or (row.strict and len(set(keys)) != len(keys)):
        problems.append(f"one page of everything is not in the order ({row.order}): "
                        f"{[row.id_of(x) for x in items_of(rpc, full)]}")

    mixed = [2, 1, 3, 1000, 4]
    for label, sizes in [("page_size 1", lambda _: 1), ("page_size 2", lambda _: 2),
                         ("page_size 3", lambda _: 3), ("page_size 4", lambda _: 4),
                         ("mixed page sizes", lambda k: mixed[k % len(mixed)]),
                         (f"page_size {count - 1}", lambda _: count - 1),
                         (f"page_size {count} (= N)", lambda _: count),
                         (f"page_size {count + 1}", lambda _: count + 1)]:
        pages = await walk(env, row, listing.base, sizes, count + 3)
        problems += walk_problems(label, pages, expected, row)

    for variant, wanted in listing.variants:
        fields = {**listing.base, **variant}
        for size in (1, 2):
            pages = await walk(env, row, fields, lambda _, s=size: s, len(wanted) + 3)
            problems += walk_problems(f"filter {variant} page_size {size}", pages, wanted,
                                      row)
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


@pytest.mark.parametrize("rpc", ROWS)
async def test_page_size_zero_is_the_default_and_negative_is_refused(env: Env, rpc: str) -> None:
    row = LISTS[rpc]
    listing = await row.build(env, row.default + 1)
    expected = listing.expected
    assert len(expected) > row.default
    problems: list[str] = []
    pages = await walk(env, row, listing.base, lambda _: 0, len(expected) + 3)
    if len(pages[0].ids) != row.default or not pages[0].more:
        problems.append(f"page_size 0 gave {len(pages[0].ids)} items "
                        f"(next_page_token {'set' if pages[0].more else 'empty'}), "
                        f"want {row.default} and a token")
    problems += walk_problems("page_size 0", pages, expected, row)
    for size in (row.maximum + 1, 2**31 - 1):
        pages = await walk(env, row, listing.base, lambda _, s=size: s, 3)
        problems += walk_problems(f"page_size {size}", pages, expected, row)
    for size in (-1, -(2**31)):
        got = await refusal(call(env.api, rpc, **listing.base, page_size=size))
        if got[:2] != (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE"):
            problems.append(f"page_size {size}: {got}")
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


@pytest.mark.parametrize("rpc", BULK_ROWS)
async def test_page_size_above_the_maximum_is_lowered_to_it(env: Env, rpc: str) -> None:
    row = LISTS[rpc]
    listing = await row.build(env, row.bulk)
    assert len(listing.expected) > row.maximum
    problems: list[str] = []
    for size in (row.maximum + 1, 2**31 - 1):
        pages = await walk(env, row, listing.base, lambda _, s=size: s, 5)
        if len(pages[0].ids) != row.maximum or not pages[0].more:
            problems.append(f"page_size {size} gave {len(pages[0].ids)} items, want "
                            f"{row.maximum} and a token")
        problems += walk_problems(f"page_size {size}", pages, listing.expected, row)
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


def encode(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def edited_tokens(token: str, other_key: Any) -> dict[str, str]:
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1:]
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    rekeyed = dict(data, a=[other_key, *data["a"][1:]])
    refingered = dict(data, f="0" * len(data["f"]))
    return {
        "one character changed": flipped,
        "truncated": token[:-4],
        "first half only": token[:middle],
        "key edited, checksum kept": encode(rekeyed),
        "filters fingerprint edited, checksum kept": encode(refingered),
        "checksum removed": encode({k: v for k, v in data.items() if k != "c"}),
        "garbage": "garbage!",
        "base64 of non-JSON": base64.urlsafe_b64encode(b"hello world").decode(),
        "a JSON list": encode([1, 2, 3]),
    }


@pytest.mark.parametrize("rpc", ROWS)
async def test_a_token_edited_of_another_list_or_other_filters_is_invalid_page_token(
        env: Env, rpc: str) -> None:
    row = LISTS[rpc]
    listing = await row.build(env, 7)
    problems: list[str] = []
    first = await call(env.api, rpc, **listing.base, page_size=2)
    token = first.next_page_token
    assert token, "no token after a first page of 2"
    # The token itself is fine with the same request.
    rest = await refusal(call(env.api, rpc, **listing.base, page_size=2, page_token=token))
    if rest[0] != "OK":
        problems.append(f"the issued token with the same request: {rest}")

    raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    key = raw["a"][0]
    other_key: Any = key + "0" if isinstance(key, str) else key - 1
    for label, bad in edited_tokens(token, other_key).items():
        got = await refusal(call(env.api, rpc, **listing.base, page_size=2, page_token=bad))
        if got[:2] != INVALID_TOKEN:
            problems.append(f"{label} token: {got}")

    for other in ROWS:
        if other == rpc:
            continue
        got = await refusal(call(env.api, other, **PLACEHOLDERS.get(other, {}), page_size=2,
                                 page_token=token))
        if got[:2] != INVALID_TOKEN:
            problems.append(f"token of {rpc} sent to {other}: {got}")

    for number, (variant, wanted) in enumerate(listing.variants):
        fields = {**listing.base, **variant}
        if len(wanted) >= 2:
            variant_token = (await call(env.api, rpc, **fields, page_size=1)).next_page_token
            got = await refusal(call(env.api, rpc, **listing.base, page_size=1,
                                     page_token=variant_token))
            if got[:2] != INVALID_TOKEN:
                problems.append(f"token of filter {variant} used without it: {got}")
            for other_variant, _ in listing.variants[number + 1:]:
                got = await refusal(call(env.api, rpc, **{**listing.base, **other_variant},
                                         page_size=1, page_token=variant_token))
                if got[:2] != INVALID_TOKEN:
                    problems.append(f"token of filter {variant} used with {other_variant}: "
                                    f"{got}")
        got = await refusal(call(env.api, rpc, **fields, page_size=2, page_token=token))
        if got[:2] != INVALID_TOKEN:
            problems.append(f"unfiltered token used with filter {variant}: {got}")
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


def re_encoded_tokens(token: str) -> dict[str, str]:
    """The same payload written otherwise: no character of the listing's position changes."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    compact = base64.urlsafe_b64encode(
        json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")
    variants = {
        "'!' inserted": token[:5] + "!" + token[5:],
        "'.' inserted": token[:9] + "." + token[9:],
        "a space inserted": token[:5] + " " + token[5:],
        "'=' inserted in the middle": token[:8] + "=" + token[8:],
        "'==' padding appended": token + "==",
        "a newline appended": token + "\n",
        "standard base64 alphabet (+/)": token.replace("-", "+").replace("_", "/"),
        "payload JSON re-serialized compactly": compact,
    }
    # A token without '-' or '_' is unchanged by the alphabet swap: that is no alteration.
    return {label: altered for label, altered in variants.items() if altered != token}


async def test_a_token_altered_only_in_its_encoding_is_invalid_page_token(env: Env) -> None:
    """README: "a token that was altered or truncated ... is INVALID_ARGUMENT
    (INVALID_PAGE_TOKEN)". Alterations that leave the decoded payload (and so the checksum)
    unchanged: one List per key kind (text; 64-bit integer; instant and integer)."""
    reward_types = await build_reward_types(env, 3)
    listeners = await build_listeners(env, 3)
    events = await build_events(env, 3)
    accepted: list[str] = []
    for rpc, listing in [("ListRewardTypes", reward_types), ("ListListeners", listeners),
                         ("ListCustomerEvents", events)]:
        row = LISTS[rpc]
        token = (await call(env.api, rpc, **listing.base, page_size=1)).next_page_token
        for label, altered in re_encoded_tokens(token).items():
            try:
                response = await call(env.api, rpc, **listing.base, page_size=1,
                                      page_token=altered)
            except grpc.RpcError as exc:
                if (exc.code(), rpc_error_reason(exc)) != INVALID_TOKEN:
                    accepted.append(f"{rpc} {label}: {exc.code()} {rpc_error_reason(exc)}")
                continue
            resumed = [row.id_of(x) for x in items_of(rpc, response)]
            accepted.append(f"{rpc} {label}: accepted, resumed at {resumed} "
                            f"(the unaltered token resumes at {listing.expected[1:2]})")
    assert not accepted, "altered tokens not refused:\n" + "\n".join(accepted)


# --- keyset: items inserted and deleted between pages ------------------------------------------

Mutation = Callable[[Env, Listing, list[str]], Awaitable[list[str] | None]]
"""Changes the data after the first page (whose ids it gets) and returns the ids the rest of
the listing must hold, in order (None: the rest of a fresh listing after the cursor)."""


async def more_customers(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor = page[-1]  # cu000003
    await upsert_customers(env, ["cu000001a", "cu000007a", "cu999999"])
    return sorted([x for x in listing.expected if x > cursor] + ["cu000007a", "cu999999"])


async def churn_personalized(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor, doomed = page[-1], listing.expected[6]
    await delete_personalized(env, cursor)
    await delete_personalized(env, doomed)
    await personalized(env, "pp00001a", "new, before the cursor")
    await personalized(env, "pp00007a", "new, after the cursor")
    return sorted([x for x in listing.expected if x > cursor and x != doomed] + ["pp00007a"])


async def churn_discounts(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor, doomed = page[-1], listing.expected[6]
    for discount_id in (cursor, doomed):
        await call_any(env.api, "promo.v1.ProductPromotionService", "DeleteProductSetDiscount",
                       prodpb.DeleteProductSetDiscountRequest(request_id=rid(),
                                                              discount_id=discount_id),
                       prodpb.DeleteProductSetDiscountResponse)
    await create_discount(env, "ds00001a")
    await create_discount(env, "ds00007a")
    return sorted([x for x in listing.expected if x > cursor and x != doomed] + ["ds00007a"])


async def churn_listeners(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor, doomed = page[-1], listing.expected[6]
    await unregister(env, int(cursor))
    await unregister(env, int(doomed))
    new = str(await register(env, 99, SCHEDULED))
    rest = listing.expected[listing.expected.index(cursor) + 1:]
    return [x for x in rest if x != doomed] + [new]


async def churn_product_lists(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor, doomed = page[-1], listing.expected[6]
    await call_any(env.api, "promo.v1.ProductPromotionService", "RemoveProductLists",
                   prodpb.RemoveProductListsRequest(request_id=rid(),
                                                    personalized_promotion_id="plp",
                                                    customer_ids=[cursor, doomed]),
                   prodpb.RemoveProductListsResponse)
    new = ["pl000001a", "pl000007a"]
    await upsert_customers(env, new)
    await assign(env, "plp", new)
    return sorted([x for x in listing.expected if x > cursor and x != doomed] + ["pl000007a"])


async def more_targets(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor = page[-1]
    await call_any(env.api, "promo.v1.CampaignService", "AddCampaignTargets",
                   campb.AddCampaignTargetsRequest(request_id=rid(), campaign_id="gp-main",
                                                   customer_ids=["t000001a", "t000007a"]),
                   campb.AddCampaignTargetsResponse)
    return sorted([x for x in listing.expected if x > cursor] + ["t000007a"])


async def more_campaigns(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    cursor = page[-1]
    for campaign_id in ("cp00001a", "cp00007a"):
        await create_campaign(env, campaign_id, customers=["c1"], conditional=False,
                              execute_in=timedelta(days=2))
    return sorted([x for x in listing.expected if x > cursor] + ["cp00007a"])


async def more_events(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    """Newest first: a newer event and one at the cursor's occurred_at (a larger event_id, so
    before the cursor) must not appear; older ones must."""
    events = await full_listing(env, "ListCustomerEvents", {"customer_id": "ev1"})
    cursor = next(e for e in events if e.external_id == page[-1])
    at = stamp(cursor.occurred_at)
    await record_events(env, [("n-newest", "ev1", "bet", env.clock.now()),
                              ("n-same", "ev1", "bet", at),
                              ("n-older", "ev1", "bet", at - timedelta(seconds=1)),
                              ("n-oldest", "ev1", "bet", at - timedelta(days=3))])
    return None


async def more_jobs(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    for i in range(2):
        await create_campaign(env, f"late{i}", customers=["c1"], conditional=True,
                              execute_in=timedelta(days=1))
    return listing.expected[listing.expected.index(page[-1]) + 1:]


async def more_deliveries(env: Env, listing: Listing, page: list[str]) -> list[str] | None:
    await notify_campaigns(env, "late", 2)
    return listing.expected[listing.expected.index(page[-1]) + 1:]


KEYSET: dict[str, Mutation] = {
    "ListCustomers": more_customers,
    "ListPersonalizedPromotions": churn_personalized,
    "ListProductSetDiscounts": churn_discounts,
    "ListListeners": churn_listeners,
    "ListProductLists": churn_product_lists,
    "GetProcessedCampaignCustomers": more_targets,
    "ListCampaigns": more_campaigns,
    "ListCustomerEvents": more_events,
    "ListJobs": more_jobs,
    "ListDeliveries": more_deliveries,
}


@pytest.mark.parametrize("rpc", sorted(KEYSET))
async def test_items_inserted_or_deleted_between_pages_neither_repeat_nor_skip(
        env: Env, rpc: str) -> None:
    row = LISTS[rpc]
    listing = await row.build(env, 12)
    first = await call(env.api, rpc, **listing.base, page_size=4)
    page = [row.id_of(x) for x in items_of(rpc, first)]
    assert page == listing.expected[:4] and first.next_page_token
    wanted = await KEYSET[rpc](env, listing, page)
    if wanted is None:  # the rest of a fresh listing after the (still present) cursor
        fresh = [row.id_of(x) for x in await full_listing(env, rpc, listing.base)]
        wanted = fresh[fresh.index(page[-1]) + 1:]
    rest: list[str] = []
    token = first.next_page_token
    for _ in range(len(wanted) + 3):
        response = await call(env.api, rpc, **listing.base, page_size=4, page_token=token)
        rest += [row.id_of(x) for x in items_of(rpc, response)]
        token = response.next_page_token
        if not token:
            break
    repeated = sorted(set(page) & set(rest)) + sorted(
        i for i, c in Counter(rest).items() if c > 1)
    assert (rest, repeated) == (wanted, []), (
        f"{rpc}: after the first page {page}, the rest was {rest}, want {wanted} "
        f"(repeated: {repeated}, skipped: {sorted(set(wanted) - set(rest))})")
