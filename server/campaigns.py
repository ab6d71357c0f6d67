"""CampaignService (operators) and ClearanceService (webhook listeners): conditional execution.

Creating a campaign writes two outbox jobs in the same transaction: the clearance notification
(event type 5, due ``clearance_lead_seconds`` before execution, or at once when that moment has
passed) and the execution (due at ClearanceRequiredBy). The workers run them; the sweeper
re-queues them if Redis loses them, so scheduling survives restarts.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import asyncpg
from grpc import aio

from core import campaigns as domain
from core.campaigns import CampaignSpec, CampaignStatus, clearance_dedup_key
from core.cap_state import windows
from core.catalogue.promotions import PromotionStatus
from core.errors import FailedPrecondition, InvalidArgument
from core.forecast import forecast
from core.money import format_decimal, plain
from core.pagination import effective_page_size
from promo.v1 import campaigns_pb2 as pb
from promo.v1 import campaigns_pb2_grpc as pb_grpc
from server.convert import read_timestamp, required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from server.promotion_convert import PERIOD_TO_PB
from storage import campaigns as repo
from storage import outbox
from storage import promotions as promotions_repo
from storage import webhooks as webhooks_repo
from storage.campaigns import CampaignRow
from storage.queue import queue_after_commit

log = logging.getLogger("promo.campaigns")

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["CampaignService"]
CLEARANCE_SERVICE = pb.DESCRIPTOR.services_by_name["ClearanceService"]
SERVICE_NAME = ADMIN_SERVICE.full_name
SERVICE_NAMES = (ADMIN_SERVICE.full_name, CLEARANCE_SERVICE.full_name)
ROLES = {**{f"/{ADMIN_SERVICE.full_name}/{m.name}": {"admin"} for m in ADMIN_SERVICE.methods},
         **{f"/{CLEARANCE_SERVICE.full_name}/{m.name}": {"listener"}
            for m in CLEARANCE_SERVICE.methods}}
NOTIFY_KIND = domain.NOTIFY_JOB_KIND
EXECUTE_KIND = domain.EXECUTE_JOB_KIND
_STATUS_TO_PB = {CampaignStatus.SCHEDULED: pb.CAMPAIGN_STATUS_SCHEDULED,
                 CampaignStatus.AWAITING_CLEARANCE: pb.CAMPAIGN_STATUS_AWAITING_CLEARANCE,
                 CampaignStatus.EXECUTED: pb.CAMPAIGN_STATUS_EXECUTED,
                 CampaignStatus.CANCELLED: pb.CAMPAIGN_STATUS_CANCELLED}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def campaign_to_pb(row: CampaignRow) -> pb.Campaign:
    return pb.Campaign(
        campaign_id=row.campaign_id, name=row.name, execute_at=timestamp(row.execute_at),
        conditional_execution=row.conditional, promotion_codes=list(row.promotion_codes),
        status=_STATUS_TO_PB[row.status], target_count=row.target_count,
        approved_count=row.approved_count or 0, rejected_count=row.rejected_count or 0,
        notified_at=timestamp(row.notified_at), executed_at=timestamp(row.executed_at),
        cancelled_at=timestamp(row.cancelled_at), create_time=timestamp(row.create_time))


class CampaignServicer(pb_grpc.CampaignServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        assert deps.settings is not None
        self._lead = timedelta(seconds=deps.settings.clearance_lead_seconds)

    async def CreateCampaign(self, request: pb.CreateCampaignRequest,
                             context: aio.ServicerContext) -> pb.CreateCampaignResponse:
        message = request.campaign
        if not message.HasField("execute_at"):
            raise InvalidArgument("execute_at is required", reason="INVALID_TIME",
                                  metadata={"field": "execute_at"})
        spec = domain.validate_campaign(CampaignSpec(
            campaign_id=message.campaign_id, name=message.name,
            execute_at=read_timestamp(message.execute_at, "execute_at"),
            conditional=message.conditional_execution,
            promotion_codes=tuple(message.promotion_codes)))
        customer_ids = list(request.customer_ids)
        domain.validate_customer_ids(customer_ids, field="customer_ids",
                                     limit=domain.MAX_TARGETS_PER_CALL)
        jobs: list[tuple[int | None, datetime]] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            # Checked here, on the first run only: a retry after execute_at (a client that lost
            # the answer) replays the stored answer instead of being refused.
            now = self._deps.clock.now()
            domain.check_execution_in_future(spec.execute_at, now)
            promotion_ids = []
            for code in spec.promotion_codes:
                stored = await promotions_repo.get(conn, code)
                # Seeds 000/002: only an active promotion is available to campaigns (a draft
                # or a deactivated one would be scheduled, then grant nothing).
                if stored.promotion.status is not PromotionStatus.ACTIVE:
                    raise FailedPrecondition(
                        f"promotion {code!r} is {stored.promotion.status.value}: only an ACTIVE "
                        "promotion can be used in a campaign (activate it first)",
                        reason="PROMOTION_NOT_ACTIVE",
                        metadata={"field": "campaign.promotion_codes", "promotion_code": code,
                                  "status": stored.promotion.status.value})
                promotion_ids.append(stored.id)
            row = await repo.insert(conn, spec, promotion_ids)
            if customer_ids:
                await repo.add_targets(conn, row.id, customer_ids)
            if spec.conditional:
                due = max(now, domain.notify_at(spec.execute_at, self._lead))
                job = await outbox.add_job(conn, kind=NOTIFY_KIND, payload={"campaign": row.id},
                                           due_at=due, dedup_key=f"campaign:{row.id}:notify")
                jobs.append((job, due))
            job = await outbox.add_job(conn, kind=EXECUTE_KIND, payload={"campaign": row.id},
                                       due_at=spec.execute_at,
                                       dedup_key=f"campaign:{row.id}:execute")
            jobs.append((job, spec.execute_at))
            row = await repo.get(conn, spec.campaign_id)
            log.info("campaign created", extra={
                "campaign_id": row.campaign_id, "execute_at": row.execute_at.isoformat(),
                "conditional": row.conditional, "targets": row.target_count,
                "promotion_codes": ",".join(row.promotion_codes)})
            return pb.CreateCampaignResponse(campaign=campaign_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._deps.pool, "CreateCampaign", request, work)
        for job_id, due in jobs:
            await queue_after_commit(self._deps.redis, job_id=job_id, due_at=due,
                                     queue_name=self._deps.queue_name)
        return pb.CreateCampaignResponse.FromString(raw)

    async def AddCampaignTargets(self, request: pb.AddCampaignTargetsRequest,
                                 context: aio.ServicerContext) -> pb.AddCampaignTargetsResponse:
        required_id(request.campaign_id, "campaign_id")
        customer_ids = list(request.customer_ids)
        domain.validate_customer_ids(customer_ids, field="customer_ids",
                                     limit=domain.MAX_TARGETS_PER_CALL)

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.get(conn, request.campaign_id, lock="FOR UPDATE")
            domain.check_targets_open(row.status, row.campaign_id)
            added = await repo.add_targets(conn, row.id, customer_ids)
            return pb.AddCampaignTargetsResponse(
                added=added, target_count=row.target_count + added).SerializeToString()

        raw = await run_request_once(self._deps.pool, "AddCampaignTargets", request, work)
        return pb.AddCampaignTargetsResponse.FromString(raw)

    async def GetCampaign(self, request: pb.GetCampaignRequest,
                          context: aio.ServicerContext) -> pb.GetCampaignResponse:
        required_id(request.campaign_id, "campaign_id")
        async with self._deps.pool.acquire() as conn:
            row = await repo.get(conn, request.campaign_id)
        return pb.GetCampaignResponse(campaign=campaign_to_pb(row))

    async def ListCampaigns(self, request: pb.ListCampaignsRequest,
                            context: aio.ServicerContext) -> pb.ListCampaignsResponse:
        size = effective_page_size(request.page_size)
        if any(s not in _STATUS_FROM_PB for s in request.statuses):
            raise InvalidArgument("statuses must not contain CAMPAIGN_STATUS_UNSPECIFIED",
                                  reason="INVALID_ENUM", metadata={"field": "statuses"})
        statuses = sorted({_STATUS_FROM_PB[s].value for s in request.statuses})
        cursor = decode_page_token(request.page_token, {"statuses": statuses},
                                   key=(str,))
        async with self._deps.pool.acquire() as conn:
            rows = await repo.list_page(conn, after=str(cursor.after[0]) if cursor else None,
                                        limit=size + 1, statuses=statuses)
        page, campaigns, more = fit_page(rows[:size], len(rows) > size, campaign_to_pb)
        token = encode_page_token([page[-1].campaign_id], {"statuses": statuses}) \
            if more else ""
        return pb.ListCampaignsResponse(campaigns=campaigns, next_page_token=token)

    async def CancelCampaign(self, request: pb.CancelCampaignRequest,
                             context: aio.ServicerContext) -> pb.CancelCampaignResponse:
        required_id(request.campaign_id, "campaign_id")
        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.get(conn, request.campaign_id, lock="FOR UPDATE")
            domain.check_cancellable(row.status, row.campaign_id)
            now = self._deps.clock.now()
            await repo.set_status(conn, row.id, CampaignStatus.CANCELLED, now=now)
            # An announcement not yet delivered would ask listeners to clear a campaign that
            # will never run.
            stale = await webhooks_repo.cancel_pending_deliveries(
                conn, clearance_dedup_key(row.id), now=now, why="campaign cancelled")
            log.info("campaign cancelled", extra={"campaign_id": row.campaign_id,
                                                  "was": row.status.value,
                                                  "deliveries_cancelled": stale})
            row = await repo.get(conn, request.campaign_id)
            return pb.CancelCampaignResponse(campaign=campaign_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._deps.pool, "CancelCampaign", request, work)
        return pb.CancelCampaignResponse.FromString(raw)

    async def GetCampaignReconciliation(
            self, request: pb.GetCampaignReconciliationRequest,
            context: aio.ServicerContext) -> pb.GetCampaignReconciliationResponse:
        required_id(request.campaign_id, "campaign_id")
        async with self._deps.pool.acquire() as conn:
            row = await repo.get(conn, request.campaign_id)
            rows = await repo.reconciliation(conn, row.id)
        return pb.GetCampaignReconciliationResponse(promotions=[
            pb.CampaignPromotionReconciliation(
                promotion_code=r.promotion_code, approved=r.approved, granted=r.granted,
                revoked=r.revoked,
                amounts=[pb.RewardTypeAmount(reward_type=t, amount=format_decimal(plain(a)))
                         for t, a in r.amounts],
                # Deprecated single figure: only meaningful for one reward type.
                net_amount=(format_decimal(plain(r.amounts[0][1])) if len(r.amounts) == 1
                            else ""))
            for r in rows])


class ClearanceServicer(pb_grpc.ClearanceServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    async def GetProcessedCampaignCustomers(
            self, request: pb.GetProcessedCampaignCustomersRequest,
            context: aio.ServicerContext) -> pb.GetProcessedCampaignCustomersResponse:
        required_id(request.campaign_id, "campaign_id")
        size = effective_page_size(request.page_size, default=1000, maximum=10_000)
        cursor = decode_page_token(request.page_token, {"campaign": request.campaign_id},
                                   key=(str,))
        async with self._deps.pool.acquire() as conn:
            row = await repo.get(conn, request.campaign_id)
            targets = await repo.targets_page(
                conn, row.id, after=str(cursor.after[0]) if cursor else None, limit=size + 1)
        codes = list(row.promotion_codes)

        def customer(target: asyncpg.Record) -> pb.CampaignCustomer:
            found = pb.CampaignCustomer(customer_id=target["customer_id"],
                                         promotion_codes=codes)
            if target["approved"] is not None:
                found.approved = target["approved"]
            return found

        page, customers, more = fit_page(targets[:size], len(targets) > size, customer)
        response = pb.GetProcessedCampaignCustomersResponse(
            clearance_required_by=timestamp(row.execute_at), target_count=row.target_count,
            customers=customers)
        if more:
            response.next_page_token = encode_page_token([page[-1]["customer_id"]],
                                                         {"campaign": request.campaign_id})
        return response

    async def UpdateCustomerPromotionStatus(
            self, request: pb.UpdateCustomerPromotionStatusRequest,
            context: aio.ServicerContext) -> pb.UpdateCustomerPromotionStatusResponse:
        # Before run_request_once: the campaign id is part of the idempotency scope.
        required_id(request.campaign_id, "campaign_id")
        domain.check_campaign_id_lookup(request.campaign_id)
        ids = [s.customer_id for s in request.statuses]
        domain.validate_customer_ids(ids, field="statuses", limit=domain.MAX_STATUSES_PER_CALL)
        flags = [s.approved for s in request.statuses]

        async def work(conn: asyncpg.Connection) -> bytes:
            # Here, not before: a retry of a call stored before this check existed still gets
            # its first answer.
            domain.check_statuses_agree(ids, flags)
            row = await repo.get(conn, request.campaign_id, lock="FOR SHARE")
            now = self._deps.clock.now()
            domain.check_conditional(row.conditional, row.campaign_id)
            domain.check_clearance_open(row.status, row.campaign_id, row.execute_at, now)
            unknown = await repo.set_statuses(conn, row.id, ids, flags, now)
            return pb.UpdateCustomerPromotionStatusResponse(
                updated=len(set(ids)) - len(unknown),
                unknown_customer_ids=unknown).SerializeToString()

        raw = await run_request_once(
            self._deps.pool, f"UpdateCustomerPromotionStatus:{request.campaign_id}", request,
            work)
        return pb.UpdateCustomerPromotionStatusResponse.FromString(raw)

    async def ForecastCampaign(self, request: pb.ForecastCampaignRequest,
                               context: aio.ServicerContext) -> pb.ForecastCampaignResponse:
        required_id(request.campaign_id, "campaign_id")
        chosen = list(request.customer_ids) or None
        if chosen is not None:
            domain.validate_customer_ids(chosen, field="customer_ids",
                                         limit=domain.MAX_TARGETS_PER_CALL)
        response = pb.ForecastCampaignResponse(fits=True)
        async with self._deps.pool.acquire() as conn:
            row = await repo.get(conn, request.campaign_id)
            for code in row.promotion_codes:
                stored = await promotions_repo.get(conn, code)
                customers, new = await repo.forecast_counts(conn, row.id, row.conditional,
                                                            stored.id, chosen)
                current = windows(stored.promotion, row.execute_at)
                used = await promotions_repo.usage(
                    conn, stored.id, [(s, p.value, start) for s, p, start, _, _ in current])
                result = forecast(stored.promotion, at=row.execute_at, customers=customers,
                                  new_customers=new,
                                  usage={k: u.used for k, u in used.items()})
                out = response.promotions.add(
                    promotion_code=code, customers=result.customers,
                    projected_value={k: format_decimal(v)
                                     for k, v in result.projected_value.items()},
                    not_estimated=list(result.not_estimated), fits=result.fits)
                for cap in result.caps:
                    out.caps.add(scope=cap.scope, period=PERIOD_TO_PB[cap.period],
                                 limit=format_decimal(cap.limit),
                                 used=format_decimal(cap.used.normalize()),
                                 projected=format_decimal(cap.projected),
                                 remaining_after=format_decimal(cap.remaining_after.normalize()),
                                 fits=cap.fits)
                response.fits = response.fits and result.fits
        return response


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_CampaignServiceServicer_to_server(CampaignServicer(deps), server)
    pb_grpc.add_ClearanceServiceServicer_to_server(ClearanceServicer(deps), server)
