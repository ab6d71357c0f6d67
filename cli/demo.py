"""`promo demo`: the seeds' stories, played end to end against a running service in under a minute.

Why it exists: a new user (or a reviewer) sees in one command what the engine does, with the
service's own answers printed, not a description of them. Everything goes through the public
gRPC API with one admin key, exactly as the promotion systems and listeners would call it, and
every name carries a run id so the demo can run again and again against the same service.

The stories:
1. Flash sale (seeds 001, 002): a PERSONALIZED promotion with a pool of 50 codes, a fallback
   code and a threshold alert; 60 customers at once get 50 distinct codes and 10 fallback codes;
   the alerts (101, 102, 103) arrive at the demo's own webhook listener.
2. Tiered cashback (seed 000): customers and their deposits via CustomerService, a TIERED
   promotion on the last deposit, GetReward per customer.
3. Conditional execution (seed 001): a campaign due in a few seconds; the scheduled-campaign
   event (type 5) reaches the listener (a campaign created later than the server's clearance
   lead is announced at once), the demo pages the target group, forecasts, approves some and
   rejects others, and the campaign executes for the approved only.
4. Dynamic bonus (seed 004): a MANUAL definition with a 5-second batch window; the worker
   computes the batch, the demo approves the queue, the ledger and the Issued events follow.

The listener is a small HTTP/1.1 server on 127.0.0.1 that checks every signature with
core.webhook_signature and the secret the demo registered; its listeners are unregistered at the
end whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from grpc import aio
from rich.console import Console
from rich.table import Table

from cli.client import describe_error
from core.webhook_signature import HEADER_EVENT_ID, SignatureError, verify
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import codes_pb2 as codepb
from promo.v1 import codes_pb2_grpc as codepb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc

POOL_SIZE = 50
FLASH_CUSTOMERS = 60
THRESHOLD_CODES = 10
CLEARANCE_SECONDS = 15  # the campaign runs this long after it is created
BONUS_WINDOW_SECONDS = 5
EVENT_TYPES = (lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, lpb.EVENT_TYPE_CAMPAIGN_EXECUTED,
               lpb.EVENT_TYPE_CODE_POOL_THRESHOLD, lpb.EVENT_TYPE_CODE_POOL_DEPLETED,
               lpb.EVENT_TYPE_FALLBACK_CODE_ACTIVE, lpb.EVENT_TYPE_BONUS_SKIPPED,
               lpb.EVENT_TYPE_BONUS_CALCULATED, lpb.EVENT_TYPE_BONUS_ISSUED)
ALERT_NAMES = {101: "CODE_POOL_THRESHOLD", 102: "CODE_POOL_DEPLETED", 103: "FALLBACK_CODE_ACTIVE"}
# Seed 000's tiers on the last deposit: 50-100 pays 10%, 101-200 pays 20%, above 200 pays 30%.
LAST = "last(deposit.amount)"
TIERS = ((f"{LAST} >= 50 and {LAST} <= 100", f"{LAST} * 10%"),
         (f"{LAST} >= 101 and {LAST} <= 200", f"{LAST} * 20%"),
         (f"{LAST} > 200", f"{LAST} * 30%"))
# customer suffix -> deposits (oldest first); the last one decides the tier.
CASHBACK_DEPOSITS = {"a": ("9999", "75"), "b": ("150",), "c": ("20", "300"), "d": ("40",),
                     "e": ("75.55",)}
BONUS_DEPOSITS = {"1": ("100", "52.35"), "2": ("200",), "3": ()}  # 15.235 rounds to 15.24


class DemoError(Exception):
    """A step failed; the message is one line for the operator."""


class Unreachable(DemoError):
    pass


# --- the webhook listener ------------------------------------------------------------------


@dataclass
class Listener:
    """HTTP/1.1 on 127.0.0.1 (keep-alive, as the sender pools connections): verifies each
    delivery's signature, drops repeats by event id, and wakes whoever waits for an event."""

    secret: str
    host: str = "127.0.0.1"
    events: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    _seen: set[str] = field(default_factory=set)
    _changed: asyncio.Condition | None = None
    _server: asyncio.Server | None = None
    _connections: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    async def start(self) -> str:
        self._changed = asyncio.Condition()
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}/promo-demo"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Keep-alive connections outlive server.close(): end them so their handlers finish.
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = await self._receive(headers, body)
                reason = "No Content" if status == 204 else "Unauthorized"
                writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _receive(self, headers: dict[str, str], body: bytes) -> int:
        try:
            verify(self.secret, headers, body, now=int(time.time()))
        except SignatureError:
            self.rejected += 1
            return 401
        event_id = headers.get(HEADER_EVENT_ID.lower(), "")
        if event_id not in self._seen:
            self._seen.add(event_id)
            self.events.append(json.loads(body))
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()
        return 204

    def matching(self, event_type: int, **data: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event_type") == event_type
                and all(e.get("data", {}).get(k) == v for k, v in data.items())]

    async def wait_for(self, check: Callable[[], bool], seconds: float) -> bool:
        """Until ``check()`` holds (True) or ``seconds`` pass (False)."""
        assert self._changed is not None
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(check), seconds)
        return check()


