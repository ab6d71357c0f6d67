"""Campaign jobs: the clearance notification (event type 5) and the execution.

Both are outbox jobs written when the campaign is created, due at T - lead and T. Each takes the
campaign row FOR UPDATE, does nothing if the campaign has moved on (cancelled, or a retry of a
job that already ran), and emits its event in the same transaction (with a dedup key), so a
retry never notifies twice.
"""

from __future__ import annotations

import logging
from typing import Any

from core.campaigns import (
    EXECUTE_JOB_KIND,
    NOTIFY_JOB_KIND,
    OPEN_STATUSES,
    CampaignStatus,
    clearance_dedup_key,
)
from core.clock import Clock
from core.events import EventType
from storage import campaigns as repo
from storage.campaigns import CampaignRow
from storage.outbox import OutboxJob
from storage.queue import queue_after_commit
from storage.webhooks import emit_event
from workers.registry import PermanentJobError, handler

log = logging.getLogger("promo.campaigns")

NOTIFY_KIND = NOTIFY_JOB_KIND
EXECUTE_KIND = EXECUTE_JOB_KIND


async def _queue(ctx: dict[str, Any], job_ids: list[int], due: Any) -> None:
    for job_id in job_ids:
        await queue_after_commit(ctx.get("redis"), job_id=job_id, due_at=due,
                                 queue_name=ctx["settings"].queue_name)


async def _locked_campaign(conn: Any, job: OutboxJob) -> CampaignRow:
    """The job's campaign, locked FOR UPDATE until the job's transaction ends."""
    campaign = await repo.get_by_pk(conn, int(job.payload["campaign"]), lock="FOR UPDATE")
    if campaign is None:
        raise PermanentJobError(f"campaign {job.payload['campaign']} does not exist")
    return campaign


@handler(NOTIFY_KIND)
async def notify_listeners(ctx: dict[str, Any], job: OutboxJob) -> None:
    clock: Clock = ctx["clock"]
    now = clock.now()
    async with ctx["pool"].acquire() as conn, conn.transaction():
        campaign = await _locked_campaign(conn, job)
        if campaign.status is not CampaignStatus.SCHEDULED:
            log.info("clearance notification skipped", extra={
                "campaign_id": campaign.campaign_id, "status": campaign.status.value})
            return
        if now >= campaign.execute_at:
            # Workers were down across T - lead and T: approvals are already closed
            # (core.campaigns.check_clearance_open), so an announcement now could not be acted
            # on. The campaign stays SCHEDULED and its execution runs it as usual.
            log.warning("clearance notification too late: ClearanceRequiredBy has passed, "
                        "listeners are not notified", extra={
                            "campaign_id": campaign.campaign_id,
                            "clearance_required_by": campaign.execute_at.isoformat()})
            return
        await repo.set_status(conn, campaign.id, CampaignStatus.AWAITING_CLEARANCE, now=now)
        emitted = await emit_event(
            conn, event_type=EventType.SCHEDULED_CAMPAIGN, now=now,
            dedup_key=clearance_dedup_key(campaign.id), deliver_by=campaign.execute_at,
            payload={"campaign_id": campaign.campaign_id, "name": campaign.name,
                     "promotion_codes": list(campaign.promotion_codes),
                     "clearance_required_by": campaign.execute_at.isoformat(),
                     "target_count": campaign.target_count})
    log.info("campaign awaiting clearance", extra={"campaign_id": campaign.campaign_id})
    if emitted is not None:
        await _queue(ctx, emitted.outbox_job_ids, now)


@handler(EXECUTE_KIND)
async def execute_campaign(ctx: dict[str, Any], job: OutboxJob) -> None:
    clock: Clock = ctx["clock"]
    now = clock.now()
    async with ctx["pool"].acquire() as conn, conn.transaction():
        campaign = await _locked_campaign(conn, job)
        if campaign.status not in OPEN_STATUSES:
            return
        if now < campaign.execute_at:  # a clock behind the queue's: try again at the due time
            raise RuntimeError("campaign execution is not due yet")
        approved, rejected = await repo.execute(conn, campaign.id, now)
        emitted = await emit_event(
            conn, event_type=EventType.CAMPAIGN_EXECUTED, now=now,
            dedup_key=f"campaign:{campaign.id}:executed",
            payload={"campaign_id": campaign.campaign_id, "name": campaign.name,
                     "promotion_codes": list(campaign.promotion_codes),
                     "executed_at": now.isoformat(), "approved_count": approved,
                     "rejected_count": rejected,
                     "conditional_execution": campaign.conditional})
    log.info("campaign executed", extra={"campaign_id": campaign.campaign_id,
                                         "approved": approved, "rejected": rejected})
    if emitted is not None:
        await _queue(ctx, emitted.outbox_job_ids, now)
