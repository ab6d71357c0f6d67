"""Scheduled campaigns and conditional execution (seed 001).

A campaign targets a group of customers with one or more promotions at an execution time, the
ClearanceRequiredBy time. With conditional execution on, listeners are told ``lead`` before it
(30 minutes by default) and approve customers until then; at that time the campaign executes
for the approved customers only (a customer never approved counts as rejected). With it off,
the whole target group is eligible at execution.

States: SCHEDULED -> AWAITING_CLEARANCE (conditional, at T - lead) -> EXECUTED, and
SCHEDULED / AWAITING_CLEARANCE -> CANCELLED.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from core.catalogue.promotions import CODE_PATTERN
from core.customers import customer_id_problem
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.text import nul_problem

CAMPAIGN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_STATUSES_PER_CALL = 10_000
MAX_TARGETS_PER_CALL = 100_000
MAX_PROMOTIONS = 20
# Outbox job kinds: written by the server when a campaign is created, run by the workers.
NOTIFY_JOB_KIND = "campaign.notify"
EXECUTE_JOB_KIND = "campaign.execute"


class CampaignStatus(enum.Enum):
    SCHEDULED = "SCHEDULED"
    AWAITING_CLEARANCE = "AWAITING_CLEARANCE"
    EXECUTED = "EXECUTED"
    CANCELLED = "CANCELLED"


OPEN_STATUSES = frozenset({CampaignStatus.SCHEDULED, CampaignStatus.AWAITING_CLEARANCE})


@dataclass(frozen=True)
class CampaignSpec:
    campaign_id: str
    name: str
    execute_at: datetime
    conditional: bool
    promotion_codes: tuple[str, ...]


def validate_campaign(spec: CampaignSpec) -> CampaignSpec:
    """The campaign's shape, which does not depend on when it is checked. Whether execute_at is
    still ahead is ``check_execution_in_future``'s job, asked only when the campaign is created
    for the first time: a retry of a request that already ran replays its answer whatever the
    time."""
    if not CAMPAIGN_ID_PATTERN.fullmatch(spec.campaign_id):
        raise InvalidArgument(
            "campaign_id must be 1-64 characters of letters, digits, '_', '-' or '.', starting "
            f"with a letter or digit; got {spec.campaign_id!r}", reason="INVALID_CAMPAIGN_ID",
            metadata={"field": "campaign_id"})
    name = spec.name.strip()
    if not name or len(name) > 200:
        raise InvalidArgument("name is required and at most 200 characters",
                              reason="INVALID_NAME", metadata={"field": "name"})
    if (problem := nul_problem(name, "name")) is not None:
        raise InvalidArgument(problem, reason="INVALID_NAME", metadata={"field": "name"})
    if spec.execute_at.tzinfo is None:
        raise InvalidArgument("execute_at must carry a time zone", reason="INVALID_TIME",
                              metadata={"field": "execute_at"})
    for index, code in enumerate(spec.promotion_codes):
        if not CODE_PATTERN.fullmatch(code):  # no promotion has such a code
            raise InvalidArgument(
                f"promotion_codes[{index}] {code[:100]!r} is not a promotion code (1-64 "
                "letters, digits, '_', '-' or '.', starting with a letter or digit)",
                reason="INVALID_PROMOTION_CODE",
                metadata={"field": f"promotion_codes[{index}]"})
    codes = tuple(dict.fromkeys(spec.promotion_codes))
    if not codes:
        raise InvalidArgument("a campaign needs at least one promotion",
                              reason="MISSING_PROMOTIONS", metadata={"field": "promotion_codes"})
    if len(codes) > MAX_PROMOTIONS:
        raise InvalidArgument(f"at most {MAX_PROMOTIONS} promotions per campaign",
                              reason="TOO_MANY_PROMOTIONS",
                              metadata={"field": "promotion_codes"})
    return CampaignSpec(spec.campaign_id, name, spec.execute_at, spec.conditional, codes)


MAX_SCHEDULE_AHEAD = timedelta(days=3660)
"""How far ahead a campaign may be scheduled (about ten years). Beyond any real plan, and it
keeps every date derived from execute_at (cap windows for the forecast, a month's end) inside
the calendar: a campaign at 9999-12-31 crashed ForecastCampaign computing its day's end."""


def check_execution_in_future(execute_at: datetime, now: datetime) -> None:
    """A new campaign must execute after ``now`` (its clearance window would be gone), and
    within MAX_SCHEDULE_AHEAD of it."""
    if execute_at <= now:
        raise InvalidArgument(f"execute_at {execute_at.isoformat()} is not in the future",
                              reason="EXECUTION_IN_PAST", metadata={"field": "execute_at"})
    if execute_at - now > MAX_SCHEDULE_AHEAD:
        raise InvalidArgument(
            f"execute_at {execute_at.isoformat()} is more than {MAX_SCHEDULE_AHEAD.days:,} days "
            "(about ten years) ahead; schedule the campaign closer to its date",
            reason="EXECUTION_TOO_FAR", metadata={"field": "execute_at"})


def notify_at(execute_at: datetime, lead: timedelta) -> datetime:
    """When listeners hear of a conditional campaign: ``lead`` before execution."""
    return execute_at - lead


def validate_customer_ids(customer_ids: Sequence[str], *, field: str, limit: int) -> None:
    """The customers API's id rules (core.customers: 1-128 characters, no control characters),
    so every target can match a customer, and nothing the database cannot store reaches it."""
    if len(customer_ids) > limit:
        raise InvalidArgument(f"{field} has {len(customer_ids)} entries; at most {limit} per call"
                              " (split it into several calls)", reason="TOO_MANY_ENTRIES",
                              metadata={"field": field, "limit": limit})
    for index, customer_id in enumerate(customer_ids):
        if (problem := customer_id_problem(customer_id)) is not None:
            raise InvalidArgument(f"{field}[{index}]: {problem}", reason="INVALID_CUSTOMER_ID",
                                  metadata={"field": f"{field}[{index}]"})


def check_statuses_agree(customer_ids: Sequence[str], approved: Sequence[bool]) -> None:
    """One call says one thing per customer. The same status twice is a harmless resend;
    approved and rejected for one customer in one call is a listener's mistake, refused so that
    it sees it (CONFLICTING_STATUSES), rather than settled by which came last."""
    first: dict[str, tuple[int, bool]] = {}
    for index, (customer_id, flag) in enumerate(zip(customer_ids, approved, strict=True)):
        seen_at, seen_flag = first.setdefault(customer_id, (index, flag))
        if seen_flag != flag:
            raise InvalidArgument(
                f"statuses[{index}] ({customer_id!r}): approved is {str(flag).lower()} here "
                f"and {str(seen_flag).lower()} at statuses[{seen_at}]; send one status per "
                "customer", reason="CONFLICTING_STATUSES",
                metadata={"field": f"statuses[{index}]", "customer_id": customer_id})


def campaign_not_found(campaign_id: str) -> NotFound:
    return NotFound(f"no campaign {campaign_id[:100]!r}", reason="CAMPAIGN_NOT_FOUND",
                    metadata={"campaign_id": campaign_id[:100]})


def check_campaign_id_lookup(campaign_id: str) -> None:
    """A campaign id to look up: one no campaign can have (CAMPAIGN_ID_PATTERN) is NOT_FOUND
    at once, before it reaches the database, which cannot even take some of them as a
    parameter (a NUL character)."""
    if not CAMPAIGN_ID_PATTERN.fullmatch(campaign_id):
        raise campaign_not_found(campaign_id)


def check_targets_open(status: CampaignStatus, campaign_id: str) -> None:
    if status is not CampaignStatus.SCHEDULED:
        raise FailedPrecondition(
            f"campaign {campaign_id} is {status.value}; targets can only be added while it is "
            "SCHEDULED", reason="CAMPAIGN_NOT_SCHEDULED",
            metadata={"campaign_id": campaign_id, "status": status.value})


def clearance_dedup_key(campaign_pk: int) -> str:
    """The key of a campaign's one clearance announcement (event type 5): emitted once, and
    its pending deliveries cancelled with the campaign."""
    return f"campaign:{campaign_pk}:clearance"


def check_conditional(conditional: bool, campaign_id: str) -> None:
    """Statuses only matter under conditional execution: without it the whole target group
    gets the campaign, so a listener's rejection could never take effect. Accepting it would
    tell the compliance system it was applied."""
    if not conditional:
        raise FailedPrecondition(
            f"campaign {campaign_id} has no conditional execution: every target customer gets "
            "it, so approvals and rejections are not used",
            reason="CAMPAIGN_NOT_CONDITIONAL", metadata={"campaign_id": campaign_id})


def check_clearance_open(status: CampaignStatus, campaign_id: str, execute_at: datetime,
                         now: datetime) -> None:
    """Approvals are accepted until ClearanceRequiredBy, while the campaign is open."""
    if status not in OPEN_STATUSES or now >= execute_at:
        raise FailedPrecondition(
            f"campaign {campaign_id} no longer takes approvals: ClearanceRequiredBy was "
            f"{execute_at.isoformat()} and the campaign is {status.value}",
            reason="CLEARANCE_CLOSED",
            metadata={"campaign_id": campaign_id, "status": status.value})


def check_cancellable(status: CampaignStatus, campaign_id: str) -> None:
    if status not in OPEN_STATUSES:
        raise FailedPrecondition(f"campaign {campaign_id} is {status.value} and cannot be "
                                 "cancelled", reason="CAMPAIGN_NOT_OPEN",
                                 metadata={"campaign_id": campaign_id, "status": status.value})
