"""Audit of DESIGN invariant 6, "Time is explicit": every period boundary has a named time zone,
tests pin the clock, DST changes neither double nor drop a day.

Every expected instant below is a literal UTC value worked out by hand from the 2026 rules of
the zone (and cross-checked against the IANA database), never computed with the project's own
helpers. Zones and transitions probed:

* Europe/Berlin: 2026-03-29 02:00 -> 03:00 (23-hour day), 2026-10-25 03:00 -> 02:00 (25 hours);
* America/New_York: 2026-03-08 02:00 -> 03:00, 2026-11-01 02:00 -> 01:00;
* Australia/Lord_Howe (a 30-minute DST shift): 2026-10-04 02:00 -> 02:30 (23.5 hours),
  2026-04-05 02:00 -> 01:30 (24.5 hours);
* zones whose midnight does not exist on their DST day: America/Santiago 2026-09-06
  (00:00 -> 01:00), Asia/Beirut 2026-03-29 (00:00 -> 01:00), America/Havana 2026-03-08
  (00:00 -> 01:00); and whose midnight or late evening repeats: America/Havana 2026-11-01
  (01:00 -> 00:00, midnight twice), America/Santiago 2026-04-04 and Asia/Beirut 2026-10-24
  (00:00 -> 23:00, the hour before midnight twice).

Conventions asserted: a local day is [local midnight, next local midnight); a midnight that does
not exist starts the day at the transition instant; a repeated wall-clock time means its first
occurrence; a schedule's local time inside a spring-forward gap is read with the offset in force
before the gap (RFC 5545 section 3.3.5), i.e. it runs once, the gap's length later on the wall
clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import campaigns_pb2_grpc as campb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from tests.conftest import Api, rpc_error_reason, serving_api
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.promo_helpers import (
    cap,
    get_promotion,
    get_reward,
    promotion,
    reward_type,
    single,
)
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    request,
    results,
    run_due_batches,
    stub,
)
from tests.webhook_listener import SECRET, WebhookListener
from workers.bonuses import run_due_schedules
from workers.outbox import run_outbox_job

at = datetime.fromisoformat
SECOND = timedelta(seconds=1)


def z(text: str) -> datetime:
    """'2026-03-29T01:30Z' (or with seconds) as an aware UTC datetime."""
    return at(text.replace("Z", "+00:00"))


def utc(stamp: Any) -> datetime:
    return stamp.ToDatetime(UTC)


# --- 1. Promotion budget caps in the promotion's zone -------------------------------------------

# (zone, what the day is, local day [start, end), its ISO week, its month), all in UTC.
CAP_DAYS = [
    pytest.param("Europe/Berlin", "2026-03-28T23:00Z", "2026-03-29T22:00Z",
                 "2026-03-22T23:00Z", "2026-03-29T22:00Z",
                 "2026-02-28T23:00Z", "2026-03-31T22:00Z", id="berlin-2026-03-29-23h"),
    pytest.param("Europe/Berlin", "2026-10-24T22:00Z", "2026-10-25T23:00Z",
                 "2026-10-18T22:00Z", "2026-10-25T23:00Z",
                 "2026-09-30T22:00Z", "2026-10-31T23:00Z", id="berlin-2026-10-25-25h"),
    pytest.param("America/New_York", "2026-03-08T05:00Z", "2026-03-09T04:00Z",
                 "2026-03-02T05:00Z", "2026-03-09T04:00Z",
                 "2026-03-01T05:00Z", "2026-04-01T04:00Z", id="new-york-2026-03-08-23h"),
    pytest.param("America/New_York", "2026-11-01T04:00Z", "2026-11-02T05:00Z",
                 "2026-10-26T04:00Z", "2026-11-02T05:00Z",
                 "2026-11-01T04:00Z", "2026-12-01T05:00Z", id="new-york-2026-11-01-25h"),
    pytest.param("Australia/Lord_Howe", "2026-10-03T13:30Z", "2026-10-04T13:00Z",
                 "2026-09-27T13:30Z", "2026-10-04T13:00Z",
                 "2026-09-30T13:30Z", "2026-10-31T13:00Z", id="lord-howe-2026-10-04-23.5h"),
    pytest.param("Australia/Lord_Howe", "2026-04-04T13:00Z", "2026-04-05T13:30Z",
                 "2026-03-29T13:00Z", "2026-04-05T13:30Z",
                 "2026-03-31T13:00Z", "2026-04-30T13:30Z", id="lord-howe-2026-04-05-24.5h"),
    pytest.param("America/Santiago", "2026-09-06T04:00Z", "2026-09-07T03:00Z",
                 "2026-08-31T04:00Z", "2026-09-07T03:00Z",
                 "2026-09-01T04:00Z", "2026-10-01T03:00Z", id="santiago-2026-09-06-no-midnight"),
    pytest.param("America/Santiago", "2026-04-04T03:00Z", "2026-04-05T04:00Z",
                 "2026-03-30T03:00Z", "2026-04-06T04:00Z",
                 "2026-04-01T03:00Z", "2026-05-01T04:00Z", id="santiago-2026-04-04-25h"),
    pytest.param("Asia/Beirut", "2026-03-28T22:00Z", "2026-03-29T21:00Z",
                 "2026-03-22T22:00Z", "2026-03-29T21:00Z",
                 "2026-02-28T22:00Z", "2026-03-31T21:00Z", id="beirut-2026-03-29-no-midnight"),
    pytest.param("America/Havana", "2026-03-08T05:00Z", "2026-03-09T04:00Z",
                 "2026-03-02T05:00Z", "2026-03-09T04:00Z",
                 "2026-03-01T05:00Z", "2026-04-01T04:00Z", id="havana-2026-03-08-no-midnight"),
    pytest.param("America/Havana", "2026-11-01T04:00Z", "2026-11-02T05:00Z",
                 "2026-10-26T04:00Z", "2026-11-02T05:00Z",
                 "2026-11-01T04:00Z", "2026-12-01T05:00Z", id="havana-2026-11-01-midnight-twice"),
]


@pytest.mark.parametrize(
    ("zone", "day_start", "day_end", "week_start", "week_end", "month_start", "month_end"),
    CAP_DAYS)
async def test_daily_cap_window_is_the_promotions_local_day(
        api: Api, clock: FixedClock, zone: str, day_start: str, day_end: str, week_start: str,
        week_end: str, month_start: str, month_end: str) -> None:
    """Grants on a DST day (23, 23.5, 24.5 or 25 hours, or one starting at the transition because
    its midnight does not exist) land in that local day; the daily cap resets exactly at the next
    local midnight (not at UTC midnight, not 24 hours after the day began); GetPromotion shows the
    real local bounds of the day, week and month."""
    start, end = z(day_start), z(day_end)
    await reward_type(api)
    await promotion(api, "TZCAP", time_zone=zone, rewards=[single(value="10")], caps=[
        cap(ppb.CAP_PERIOD_DAILY, "20"), cap(ppb.CAP_PERIOD_WEEKLY, "1000"),
        cap(ppb.CAP_PERIOD_MONTHLY, "1000")])  # each grant is 10: two fit a day

    async def grant(moment: datetime, customer: str) -> rpb.GetRewardResponse:
        clock.set(moment)
        return await get_reward(api, customer, "TZCAP")

    seen = {}
    seen["last second of the day before"] = (await grant(start - SECOND, "c1")).HasField("grant")
    seen["first instant of the day"] = (await grant(start, "c2")).HasField("grant")
    seen["last second of the day"] = (await grant(end - SECOND, "c3")).HasField("grant")
    denied = await grant(end - SECOND, "c4")
    seen["third grant of the day"] = (denied.HasField("grant"), denied.denial_reason,
                                      denied.denied_period)
    shown = await get_promotion(api, "TZCAP")
    seen["first instant of the next day"] = (await grant(end, "c5")).HasField("grant")
    assert seen == {
        "last second of the day before": True, "first instant of the day": True,
        "last second of the day": True,
        "third grant of the day": (False, rpb.DENIAL_REASON_BUDGET_CAP_REACHED,
                                   ppb.CAP_PERIOD_DAILY),
        "first instant of the next day": True}
    windows = {u.period: (utc(u.period_start), utc(u.period_end), u.used, u.grants, u.reached)
               for u in shown.cap_usage}
    # The day before is in the same week for every case (all are Sundays but Santiago's
    # Saturday); it is in the same month unless the DST day is the 1st.
    month_grants = 2 if start == z(month_start) else 3
    assert windows == {
        ppb.CAP_PERIOD_DAILY: (start, end, "20", 2, True),
        ppb.CAP_PERIOD_WEEKLY: (z(week_start), z(week_end), "30", 3, False),
        ppb.CAP_PERIOD_MONTHLY: (z(month_start), z(month_end), f"{10 * month_grants}",
                                 month_grants, False)}
    assert shown.availability == ppb.AVAILABILITY_CAPPED_FOR_PERIOD
    report = await ppb_grpc.PromotionServiceStub(api.channel).GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code="TZCAP"), metadata=api.key())
    daily = [(utc(r.period_start), r.granted_count, r.net_amount, r.counter_matches)
             for r in report.rows if r.period == ppb.CAP_PERIOD_DAILY]
    previous_start = daily[0][0]
    assert daily == [(previous_start, 1, "10", True), (start, 2, "20", True),
                     (end, 1, "10", True)]
    assert previous_start < start - SECOND


async def test_cap_recount_and_zone_change_on_the_25_hour_day(api: Api,
                                                              clock: FixedClock) -> None:
    """UpdatePromotion recounts the current window in the promotion's zone: moving a promotion
    from UTC to Europe/Berlin on 2026-10-25 makes the daily window Berlin's 25-hour day, which
    holds the grant made at 00:30 Berlin (22:30 UTC the day before) and both 02:30s."""
    await reward_type(api)
    await promotion(api, "MOVE", time_zone="UTC", rewards=[single(value="10")],
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "100")])
    for moment, customer in [("2026-10-24T21:30Z", "m0"), ("2026-10-24T22:30Z", "m1"),
                             ("2026-10-25T00:30Z", "m2"), ("2026-10-25T01:30Z", "m3")]:
        clock.set(z(moment))
        assert (await get_reward(api, customer, "MOVE")).HasField("grant")
    clock.set(z("2026-10-25T12:00Z"))
    [before] = (await get_promotion(api, "MOVE")).cap_usage
    assert (utc(before.period_start), utc(before.period_end), before.used, before.grants) == (
        z("2026-10-25T00:00Z"), z("2026-10-26T00:00Z"), "20", 2)
    promotions = ppb_grpc.PromotionServiceStub(api.channel)
    await promotions.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="pause-move", promotion_code="MOVE"), metadata=api.key())
    await promotions.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="move-to-berlin",
        promotion=ppb.Promotion(promotion_code="MOVE", time_zone="Europe/Berlin"),
        update_mask={"paths": ["time_zone"]}), metadata=api.key())
    await promotions.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="resume-move", promotion_code="MOVE"), metadata=api.key())
    [after] = (await get_promotion(api, "MOVE")).cap_usage
    assert (utc(after.period_start), utc(after.period_end), after.used, after.grants) == (
        z("2026-10-24T22:00Z"), z("2026-10-25T23:00Z"), "30", 3)
    clock.set(z("2026-10-25T22:59:59Z"))  # 23:59:59 CET: still the same day
    [late] = (await get_promotion(api, "MOVE")).cap_usage
    assert (utc(late.period_start), late.used) == (z("2026-10-24T22:00Z"), "30")
    clock.set(z("2026-10-25T23:00Z"))  # 00:00 on the 26th
    [next_day] = (await get_promotion(api, "MOVE")).cap_usage
    assert (utc(next_day.period_start), utc(next_day.period_end), next_day.used) == (
        z("2026-10-25T23:00Z"), z("2026-10-26T23:00Z"), "0")


# --- 2. Dynamic bonus periods in each customer's own zone ---------------------------------------


async def dry_run(api: Api, customer: str, period: fpb.TransactionPeriod,
                  source: str = "sum(deposit.amount)") -> fpb.DryRunFormulaResponse:
    return await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(
        fpb.DryRunFormulaRequest(source=source, customer_id=customer, period=period),
        metadata=api.key())


def relative(kind: int, time_zone: str = "") -> fpb.TransactionPeriod:
    return fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(kind=kind,
                                                                         time_zone=time_zone))


def fixed(start: datetime, end: datetime, time_zone: str) -> fpb.TransactionPeriod:
    return fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
        start=ts(start), end=ts(end), time_zone=time_zone))


def read(reply: fpb.DryRunFormulaResponse) -> tuple[datetime, datetime, str, int]:
    [aggregate] = reply.aggregates
    return utc(reply.window_start), utc(reply.window_end), aggregate.value, aggregate.count


async def deposits(api: Api, customer: str, *instants: str) -> None:
    """Deposits of 1, 2, 4, 8, ... at the given instants: a sum names the events it counted."""
    await events(api, f"deposits-{customer}", *[
        (customer, "deposit", str(2 ** i), z(moment), {}) for i, moment in enumerate(instants)])


# (zone, now, last full day [start, end), deposits as (instant, inside the day)).
LAST_FULL_DAYS = [
    pytest.param("Europe/Berlin", "2026-03-30T10:00Z", "2026-03-28T23:00Z", "2026-03-29T22:00Z",
                 [("2026-03-28T22:59:59Z", False), ("2026-03-28T23:00Z", True),
                  ("2026-03-29T00:59:59Z", True), ("2026-03-29T01:00Z", True),
                  ("2026-03-29T21:30Z", True), ("2026-03-29T22:00Z", False)],
                 id="berlin-2026-03-29-23h"),
    pytest.param("Europe/Berlin", "2026-10-26T10:00Z", "2026-10-24T22:00Z", "2026-10-25T23:00Z",
                 [("2026-10-24T21:59:59Z", False), ("2026-10-24T22:00Z", True),
                  ("2026-10-25T00:30Z", True), ("2026-10-25T01:30Z", True),
                  ("2026-10-25T22:30Z", True), ("2026-10-25T23:00Z", False)],
                 id="berlin-2026-10-25-25h"),
    pytest.param("America/New_York", "2026-03-09T12:00Z", "2026-03-08T05:00Z",
                 "2026-03-09T04:00Z",
                 [("2026-03-08T04:59:59Z", False), ("2026-03-08T05:00Z", True),
                  ("2026-03-08T06:59:59Z", True), ("2026-03-08T07:00Z", True),
                  ("2026-03-09T03:30Z", True), ("2026-03-09T04:00Z", False)],
                 id="new-york-2026-03-08-23h"),
    pytest.param("America/New_York", "2026-11-02T12:00Z", "2026-11-01T04:00Z",
                 "2026-11-02T05:00Z",
                 [("2026-11-01T03:59:59Z", False), ("2026-11-01T04:00Z", True),
                  ("2026-11-01T05:30Z", True), ("2026-11-01T06:30Z", True),
                  ("2026-11-02T04:30Z", True), ("2026-11-02T05:00Z", False)],
                 id="new-york-2026-11-01-25h"),
    pytest.param("Australia/Lord_Howe", "2026-10-05T01:00Z", "2026-10-03T13:30Z",
                 "2026-10-04T13:00Z",
                 [("2026-10-03T13:29:59Z", False), ("2026-10-03T13:30Z", True),
                  ("2026-10-03T15:29:59Z", True), ("2026-10-03T15:30Z", True),
                  ("2026-10-04T12:30Z", True), ("2026-10-04T13:00Z", False)],
                 id="lord-howe-2026-10-04-23.5h"),
    pytest.param("Australia/Lord_Howe", "2026-04-06T01:00Z", "2026-04-04T13:00Z",
                 "2026-04-05T13:30Z",
                 [("2026-04-04T12:59:59Z", False), ("2026-04-04T13:00Z", True),
                  ("2026-04-04T14:45Z", True), ("2026-04-04T15:15Z", True),
                  ("2026-04-05T13:00Z", True), ("2026-04-05T13:30Z", False)],
                 id="lord-howe-2026-04-05-24.5h"),
    pytest.param("America/Santiago", "2026-09-07T12:00Z", "2026-09-06T04:00Z",
                 "2026-09-07T03:00Z",
                 [("2026-09-06T03:59:59Z", False), ("2026-09-06T04:00Z", True),
                  ("2026-09-06T15:00Z", True), ("2026-09-07T02:30Z", True),
                  ("2026-09-07T03:00Z", False)],
                 id="santiago-2026-09-06-no-midnight"),
    pytest.param("America/Santiago", "2026-04-05T12:00Z", "2026-04-04T03:00Z",
                 "2026-04-05T04:00Z",
                 [("2026-04-04T02:59:59Z", False), ("2026-04-04T03:00Z", True),
                  ("2026-04-05T02:30Z", True), ("2026-04-05T03:30Z", True),
                  ("2026-04-05T04:00Z", False)],
                 id="santiago-2026-04-04-25h"),
    pytest.param("Asia/Beirut", "2026-03-30T12:00Z", "2026-03-28T22:00Z", "2026-03-29T21:00Z",
                 [("2026-03-28T21:59:59Z", False), ("2026-03-28T22:00Z", True),
                  ("2026-03-29T20:30Z", True), ("2026-03-29T21:00Z", False)],
                 id="beirut-2026-03-29-no-midnight"),
    pytest.param("America/Havana", "2026-11-02T12:00Z", "2026-11-01T04:00Z",
                 "2026-11-02T05:00Z",
                 [("2026-11-01T03:59:59Z", False), ("2026-11-01T04:00Z", True),
                  ("2026-11-01T04:30Z", True), ("2026-11-01T05:00Z", True),
                  ("2026-11-01T05:30Z", True), ("2026-11-02T04:30Z", True),
                  ("2026-11-02T05:00Z", False)],
                 id="havana-2026-11-01-midnight-twice"),
    pytest.param("America/Havana", "2026-03-09T12:00Z", "2026-03-08T05:00Z",
                 "2026-03-09T04:00Z",
                 [("2026-03-08T04:59:59Z", False), ("2026-03-08T05:00Z", True),
                  ("2026-03-09T03:30Z", True), ("2026-03-09T04:00Z", False)],
                 id="havana-2026-03-08-no-midnight"),
]


@pytest.mark.parametrize(("zone", "now", "start", "end", "moments"), LAST_FULL_DAYS)
async def test_last_full_day_in_the_customers_zone_across_dst(
        api: Api, clock: FixedClock, zone: str, now: str, start: str, end: str,
        moments: list[tuple[str, bool]]) -> None:
    """"Yesterday" is the customer's whole local DST day: every one of its 23 / 23.5 / 24.5 /
    25 hours (both runs of a repeated hour, 23:30 local of the day itself), nothing of the days
    around it; a day whose midnight does not exist starts at the transition."""
    await customers(api, ("c", "EUR", zone))
    await deposits(api, "c", *[m for m, _ in moments])
    inside = [2 ** i for i, (_, counted) in enumerate(moments) if counted]
    clock.set(z(now))
    reply = await dry_run(api, "c", relative(fpb.RELATIVE_KIND_LAST_FULL_DAY))
    assert read(reply) == (z(start), z(end), f"{sum(inside)}.000000", len(inside))


async def test_every_relative_period_across_the_berlin_dst_weekends(
        api: Api, clock: FixedClock) -> None:
    """Last full day / week / month, last weekend and today so far for a Europe/Berlin
    customer around both 2026 transitions; "last full month" October (31 days and 1 hour) is
    accepted and whole."""
    await customers(api, ("spring", "EUR", "Europe/Berlin"), ("fall", "EUR", "Europe/Berlin"))
    await deposits(api, "spring",
                   "2026-03-28T22:59:59Z",  # 1: Saturday 23:59:59 CET
                   "2026-03-28T23:00Z",  # 2: Sunday 00:00 CET
                   "2026-03-29T00:59:59Z",  # 4: 01:59:59 CET, just before the jump
                   "2026-03-29T01:00Z",  # 8: 03:00 CEST, just after it
                   "2026-03-29T21:30Z",  # 16: Sunday 23:30 CEST
                   "2026-03-29T22:00Z",  # 32: Monday 00:00 CEST
                   "2026-03-31T21:59:59Z",  # 64: 31 March 23:59:59 CEST
                   "2026-03-31T22:00Z",  # 128: 1 April 00:00 CEST
                   "2026-02-28T22:59:59Z")  # 256: 28 February 23:59:59 CET
    await deposits(api, "fall",
                   "2026-10-24T21:59:59Z",  # 1: Saturday 23:59:59 CEST
                   "2026-10-24T22:00Z",  # 2: Sunday 00:00 CEST
                   "2026-10-25T00:30Z",  # 4: 02:30 CEST (first)
                   "2026-10-25T01:30Z",  # 8: 02:30 CET (second)
                   "2026-10-25T22:30Z",  # 16: Sunday 23:30 CET
                   "2026-10-25T23:00Z",  # 32: Monday 00:00 CET
                   "2026-10-23T22:00Z",  # 64: Saturday 00:00 CEST
                   "2026-09-30T22:00Z",  # 128: 1 October 00:00 CEST
                   "2026-09-30T21:59:59Z",  # 256: 30 September 23:59:59 CEST
                   "2026-10-31T22:59:59Z",  # 512: 31 October 23:59:59 CET
                   "2026-10-31T23:00Z")  # 1024: 1 November 00:00 CET
    seen = {}
    clock.set(z("2026-03-30T10:00Z"))  # Monday
    for name, kind in [("day", fpb.RELATIVE_KIND_LAST_FULL_DAY),
                       ("weekend", fpb.RELATIVE_KIND_LAST_WEEKEND),
                       ("week", fpb.RELATIVE_KIND_LAST_FULL_WEEK),
                       ("today", fpb.RELATIVE_KIND_TODAY_SO_FAR)]:
        seen[f"spring {name}"] = read(await dry_run(api, "spring", relative(kind)))
    clock.set(z("2026-04-01T10:00Z"))
    seen["spring month"] = read(await dry_run(api, "spring",
                                              relative(fpb.RELATIVE_KIND_LAST_FULL_MONTH)))
    clock.set(z("2026-10-25T22:45Z"))  # Sunday 23:45 CET: the 25-hour day so far
    seen["fall today at 23:45"] = read(await dry_run(api, "fall",
                                                     relative(fpb.RELATIVE_KIND_TODAY_SO_FAR)))
    clock.set(z("2026-10-26T10:00Z"))  # Monday
    for name, kind in [("day", fpb.RELATIVE_KIND_LAST_FULL_DAY),
                       ("weekend", fpb.RELATIVE_KIND_LAST_WEEKEND),
                       ("week", fpb.RELATIVE_KIND_LAST_FULL_WEEK),
                       ("today", fpb.RELATIVE_KIND_TODAY_SO_FAR)]:
        seen[f"fall {name}"] = read(await dry_run(api, "fall", relative(kind)))
    clock.set(z("2026-11-02T10:00Z"))
    seen["fall month"] = read(await dry_run(api, "fall",
                                            relative(fpb.RELATIVE_KIND_LAST_FULL_MONTH)))
    assert seen == {
        "spring day": (z("2026-03-28T23:00Z"), z("2026-03-29T22:00Z"), "30.000000", 4),
        "spring weekend": (z("2026-03-27T23:00Z"), z("2026-03-29T22:00Z"), "31.000000", 5),
        "spring week": (z("2026-03-22T23:00Z"), z("2026-03-29T22:00Z"), "31.000000", 5),
        "spring today": (z("2026-03-29T22:00Z"), z("2026-03-30T10:00Z"), "32.000000", 1),
        "spring month": (z("2026-02-28T23:00Z"), z("2026-03-31T22:00Z"), "127.000000", 7),
        "fall today at 23:45": (z("2026-10-24T22:00Z"), z("2026-10-25T22:45Z"), "30.000000", 4),
        "fall day": (z("2026-10-24T22:00Z"), z("2026-10-25T23:00Z"), "30.000000", 4),
        "fall weekend": (z("2026-10-23T22:00Z"), z("2026-10-25T23:00Z"), "95.000000", 6),
        "fall week": (z("2026-10-18T22:00Z"), z("2026-10-25T23:00Z"), "95.000000", 6),
        "fall today": (z("2026-10-25T23:00Z"), z("2026-10-26T10:00Z"), "32.000000", 1),
        "fall month": (z("2026-09-30T22:00Z"), z("2026-10-31T23:00Z"), "767.000000", 9)}


async def test_a_relative_period_in_a_fixed_zone_ignores_the_customers_zone(
        api: Api, clock: FixedClock) -> None:
    """A period with its own zone (New York's 25-hour 1 November) for a Berlin customer."""
    await customers(api, ("b", "EUR", "Europe/Berlin"))
    await deposits(api, "b", "2026-11-01T03:59:59Z", "2026-11-01T04:00Z", "2026-11-01T06:30Z",
                   "2026-11-02T04:59:59Z", "2026-11-02T05:00Z")
    clock.set(z("2026-11-02T12:00Z"))
    reply = await dry_run(api, "b", relative(fpb.RELATIVE_KIND_LAST_FULL_DAY, "America/New_York"))
    assert read(reply) == (z("2026-11-01T04:00Z"), z("2026-11-02T05:00Z"), "14.000000", 3)


async def test_batch_requests_resolve_each_customers_dst_day(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """The same through RequestBonusCalculation and the batch job: one LAST_FULL_DAY definition,
    customers in four zones, each result's period is that customer's DST day and its amount
    counts all of that day's deposits."""
    await create(api, definition("yesterday", "sum(deposit.amount)", period=relative(
        fpb.RELATIVE_KIND_LAST_FULL_DAY)))
    await customers(api, ("ber", "EUR", "Europe/Berlin"), ("nyc", "EUR", "America/New_York"),
                    ("lhi", "EUR", "Australia/Lord_Howe"), ("scl", "EUR", "America/Santiago"))
    await deposits(api, "ber", "2026-10-24T21:59:59Z", "2026-10-24T22:00Z", "2026-10-25T00:30Z",
                   "2026-10-25T01:30Z", "2026-10-25T22:30Z", "2026-10-25T23:00Z")
    await deposits(api, "nyc", "2026-11-01T03:59:59Z", "2026-11-01T04:00Z", "2026-11-01T05:30Z",
                   "2026-11-01T06:30Z", "2026-11-02T04:30Z", "2026-11-02T05:00Z")
    await deposits(api, "lhi", "2026-04-04T12:59:59Z", "2026-04-04T13:00Z", "2026-04-04T14:45Z",
                   "2026-04-04T15:15Z", "2026-04-05T13:00Z", "2026-04-05T13:30Z")
    await deposits(api, "scl", "2026-09-06T03:59:59Z", "2026-09-06T04:00Z", "2026-09-06T15:00Z",
                   "2026-09-07T02:30Z", "2026-09-07T02:59:59Z", "2026-09-07T03:00Z")
    for customer, moment in [("lhi", "2026-04-06T01:00Z"), ("scl", "2026-09-07T12:00Z"),
                             ("ber", "2026-10-26T10:00Z"), ("nyc", "2026-11-02T12:00Z")]:
        clock.set(z(moment))
        await request(api, "yesterday", [customer], f"yesterday-{customer}")
        clock.advance(timedelta(minutes=5))
        assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: (utc(r.period_start), utc(r.period_end), r.amount)
             for r in await results(api)}
    assert found == {
        "ber": (z("2026-10-24T22:00Z"), z("2026-10-25T23:00Z"), "30"),
        "nyc": (z("2026-11-01T04:00Z"), z("2026-11-02T05:00Z"), "30"),
        "lhi": (z("2026-04-04T13:00Z"), z("2026-04-05T13:30Z"), "30"),
        "scl": (z("2026-09-06T04:00Z"), z("2026-09-07T03:00Z"), "30")}


async def test_fixed_dates_count_local_days_against_the_31_day_limit(
        api: Api, clock: FixedClock) -> None:
    """A fixed period with a zone is measured in that zone's days: 1 October to 1 November
    Berlin (31 days and 1 hour of absolute time) and 1 March to 1 April (30 days 23 hours) are
    31 days and accepted, as a definition too; half an hour more is refused either way."""
    await customers(api, ("b", "EUR", "Europe/Berlin"))
    await deposits(api, "b", "2026-09-30T22:00Z", "2026-10-31T22:59:59Z")
    clock.set(z("2026-11-10T12:00Z"))
    october = fixed(z("2026-09-30T22:00Z"), z("2026-10-31T23:00Z"), "Europe/Berlin")
    assert read(await dry_run(api, "b", october)) == (
        z("2026-09-30T22:00Z"), z("2026-10-31T23:00Z"), "3.000000", 2)
    march = fixed(z("2026-02-28T23:00Z"), z("2026-03-31T22:00Z"), "Europe/Berlin")
    reply = await dry_run(api, "b", march, source="1 + count(deposit)")
    assert (utc(reply.window_start), utc(reply.window_end)) == (
        z("2026-02-28T23:00Z"), z("2026-03-31T22:00Z"))
    made = await create(api, definition("october", "sum(deposit.amount)", period=october))
    assert (utc(made.period.fixed.start), utc(made.period.fixed.end),
            made.period.fixed.time_zone) == (
        z("2026-09-30T22:00Z"), z("2026-10-31T23:00Z"), "Europe/Berlin")
    refused = {}
    for name, period in [
            ("october + 30 min", fixed(z("2026-09-30T22:00Z"), z("2026-10-31T23:30Z"),
                                       "Europe/Berlin")),
            ("march + 30 min", fixed(z("2026-02-28T23:00Z"), z("2026-03-31T22:30Z"),
                                     "Europe/Berlin"))]:
        with pytest.raises(grpc.RpcError) as caught:
            await dry_run(api, "b", period)
        refused[name] = (caught.value.code(), rpc_error_reason(caught.value))
    assert refused == {
        "october + 30 min": (grpc.StatusCode.INVALID_ARGUMENT, "PERIOD_TOO_LONG"),
        "march + 30 min": (grpc.StatusCode.INVALID_ARGUMENT, "PERIOD_TOO_LONG")}


@pytest.mark.parametrize(("start", "end", "time_zone"), [
    pytest.param("2026-10-25T00:30Z", "2026-10-25T01:30Z", "Europe/Berlin",
                 id="berlin-02:30-CEST-to-02:30-CET"),
    pytest.param("2026-10-25T00:45Z", "2026-10-25T01:15Z", "Europe/Berlin",
                 id="berlin-02:45-CEST-to-02:15-CET"),
    pytest.param("2026-11-01T05:40Z", "2026-11-01T06:10Z", "America/New_York",
                 id="new-york-01:40-EDT-to-01:10-EST"),
])
async def test_a_fixed_period_inside_the_repeated_hour_is_a_real_window(
        api: Api, clock: FixedClock, start: str, end: str, time_zone: str) -> None:
    """Fixed dates whose ends fall in the repeated hour of a fall-back night: the end is after
    the start in absolute time (30 or 60 minutes), so the window is valid and is read whole,
    whatever the wall clocks of its ends say (02:30 CEST -> 02:30 CET, 02:45 -> 02:15)."""
    await customers(api, ("b", "EUR", time_zone))
    middle = z(start) + (z(end) - z(start)) / 2
    await events(api, "mid", ("b", "deposit", "7", middle, {}))
    clock.set(z("2026-11-10T12:00Z"))
    period = fixed(z(start), z(end), time_zone)
    seen: dict[str, Any] = {}
    try:
        seen["dry run"] = read(await dry_run(api, "b", period))
    except grpc.RpcError as exc:
        seen["dry run"] = f"{exc.code().name} {rpc_error_reason(exc)}: {exc.details()}"
    try:
        made = await create(api, definition("repeated-hour", "sum(deposit.amount)",
                                            period=period))
        seen["definition"] = (utc(made.period.fixed.start), utc(made.period.fixed.end))
    except grpc.RpcError as exc:
        seen["definition"] = f"{exc.code().name} {rpc_error_reason(exc)}: {exc.details()}"
    expected = {"dry run": (z(start), z(end), "7.000000", 1),
                "definition": (z(start), z(end))}
    assert seen == expected, f"got {seen!r}"


# --- 3. Bonus schedules across DST, driven through the worker's sweep hook -----------------------

# segment: (clock start, clock end), schedules (id, zone, local time, weekday or 0 for daily,
# every run in the segment as UTC, the next run after the segment as UTC).
SCHEDULE_SEGMENTS = {
    "berlin-spring": (("2026-03-22T12:00Z", "2026-03-31T00:00Z"), [
        ("mon6", "Europe/Berlin", "06:00", 1,
         ["2026-03-23T05:00Z", "2026-03-30T04:00Z"], "2026-04-06T04:00Z"),
        ("sun230", "Europe/Berlin", "02:30", 7, ["2026-03-29T01:30Z"], "2026-04-05T00:30Z"),
        ("day230", "Europe/Berlin", "02:30", 0,
         ["2026-03-23T01:30Z", "2026-03-24T01:30Z", "2026-03-25T01:30Z", "2026-03-26T01:30Z",
          "2026-03-27T01:30Z", "2026-03-28T01:30Z", "2026-03-29T01:30Z", "2026-03-30T00:30Z"],
         "2026-03-31T00:30Z"),
        ("beirut0", "Asia/Beirut", "00:00", 0,
         ["2026-03-22T22:00Z", "2026-03-23T22:00Z", "2026-03-24T22:00Z", "2026-03-25T22:00Z",
          "2026-03-26T22:00Z", "2026-03-27T22:00Z", "2026-03-28T22:00Z", "2026-03-29T21:00Z",
          "2026-03-30T21:00Z"], "2026-03-31T21:00Z"),
    ]),
    "berlin-fall": (("2026-10-18T12:00Z", "2026-10-27T00:00Z"), [
        ("mon6", "Europe/Berlin", "06:00", 1,
         ["2026-10-19T04:00Z", "2026-10-26T05:00Z"], "2026-11-02T05:00Z"),
        ("sun230", "Europe/Berlin", "02:30", 7, ["2026-10-25T00:30Z"], "2026-11-01T01:30Z"),
        ("day230", "Europe/Berlin", "02:30", 0,
         ["2026-10-19T00:30Z", "2026-10-20T00:30Z", "2026-10-21T00:30Z", "2026-10-22T00:30Z",
          "2026-10-23T00:30Z", "2026-10-24T00:30Z", "2026-10-25T00:30Z", "2026-10-26T01:30Z"],
         "2026-10-27T01:30Z"),
        ("beirut2330", "Asia/Beirut", "23:30", 0,
         ["2026-10-18T20:30Z", "2026-10-19T20:30Z", "2026-10-20T20:30Z", "2026-10-21T20:30Z",
          "2026-10-22T20:30Z", "2026-10-23T20:30Z", "2026-10-24T20:30Z", "2026-10-25T21:30Z",
          "2026-10-26T21:30Z"], "2026-10-27T21:30Z"),
    ]),
    "americas-spring": (("2026-03-06T00:00Z", "2026-03-10T00:00Z"), [
        ("ny230", "America/New_York", "02:30", 0,
         ["2026-03-06T07:30Z", "2026-03-07T07:30Z", "2026-03-08T07:30Z", "2026-03-09T06:30Z"],
         "2026-03-10T06:30Z"),
        ("havana0", "America/Havana", "00:00", 0,
         ["2026-03-06T05:00Z", "2026-03-07T05:00Z", "2026-03-08T05:00Z", "2026-03-09T04:00Z"],
         "2026-03-10T04:00Z"),
        ("nysun0130", "America/New_York", "01:30", 7, ["2026-03-08T06:30Z"],
         "2026-03-15T05:30Z"),
    ]),
    "americas-fall": (("2026-10-30T00:00Z", "2026-11-03T00:00Z"), [
        ("ny130", "America/New_York", "01:30", 0,
         ["2026-10-30T05:30Z", "2026-10-31T05:30Z", "2026-11-01T05:30Z", "2026-11-02T06:30Z"],
         "2026-11-03T06:30Z"),
        ("havana0", "America/Havana", "00:00", 0,
         ["2026-10-30T04:00Z", "2026-10-31T04:00Z", "2026-11-01T04:00Z", "2026-11-02T05:00Z"],
         "2026-11-03T05:00Z"),
        ("havana030", "America/Havana", "00:30", 0,
         ["2026-10-30T04:30Z", "2026-10-31T04:30Z", "2026-11-01T04:30Z", "2026-11-02T05:30Z"],
         "2026-11-03T05:30Z"),
    ]),
    "lord-howe-spring": (("2026-10-02T00:00Z", "2026-10-06T00:00Z"), [
        ("lh215", "Australia/Lord_Howe", "02:15", 0,
         ["2026-10-02T15:45Z", "2026-10-03T15:45Z", "2026-10-04T15:15Z", "2026-10-05T15:15Z"],
         "2026-10-06T15:15Z"),
        ("lh200", "Australia/Lord_Howe", "02:00", 0,
         ["2026-10-02T15:30Z", "2026-10-03T15:30Z", "2026-10-04T15:00Z", "2026-10-05T15:00Z"],
         "2026-10-06T15:00Z"),
    ]),
    "southern-fall": (("2026-04-02T00:00Z", "2026-04-07T00:00Z"), [
        ("lh145", "Australia/Lord_Howe", "01:45", 0,
         ["2026-04-02T14:45Z", "2026-04-03T14:45Z", "2026-04-04T14:45Z", "2026-04-05T15:15Z",
          "2026-04-06T15:15Z"], "2026-04-07T15:15Z"),
        ("scl2330", "America/Santiago", "23:30", 0,
         ["2026-04-02T02:30Z", "2026-04-03T02:30Z", "2026-04-04T02:30Z", "2026-04-05T02:30Z",
          "2026-04-06T03:30Z"], "2026-04-07T03:30Z"),
    ]),
    "santiago-spring": (("2026-09-04T00:00Z", "2026-09-08T00:00Z"), [
        ("scl030", "America/Santiago", "00:30", 0,
         ["2026-09-04T04:30Z", "2026-09-05T04:30Z", "2026-09-06T04:30Z", "2026-09-07T03:30Z"],
         "2026-09-08T03:30Z"),
        ("scl0", "America/Santiago", "00:00", 0,
         ["2026-09-04T04:00Z", "2026-09-05T04:00Z", "2026-09-06T04:00Z", "2026-09-07T03:00Z"],
         "2026-09-08T03:00Z"),
    ]),
}


@pytest.mark.parametrize("segment", list(SCHEDULE_SEGMENTS))
async def test_schedules_run_once_per_local_day_across_dst(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        segment: str) -> None:
    """Weekly and daily schedules stepped hour by hour through the worker's sweep hook across a
    DST change: a run at its local time (06:00 Berlin is 05:00 UTC before and 04:00 UTC after),
    a local time inside the spring-forward gap runs once (the gap's length later), one in the
    repeated hour runs once (its first occurrence), and nothing is skipped."""
    (first, last), schedules = SCHEDULE_SEGMENTS[segment]
    await create(api, definition("tb", "sum(deposit.amount)"))  # 1 day back: never empty
    await customers(api, ("s1", "EUR", "UTC"))
    clock.set(z(first))
    bonus = stub(api)
    for schedule_id, zone, local_time, weekday, _, _ in schedules:
        await bonus.CreateBonusSchedule(pb.CreateBonusScheduleRequest(
            request_id=f"create-{schedule_id}", schedule=pb.BonusSchedule(
                schedule_id=schedule_id, definition_id="tb", customer_ids=["s1"],
                weekday=weekday, local_time=local_time, time_zone=zone)), metadata=api.key())
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    first_seen: dict[tuple[str, datetime], datetime] = {}
    now = z(first)
    while now < z(last):
        now += timedelta(hours=1)
        clock.set(now)
        await run_due_schedules(sweep)
        rows = await pool.fetch("SELECT DISTINCT source, request_time FROM bonus_requests")
        for row in rows:
            first_seen.setdefault((row["source"].removeprefix("schedule:"),
                                   row["request_time"]), now)
    runs = {sid: sorted(t for s, t in first_seen if s == sid) for sid, *_ in schedules}
    assert runs == {sid: [z(t) for t in expected] for sid, _, _, _, expected, _ in schedules}
    late = {key: seen for key, seen in first_seen.items()
            if not timedelta(0) <= seen - key[1] < timedelta(hours=1)}
    assert late == {}  # each run made at the first hourly sweep at or after its time
    listed = await bonus.ListBonusSchedules(pb.ListBonusSchedulesRequest(), metadata=api.key())
    after = {s.schedule_id: (utc(s.last_run_time), utc(s.next_run_time)) for s in listed.schedules}
    assert after == {sid: (z(expected[-1]), z(following))
                     for sid, _, _, _, expected, following in schedules}


# --- 4. Campaign clearance lead across DST --------------------------------------------------------


async def run_due_jobs(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    async with pool.acquire() as conn:
        job_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1 ORDER BY id",
            clock.now())]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    return [await run_outbox_job(ctx, job_id) for job_id in job_ids]