# --- calling the service -------------------------------------------------------------------


@dataclass
class Service:
    channel: aio.Channel
    api_key: str | None
    address: str
    timeout: float = 30.0

    async def call(self, stub_class: Any, method: str, request: Any) -> Any:
        stub = stub_class(self.channel)
        try:
            return await getattr(stub, method)(request, metadata=self.metadata(),
                                               timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise Unreachable(unreachable(self.address)) from exc
            raise DemoError(f"{stub_class.__name__.removesuffix('Stub')}.{method}: "
                            f"{describe_error(exc)}") from exc

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()


def unreachable(address: str) -> str:
    return f"cannot reach the promo service at {address}: start it with ./run up"


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def denial(response: rpb.GetRewardResponse) -> str:
    return "denied: " + rpb.DenialReason.Name(response.denial_reason).removeprefix(
        "DENIAL_REASON_")


async def until(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)


# --- the demo ------------------------------------------------------------------------------


@dataclass
class Demo:
    service: Service
    listener: Listener
    console: Console
    run: str
    summary: dict[str, Any] = field(default_factory=dict)

    def name(self, base: str) -> str:
        return f"{base}-{self.run}"

    def rid(self, step: str) -> str:
        return f"demo-{self.run}-{step}"

    async def reward_type(self, name: str, display: str) -> None:
        await self.service.call(rtpb_grpc.RewardTypeServiceStub, "CreateRewardType",
                                rtpb.CreateRewardTypeRequest(
                                    request_id=self.rid(f"rt-{name}"), reward_type=rtpb.RewardType(
                                        name=name, display_name=display,
                                        category=rtpb.REWARD_CATEGORY_AMOUNT)))

    async def customers(self, deposits: dict[str, tuple[str, ...]], step: str) -> None:
        now = datetime.now(UTC)
        await self.service.call(custpb_grpc.CustomerServiceStub, "UpsertCustomers",
                                custpb.UpsertCustomersRequest(
                                    request_id=self.rid(f"{step}-customers"), customers=[
                                        custpb.Customer(customer_id=c, currency="EUR")
                                        for c in deposits]))
        events = [custpb.Event(external_id=f"{c}-dep-{i}", customer_id=c, kind="deposit",
                               amount=amount, currency="EUR",
                               occurred_at=ts(now - timedelta(minutes=10 * (len(amounts) - i))))
                  for c, amounts in deposits.items() for i, amount in enumerate(amounts)]
        if events:
            recorded = await self.service.call(
                custpb_grpc.CustomerServiceStub, "RecordEvents", custpb.RecordEventsRequest(
                    request_id=self.rid(f"{step}-events"), events=events))
            self.console.print(f"recorded {recorded.inserted_count} deposit events for "
                               f"{len(deposits)} customers")

    async def get_reward(self, code: str, customer: str, campaign: str = ""
                         ) -> rpb.GetRewardResponse:
        return await self.service.call(rpb_grpc.RewardServiceStub, "GetReward",
                                       rpb.GetRewardRequest(
                                           promotion_code=code, customer_id=customer,
                                           campaign_id=campaign,
                                           request_id=self.rid(f"gr-{code}-{customer}")))

    # 1 ---------------------------------------------------------------------------------
    async def flash_sale(self) -> None:
        self.console.rule("[bold]1. Flash sale: 50 personalized codes, a fallback, alerts")
        code, fallback = self.name("FLASH48"), self.name("LOYALTY10")
        discount = self.name("demo_discount")
        await self.reward_type(discount, "Flash sale discount")
        created = await self.service.call(
            ppb_grpc.PromotionServiceStub, "CreatePromotion", ppb.CreatePromotionRequest(
                request_id=self.rid("flash"), activate=True, promotion=ppb.Promotion(
                    promotion_code=code, name="Loyalty Flash Sale 20% (48 hours)",
                    rewards=[ppb.PromotionReward(reward_type=discount,
                                                 kind=ppb.REWARD_KIND_EXTERNAL)],
                    code_type=ppb.CODE_TYPE_PERSONALIZED, fallback_code=fallback,
                    code_alerts=[ppb.CodeAlertThreshold(remaining_codes=THRESHOLD_CODES)])))
        self.console.print(f"created promotion {code} "
                           f"({ppb.PromotionStatus.Name(created.promotion.status)}), "
                           f"fallback code {fallback}, alert at {THRESHOLD_CODES} codes left")
        pool = "".join(f"{self.run.upper()}-{i:04d}\n" for i in range(1, POOL_SIZE + 1)).encode()
        uploaded = await self.service.call(
            codepb_grpc.CodePoolServiceStub, "UploadCodes", iter([codepb.UploadCodesRequest(
                promotion_code=code, request_id=self.rid("codes"), data=pool)]))
        self.console.print(f"uploaded {uploaded.codes_added} codes: inventory "
                           f"{uploaded.inventory.available}/{uploaded.inventory.total} available")

        customers = [f"flash-{self.run}-{i:02d}" for i in range(1, FLASH_CUSTOMERS + 1)]
        started = time.monotonic()
        answers = await asyncio.gather(*(self.get_reward(code, c) for c in customers))
        took = time.monotonic() - started
        granted = [a.grant for a in answers if a.HasField("grant")]
        personal = {g.promo_code for g in granted if not g.fallback_code}
        fallbacks = [g for g in granted if g.fallback_code]
        if len(granted) != len(customers):
            raise DemoError(f"flash sale: {len(customers) - len(granted)} of {len(customers)} "
                            "customers were denied")
        self.console.print(f"{len(customers)} customers asked at once ({took:.2f} s): "
                           f"{len(personal)} distinct personal codes, {len(fallbacks)} got the "
                           f"fallback code {fallbacks[0].promo_code if fallbacks else '-'}")
        promotion = (await self.service.call(ppb_grpc.PromotionServiceStub, "GetPromotion",
                                             ppb.GetPromotionRequest(promotion_code=code)))
        inventory = promotion.promotion.code_inventory
        self.console.print(
            f"inventory {inventory.available}/{inventory.total} available, {inventory.used} used, "
            f"{inventory.fallback_grants} fallback grants; default code "
            f"{'[green]on[/green]' if promotion.promotion.fallback_active else 'off'}; "
            f"availability {ppb.Availability.Name(promotion.promotion.availability)}")

        def alerts() -> list[dict[str, Any]]:
            return [e for t in ALERT_NAMES for e in self.listener.matching(t, promotion_code=code)]
        await self.listener.wait_for(lambda: len({e["event_type"] for e in alerts()}) == 3, 20)
        table = Table("alert", "type", "data")
        for event in sorted(alerts(), key=lambda e: e["event_type"]):
            data = {k: v for k, v in event["data"].items() if k != "promotion_code"}
            table.add_row(ALERT_NAMES[event["event_type"]], str(event["event_type"]),
                          json.dumps(data))
        self.console.print("alerts at the demo's listener (signatures verified):")
        self.console.print(table)
        self.summary["flash_sale"] = {
            "promotion_code": code, "customers": len(customers),
            "distinct_codes": len(personal), "fallback_grants": len(fallbacks),
            "fallback_code": fallback,
            "inventory": {"total": inventory.total, "used": inventory.used,
                          "available": inventory.available,
                          "fallback_grants": inventory.fallback_grants},
            "fallback_active": promotion.promotion.fallback_active,
            "alerts": sorted(ALERT_NAMES[e["event_type"]] for e in alerts())}

    # 2 ---------------------------------------------------------------------------------
    async def tiered_cashback(self) -> None:
        self.console.rule("[bold]2. Tiered cashback on the last deposit (seed 000)")
        cashback = self.name("demo_cashback")
        self.summary["cashback_reward_type"] = cashback
        await self.reward_type(cashback, "Cashback")
        deposits = {f"cb-{self.run}-{k}": v for k, v in CASHBACK_DEPOSITS.items()}
        await self.customers(deposits, "cashback")
        code = self.name("CASHBACK")
        await self.service.call(
            ppb_grpc.PromotionServiceStub, "CreatePromotion", ppb.CreatePromotionRequest(
                request_id=self.rid("cashback"), activate=True, promotion=ppb.Promotion(
                    promotion_code=code, name="Tiered cashback on the last deposit",
                    rewards=[ppb.PromotionReward(
                        reward_type=cashback, kind=ppb.REWARD_KIND_TIERED,
                        rounding=ppb.ROUNDING_MODE_ROUND, decimals=2,
                        tiers=[ppb.Tier(condition=c, value=v) for c, v in TIERS])])))
        self.console.print(f"created TIERED promotion {code}: 50-100 -> 10%, 101-200 -> 20%, "
                           "above 200 -> 30% of the last deposit")
        table = Table("customer", "deposits (oldest first)", "GetReward")
        rewards: dict[str, str] = {}
        for customer, amounts in deposits.items():
            answer = await self.get_reward(code, customer)
            rewards[customer] = (answer.grant.rewards[0].value if answer.HasField("grant")
                                 else denial(answer))
            table.add_row(customer, ", ".join(amounts), rewards[customer])
        self.console.print(table)
        self.summary["tiered_cashback"] = {"promotion_code": code, "rewards": rewards}

    # 3 ---------------------------------------------------------------------------------
    async def conditional_campaign(self) -> None:
        self.console.rule("[bold]3. Conditional campaign approved by the demo's listener")
        cashback = self.summary["cashback_reward_type"]
        code, campaign_id = self.name("RELOAD10"), self.name("reload-campaign")
        await self.service.call(
            ppb_grpc.PromotionServiceStub, "CreatePromotion", ppb.CreatePromotionRequest(
                request_id=self.rid("reload"), activate=True, promotion=ppb.Promotion(
                    promotion_code=code, name="Reload bonus, approved customers only",
                    rewards=[ppb.PromotionReward(reward_type=cashback,
                                                 kind=ppb.REWARD_KIND_SINGLE, value="10")])))
        targets = [f"camp-{self.run}-{i}" for i in range(1, 6)]
        execute_at = datetime.now(UTC).replace(microsecond=0) + timedelta(
            seconds=CLEARANCE_SECONDS)
        created = (await self.service.call(
            cpb_grpc.CampaignServiceStub, "CreateCampaign", cpb.CreateCampaignRequest(
                request_id=self.rid("campaign"), customer_ids=targets, campaign=cpb.Campaign(
                    campaign_id=campaign_id, name="Weekend reload", execute_at=ts(execute_at),
                    conditional_execution=True, promotion_codes=[code])))).campaign
        self.console.print(f"scheduled campaign {campaign_id} with {created.target_count} "
                           f"targets, ClearanceRequiredBy {execute_at.isoformat()} "
                           f"({CLEARANCE_SECONDS} s from now)")
        result: dict[str, Any] = {"campaign_id": campaign_id, "promotion_code": code,
                                  "clearance_event": False, "executed": False}
        self.summary["campaign"] = result
        left = (execute_at - datetime.now(UTC)).total_seconds() - 2
        arrived = await self.listener.wait_for(
            lambda: bool(self.listener.matching(5, campaign_id=campaign_id)), max(left, 0))
        if not arrived:
            state = await self._campaign(campaign_id)
            forecast = await self._forecast(campaign_id, targets)
            result.update(status=cpb.CampaignStatus.Name(state.status), forecast=forecast)
            why = ("the server announces a conditional campaign PROMO_CLEARANCE_LEAD_SECONDS "
                   "before it runs (at once when that moment has passed; a worker must be "
                   "running), so with this server's lead there is no time left to approve "
                   "within the demo"
                   if state.status == cpb.CAMPAIGN_STATUS_SCHEDULED else
                   "the campaign was announced, but the event did not reach the demo's listener "
                   "in time (can the service's worker reach it? see --listen-host)")
            self.console.print(
                "[yellow]the scheduled-campaign event (type 5) did not arrive before "
                f"ClearanceRequiredBy minus 2 s[/yellow]: {why}. Campaign state: "
                f"{cpb.CampaignStatus.Name(state.status)}; forecast for the whole group: "
                f"{forecast}")
            return
        event = self.listener.matching(5, campaign_id=campaign_id)[0]
        result["clearance_event"] = True
        self.console.print(f"event type 5 arrived: {json.dumps(event['data'])}")

        group: list[cpb.CampaignCustomer] = []
        token = ""
        pages = 0
        while True:  # page through the target group, as a listener would
            page = await self.service.call(
                cpb_grpc.ClearanceServiceStub, "GetProcessedCampaignCustomers",
                cpb.GetProcessedCampaignCustomersRequest(campaign_id=campaign_id, page_size=2,
                                                         page_token=token))
            group.extend(page.customers)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        self.console.print(f"paged the target group: {len(group)} customers in {pages} pages")
        approve = [c.customer_id for c in group[:3]]
        reject = [c.customer_id for c in group[3:]]
        forecast = await self._forecast(campaign_id, approve)
        self.console.print(f"forecast for the {len(approve)} to approve: {forecast}")
        updated = await self.service.call(
            cpb_grpc.ClearanceServiceStub, "UpdateCustomerPromotionStatus",
            cpb.UpdateCustomerPromotionStatusRequest(
                campaign_id=campaign_id, request_id=self.rid("clearance"), statuses=[
                    cpb.CustomerPromotionStatus(customer_id=c, approved=c in approve)
                    for c in approve + reject]))
        state = await self._campaign(campaign_id)
        self.console.print(f"approved {len(approve)}, rejected {len(reject)} ({updated.updated} "
                           f"statuses applied); campaign "
                           f"{cpb.CampaignStatus.Name(state.status)}")
        result.update(approved=approve, rejected=reject, forecast=forecast)

        async def executed() -> bool:
            return (await self._campaign(campaign_id)).status == cpb.CAMPAIGN_STATUS_EXECUTED
        wait = (execute_at - datetime.now(UTC)).total_seconds() + 20
        self.console.print(f"waiting for the execution at {execute_at.isoformat()} ...")
        if not await until(executed, wait):
            raise DemoError(f"campaign {campaign_id} was not executed within 20 s of its "
                            "execution time: is the worker running (promo up runs one)?")
        state = await self._campaign(campaign_id)
        await self.listener.wait_for(
            lambda: bool(self.listener.matching(100, campaign_id=campaign_id)), 10)
        told = self.listener.matching(100, campaign_id=campaign_id)
        self.console.print(f"campaign EXECUTED: approved_count {state.approved_count}, "
                           f"rejected_count {state.rejected_count}; CAMPAIGN_EXECUTED event "
                           f"{'received' if told else 'not received (yet)'}")
        table = Table("customer", "clearance", "GetReward with the campaign id")
        grants: dict[str, str] = {}
        for customer in targets:
            answer = await self.get_reward(code, customer, campaign_id)
            grants[customer] = (f"{answer.grant.rewards[0].reward_type}="
                                f"{answer.grant.rewards[0].value}" if answer.HasField("grant")
                                else denial(answer))
            table.add_row(customer, "approved" if customer in approve else "rejected",
                          grants[customer])
        self.console.print(table)
        result.update(executed=True, status="CAMPAIGN_STATUS_EXECUTED",
                      approved_count=state.approved_count, rejected_count=state.rejected_count,
                      executed_event=bool(told), grants=grants)

    async def _campaign(self, campaign_id: str) -> cpb.Campaign:
        return (await self.service.call(cpb_grpc.CampaignServiceStub, "GetCampaign",
                                        cpb.GetCampaignRequest(campaign_id=campaign_id))).campaign

    async def _forecast(self, campaign_id: str, customers: list[str]) -> dict[str, Any]:
        answer = await self.service.call(
            cpb_grpc.ClearanceServiceStub, "ForecastCampaign",
            cpb.ForecastCampaignRequest(campaign_id=campaign_id, customer_ids=customers))
        return {p.promotion_code: {"customers": p.customers,
                                   "projected_value": dict(p.projected_value), "fits": p.fits}
                for p in answer.promotions}

    # 4 ---------------------------------------------------------------------------------
    async def dynamic_bonus(self) -> None:
        self.console.rule("[bold]4. Dynamic bonus through the approval queue (seed 004)")
        definition_id = f"demo-bonus-{self.run}"
        deposits = {f"bonus-{self.run}-{k}": v for k, v in BONUS_DEPOSITS.items()}
        await self.customers(deposits, "bonus")
        await self.service.call(
            bpb_grpc.BonusServiceStub, "CreateBonusDefinition", bpb.CreateBonusDefinitionRequest(
                request_id=self.rid("bonus-def"), definition=bpb.BonusDefinition(
                    definition_id=definition_id, display_name="10% of today's deposits",
                    formula="sum(deposit.amount) * 10%",
                    result_type=bpb.BONUS_RESULT_TYPE_AMOUNT,
                    rounding=ppb.ROUNDING_MODE_ROUND, decimals=2,
                    data_mode=bpb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES,
                    period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                        amount=1, unit=fpb.TIME_UNIT_DAYS)),
                    approval_mode=bpb.APPROVAL_MODE_MANUAL,
                    batch_window_seconds=BONUS_WINDOW_SECONDS,
                    issued_message="You got {{event.bonus_amount}} {{event.currency}}!")))
        self.console.print(f"defined {definition_id}: sum(deposit.amount) * 10% over the last "
                           f"day, MANUAL approval, {BONUS_WINDOW_SECONDS}-second batch window")
        requested = await self.service.call(
            bpb_grpc.BonusServiceStub, "RequestBonusCalculation",
            bpb.RequestBonusCalculationRequest(request_id=self.rid("bonus-req"),
                                               definition_id=definition_id,
                                               customer_ids=list(deposits)))
        due = requested.due_time.ToDatetime(UTC)
        self.console.print(f"requested {requested.accepted_count} calculations; the batch runs "
                           f"at {due.isoformat()}")

        async def results() -> list[bpb.BonusResult]:
            answer = await self.service.call(
                bpb_grpc.BonusServiceStub, "ListBonusResults",
                bpb.ListBonusResultsRequest(definition_id=definition_id, page_size=100))
            return sorted(answer.results, key=lambda r: r.customer_id)

        async def computed() -> bool:
            return len(await results()) == len(deposits)
        wait = (due - datetime.now(UTC)).total_seconds() + 20
        if not await until(computed, wait):
            raise DemoError(f"the bonus batch of {definition_id} did not run within 20 s of "
                            f"{due.isoformat()}: is the worker running (promo up runs one)?")
        queue = await results()
        table = Table("customer", "deposits", "status", "amount", "skip reason")
        for r in queue:
            table.add_row(r.customer_id, ", ".join(deposits[r.customer_id]) or "-",
                          bpb.BonusStatus.Name(r.status).removeprefix("BONUS_STATUS_"),
                          r.amount or "-", r.skip_reason or "-")
        self.console.print("the approval queue after the batch:")
        self.console.print(table)
        waiting = [r.bonus_id for r in queue if r.status == bpb.BONUS_STATUS_CALCULATED]
        approved = await self.service.call(
            bpb_grpc.BonusServiceStub, "ApproveBonusResults", bpb.ApproveBonusResultsRequest(
                request_id=self.rid("bonus-approve"), bonus_ids=waiting))
        self.console.print(f"approved {len(approved.results)}: " + ", ".join(
            f"{r.customer_id} {bpb.BonusStatus.Name(r.status).removeprefix('BONUS_STATUS_')} "
            f"{r.amount}" for r in approved.results))
        ledger: dict[str, list[str]] = {}
        for customer in deposits:
            entries = await self.service.call(
                bpb_grpc.BonusServiceStub, "ListCustomerBonusLedger",
                bpb.ListCustomerBonusLedgerRequest(customer_id=customer))
            ledger[customer] = [e.amount for e in entries.entries]
        self.console.print(f"ledger: {ledger}")

        def issued() -> list[dict[str, Any]]:
            return self.listener.matching(112, formula_id=definition_id)
        skipped = sum(1 for r in queue if r.status == bpb.BONUS_STATUS_SKIPPED)
        expected = {110: skipped, 111: len(waiting), 112: len(waiting)}
        await self.listener.wait_for(lambda: all(
            len(self.listener.matching(t, formula_id=definition_id)) >= n
            for t, n in expected.items()), 15)
        for event in sorted(issued(), key=lambda e: e["data"].get("customer_id", "")):
            self.console.print(f"BONUS_ISSUED event: {event['data'].get('customer_id')} "
                               f"{event['data'].get('amount')} {event['data'].get('currency')}: "
                               f"{event['data'].get('message', '')}")
        self.summary["bonus"] = {
            "definition_id": definition_id,
            "queue": {r.customer_id: {"status": bpb.BonusStatus.Name(r.status),
                                      "amount": r.amount, "skip_reason": r.skip_reason}
                      for r in queue},
            "issued": {r.customer_id: r.amount for r in approved.results
                       if r.status == bpb.BONUS_STATUS_ISSUED},
            "ledger": ledger,
            "events": {name: len(self.listener.matching(t, formula_id=definition_id))
                       for t, name in ((110, "BONUS_SKIPPED"), (111, "BONUS_CALCULATED"),
                                       (112, "BONUS_ISSUED"))}}


