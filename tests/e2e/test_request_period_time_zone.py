"""RequestBonusCalculation's explicit period with a time zone: October in Berlin is 31 days on
the Berlin clock and 31 days and 1 hour of UTC (the clocks go back on 25 October). Without the
zone such a request was refused PERIOD_TOO_LONG, so a monthly bonus for the customers of a
European market could not be asked for; with ``time_zone`` the 31-day limit is measured on that
zone's clock, as a definition's fixed period already was. The request is then computed (not
skipped at batch time for its UTC length) over exactly that window."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e.campaign_helpers import ts
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    request,
    results,
    run_due_batches,
)
from tests.e2e.test_cli import Cli

BERLIN = ZoneInfo("Europe/Berlin")
OCTOBER_START = datetime(2026, 10, 1, tzinfo=BERLIN)  # 2026-09-30T22:00Z
NOVEMBER_START = datetime(2026, 11, 1, tzinfo=BERLIN)  # 2026-10-31T23:00Z


async def _october_deposits(api: Api) -> None:
    await create(api, definition("october-10", "sum(deposit.amount) * 10%"))
    await customers(api, ("m1", "EUR", "Europe/Berlin"))
    await events(
        api, "oct",
        # 30 Sep 23:30 Berlin: September (21:30Z), not read.
        ("m1", "deposit", "1000", datetime(2026, 9, 30, 23, 30, tzinfo=BERLIN), {}),
        # 1 Oct 00:30 Berlin (22:30Z on 30 Sep): the first half hour of October, read.
        ("m1", "deposit", "100", datetime(2026, 10, 1, 0, 30, tzinfo=BERLIN), {}),
        # 31 Oct 23:30 Berlin (22:30Z): October's last hour, read.
        ("m1", "deposit", "200", datetime(2026, 10, 31, 23, 30, tzinfo=BERLIN), {}),
        # 1 Nov 00:30 Berlin: November, not read.
        ("m1", "deposit", "4000", datetime(2026, 11, 1, 0, 30, tzinfo=BERLIN), {}))


async def test_october_in_berlin_is_refused_in_utc_and_computed_with_the_zone(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await _october_deposits(api)
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "october-10", ["m1"], "oct-utc", period_start=ts(OCTOBER_START),
                      period_end=ts(NOVEMBER_START))
    info = error_info_of(caught.value)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and info.reason == "PERIOD_TOO_LONG"
    assert "31 days and 1 hour" in (caught.value.details() or "")

    accepted = await request(api, "october-10", ["m1"], "oct-berlin",
                             period_start=ts(OCTOBER_START), period_end=ts(NOVEMBER_START),
                             time_zone="Europe/Berlin")
    assert accepted.accepted_count == 1
    clock.set(accepted.due_time.ToDatetime(tzinfo=UTC))
    assert await run_due_batches(pool, settings, clock) == 1
    [result] = await results(api)
    # 10% of the two October deposits (100 + 200): computed, not skipped for its UTC length.
    assert (result.status, Decimal(result.amount)) == (pb.BONUS_STATUS_ISSUED, Decimal("30"))
    assert (result.period_start.ToDatetime(tzinfo=UTC),
            result.period_end.ToDatetime(tzinfo=UTC)) == (
        datetime(2026, 9, 30, 22, 0, tzinfo=UTC), datetime(2026, 10, 31, 23, 0, tzinfo=UTC))


async def test_longer_than_31_days_on_the_zones_clock_is_still_refused(api: Api) -> None:
    await _october_deposits(api)
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "october-10", ["m1"], "oct-long", period_start=ts(OCTOBER_START),
                      period_end=ts(datetime(2026, 11, 1, 1, 0, tzinfo=BERLIN)),
                      time_zone="Europe/Berlin")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "PERIOD_TOO_LONG"
    assert "31 days and 1 hour" in (caught.value.details() or "")


@pytest.mark.parametrize(("fields", "reason", "field"), [
    ({"time_zone": "Europe/Berlin"}, "INVALID_PERIOD", "time_zone"),
    ({"time_zone": "Mars/Olympus", "period_start": ts(OCTOBER_START),
      "period_end": ts(NOVEMBER_START)}, "INVALID_TIME_ZONE", "time_zone"),
    ({"time_zone": "localtime", "period_start": ts(OCTOBER_START),
      "period_end": ts(NOVEMBER_START)}, "INVALID_TIME_ZONE", "time_zone"),
], ids=["zone-without-period", "unknown-zone", "host-zone"])
async def test_a_bad_time_zone_is_refused_naming_the_field(
        api: Api, pool: asyncpg.Pool, fields: dict[str, object], reason: str,
        field: str) -> None:
    await _october_deposits(api)
    with pytest.raises(grpc.RpcError) as caught:
        await request(api, "october-10", ["m1"], "oct-bad", **fields)
    info = error_info_of(caught.value)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and (info.reason, info.metadata.get("field")) == (reason, field)
    assert await pool.fetchval("SELECT count(*) FROM bonus_requests") == 0


async def test_the_cli_reads_local_dates_in_the_zone(api: Api, pool: asyncpg.Pool,
                                                     tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await _october_deposits(api)
    accepted = await cli.json("bonuses", "request", "october-10", "m1", "--period-start",
                              "2026-10-01", "--period-end", "2026-11-01", "--time-zone",
                              "Europe/Berlin", "--request-id", "cli-oct")
    assert accepted["accepted_count"] == 1
    stored = await pool.fetchrow("SELECT period_start, period_end FROM bonus_requests")
    assert (stored["period_start"], stored["period_end"]) == (
        datetime(2026, 9, 30, 22, 0, tzinfo=UTC), datetime(2026, 10, 31, 23, 0, tzinfo=UTC))
    refused = await cli.error("bonuses", "request", "october-10", "m1", "--period-start",
                              "2026-10-01", "--period-end", "2026-11-01", "--time-zone",
                              "Mars/Olympus")
    assert "unknown time zone 'Mars/Olympus' in --time-zone" in refused