# (campaign, execute_at, the clearance event's due time with the default 30-minute lead)
CLEARANCES = [
    ("berlin-spring", "2026-03-29T01:15Z", "2026-03-29T00:45Z"),  # 03:15 CEST <- 01:45 CET
    ("lord-howe-spring", "2026-10-03T15:40Z", "2026-10-03T15:10Z"),  # 02:40 +11 <- 01:40
    ("berlin-fall", "2026-10-25T01:15Z", "2026-10-25T00:45Z"),  # 02:15 CET <- 02:45 CEST
    ("new-york-fall", "2026-11-01T06:10Z", "2026-11-01T05:40Z"),  # 01:10 EST <- 01:40 EDT
]  # in time order: the helper walks the clock forward


async def _deliver_clearances(api: Api, pool: asyncpg.Pool, settings: Settings,
                              clock: FixedClock, listener: WebhookListener,
                              cases: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(lpb.RegisterListenerRequest(
        request_id="listener-5", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=listener.url, secret=SECRET)),
        metadata=api.key())
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin")
    clock.set(z("2026-03-01T00:00Z"))
    for campaign_id, execute_at, _ in cases:
        await create_campaign(api, campaign_id, z(execute_at), customers=["c1", "c2"])
    jobs = {(r["kind"], r["due_at"]) for r in await pool.fetch(
        "SELECT kind, due_at FROM outbox_jobs WHERE kind LIKE 'campaign.%'")}
    seen: dict[str, Any] = {"jobs": jobs}
    campaigns = campb_grpc.CampaignServiceStub(api.channel)
    for campaign_id, execute_at, notify in cases:
        clock.set(z(notify) - SECOND)
        await run_due_jobs(pool, settings, clock)
        before = (await campaigns.GetCampaign(campb.GetCampaignRequest(
            campaign_id=campaign_id), metadata=api.key())).campaign
        clock.set(z(notify))
        await run_due_jobs(pool, settings, clock)
        await run_due_jobs(pool, settings, clock)  # the webhook delivery the notice queued
        after = (await campaigns.GetCampaign(campb.GetCampaignRequest(
            campaign_id=campaign_id), metadata=api.key())).campaign
        clock.set(z(execute_at) - SECOND)
        await set_statuses(api, campaign_id, {"c1": True}, f"{campaign_id}-approve")
        clock.set(z(execute_at))
        try:
            await set_statuses(api, campaign_id, {"c2": True}, f"{campaign_id}-late")
            closed: str | None = "open"
        except grpc.RpcError as exc:
            closed = rpc_error_reason(exc)
        seen[campaign_id] = (before.status, after.status, utc(after.notified_at), closed)
    seen["events"] = sorted(
        (body["data"]["campaign_id"], body["data"]["clearance_required_by"])
        for body in (json.loads(r.body) for r in listener.received
                     if r.verify_error is None and not r.duplicate))
    return seen