async def register_listeners(service: Service, url: str, secret: str, run: str,
                             ids: list[int]) -> None:
    """One listener per event type, each id appended as soon as it exists (to unregister)."""
    for event_type in EVENT_TYPES:
        answer = await service.call(lpb_grpc.ListenerServiceStub, "RegisterListener",
                                    lpb.RegisterListenerRequest(
                                        request_id=f"demo-{run}-listener-{event_type}",
                                        listener=lpb.Listener(
                                            event_type=event_type, url=url, secret=secret,
                                            description=f"promo demo run {run}")))
        ids.append(answer.listener.listener_id)


async def unregister_listeners(service: Service, ids: list[int], run: str) -> None:
    for listener_id in ids:
        with contextlib.suppress(DemoError):
            await service.call(lpb_grpc.ListenerServiceStub, "UnregisterListener",
                               lpb.UnregisterListenerRequest(
                                   request_id=f"demo-{run}-unregister-{listener_id}",
                                   listener_id=listener_id))


def open_channel(address: str, *, tls: bool, ca_file: bytes | None) -> aio.Channel:
    if tls or ca_file:
        return aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_file))
    return aio.insecure_channel(address)


async def run_demo(address: str, api_key: str | None, console: Console, *,
                   listen_host: str = "127.0.0.1", tls: bool = False,
                   ca_file: bytes | None = None, call_timeout: float = 30.0) -> dict[str, Any]:
    """Play the four stories; return the summary (raises DemoError with a one-line message)."""
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    channel = open_channel(address, tls=tls, ca_file=ca_file)
    listener = Listener(secret=secrets.token_urlsafe(32), host=listen_host)
    service = Service(channel=channel, api_key=api_key, address=address, timeout=call_timeout)
    listener_ids: list[int] = []
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), 5)
        except TimeoutError as exc:
            raise Unreachable(unreachable(address)) from exc
        url = await listener.start()
        console.print(f"promo demo run [bold]{run}[/bold] against {address}; webhook listener "
                      f"at {url}")
        await register_listeners(service, url, listener.secret, run, listener_ids)
        console.print(f"registered {len(listener_ids)} listeners (event types "
                      f"{', '.join(str(t) for t in EVENT_TYPES)}) with the demo's own secret")
        demo = Demo(service=service, listener=listener, console=console, run=run)
        demo.summary["run_id"] = run
        await demo.flash_sale()
        await demo.tiered_cashback()
        await demo.conditional_campaign()
        await demo.dynamic_bonus()
        demo.summary.pop("cashback_reward_type", None)
        demo.summary["listener"] = {"events_received": len(listener.events),
                                    "bad_signatures": listener.rejected}
        demo.summary["seconds"] = round(time.monotonic() - started, 1)
        return demo.summary
    finally:
        await unregister_listeners(service, listener_ids, run)
        if listener_ids:
            console.print(f"unregistered the demo's {len(listener_ids)} listeners")
        await listener.stop()
        await channel.close()


def main(address: str, api_key: str | None, *, as_json: bool, listen_host: str, tls: bool,
         ca_file: bytes | None, timeout: float) -> int:
    """The `promo demo` command: stories on the console (stderr with --json), summary at the end."""
    console = Console(stderr=as_json, highlight=False)
    try:
        summary = asyncio.run(run_demo(address, api_key, console, listen_host=listen_host,
                                       tls=tls, ca_file=ca_file, call_timeout=timeout))
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, never wrapped
        return 1
    console.rule(f"[bold green]done in {summary['seconds']} s")
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0