async def test_clearance_event_goes_out_exactly_the_lead_before_execution(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    """The scheduled-campaign event is due 30 minutes (absolute) before ClearanceRequiredBy,
    whether the wall clock jumped (01:45 CET -> 03:15 CEST) or went back (02:45 CEST -> 02:15
    CET) in between; it is not sent a second earlier; approvals close exactly at execute_at."""
    seen = await _deliver_clearances(api, pool, settings, clock, listener, CLEARANCES)
    expected: dict[str, Any] = {"jobs": {
        (kind, z(when)) for _, execute_at, notify in CLEARANCES
        for kind, when in [("campaign.notify", notify), ("campaign.execute", execute_at)]}}
    for campaign_id, _, notify in CLEARANCES:
        expected[campaign_id] = (campb.CAMPAIGN_STATUS_SCHEDULED,
                                 campb.CAMPAIGN_STATUS_AWAITING_CLEARANCE, z(notify),
                                 "CLEARANCE_CLOSED")
    expected["events"] = sorted((c, z(e).isoformat()) for c, e, _ in CLEARANCES)
    assert seen == expected


async def test_a_custom_clearance_lead_is_absolute_across_dst(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """clearance_lead_seconds = 5400 (90 minutes): 03:15 CEST on 29 March is notified at
    00:45 CET (23:45 UTC), 90 real minutes before though 2.5 hours on the wall clock."""
    cases = [("berlin-spring-90", "2026-03-29T01:15Z", "2026-03-28T23:45Z"),
             ("berlin-fall-90", "2026-10-25T01:15Z", "2026-10-24T23:45Z")]
    longer = settings.model_copy(update={"clearance_lead_seconds": 5400.0})
    async with serving_api(longer, pool, clock) as api:
        seen = await _deliver_clearances(api, pool, longer, clock, listener, cases)
    expected: dict[str, Any] = {"jobs": {
        (kind, z(when)) for _, execute_at, notify in cases
        for kind, when in [("campaign.notify", notify), ("campaign.execute", execute_at)]}}
    for campaign_id, _, notify in cases:
        expected[campaign_id] = (campb.CAMPAIGN_STATUS_SCHEDULED,
                                 campb.CAMPAIGN_STATUS_AWAITING_CLEARANCE, z(notify),
                                 "CLEARANCE_CLOSED")
    expected["events"] = sorted((c, z(e).isoformat()) for c, e, _ in cases)
    assert seen == expected


async def test_forecast_uses_the_cap_window_of_the_execution_local_day(
        api: Api, clock: FixedClock) -> None:
    """A campaign executing at 00:15 Berlin on the 25-hour day, forecast at 23:30 the evening
    before: the daily cap's window is the new local day (nothing used yet), the weekly one
    still holds Saturday's grants."""
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin", caps=[
        cap(ppb.CAP_PERIOD_DAILY, "100"), cap(ppb.CAP_PERIOD_WEEKLY, "1000")])
    clock.set(z("2026-10-24T21:00Z"))  # Saturday 23:00 CEST
    for customer in ("g1", "g2"):
        assert (await get_reward(api, customer)).HasField("grant")
    clock.set(z("2026-10-24T21:30Z"))
    await create_campaign(api, "midnight", z("2026-10-24T22:15Z"), customers=["n1", "n2", "n3"],
                          conditional=False)
    forecast = await campb_grpc.ClearanceServiceStub(api.channel).ForecastCampaign(
        campb.ForecastCampaignRequest(campaign_id="midnight"), metadata=api.key())
    [promo] = forecast.promotions
    assert {c.period: (c.used, c.projected, c.remaining_after) for c in promo.caps} == {
        ppb.CAP_PERIOD_DAILY: ("0", "45", "55"),
        ppb.CAP_PERIOD_WEEKLY: ("30", "45", "925")}


# --- 5. Other local-day boundaries ----------------------------------------------------------------


async def test_cap_gauge_rolls_over_at_the_promotions_local_midnight(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """promo_cap_used is "use of each cap ... in its current window": after local midnight
    (00:30 Berlin on 25 October, no grant yet that day) the daily cap's current window holds
    nothing, as GetPromotion says; the gauge must not keep reporting Saturday's full cap."""
    from server.promotion_metrics import PromotionsCollector

    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin", rewards=[single(value="10")],
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "20")])
    for moment, customer in [("2026-10-24T21:30Z", "g1"), ("2026-10-24T21:45Z", "g2")]:
        clock.set(z(moment))  # Saturday 23:30 and 23:45 CEST: the daily cap is full
        assert (await get_reward(api, customer)).HasField("grant")
    clock.set(z("2026-10-24T22:30Z"))  # Sunday 00:30 CEST
    [daily] = (await get_promotion(api)).cap_usage
    collector = PromotionsCollector(asyncio.get_running_loop(), lambda: pool, clock)
    families = await asyncio.to_thread(lambda: list(collector.collect()))
    gauge = {s.labels["period"]: s.value for f in families if f.name == "promo_cap_used"
             for s in f.samples if s.labels.get("promotion") == "VIP25"}
    assert {"GetPromotion": (utc(daily.period_start), daily.used),
            "promo_cap_used": gauge} == {
        "GetPromotion": (z("2026-10-24T22:00Z"), "0"), "promo_cap_used": {"DAILY": 0.0}}
