"""`promo demo` as a user runs it: the real CLI in a subprocess against `promo serve` and
`promo worker` on the real clock with the default settings (clearance lead 1800 s, sweeper every
30 s). The summary's numbers are the service's own answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from grpc import aio

from config.settings import Settings
from tests.conftest import ADMIN_KEY, Api
from tests.webhook_listener import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def _service(settings: Settings, **extra: str) -> AsyncIterator[str]:
    """`promo serve` and `promo worker` as a user runs them, on the real clock."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=settings.database_url or "",
               PROMO_REDIS_URL=settings.redis_url or "", PROMO_QUEUE_NAME=settings.queue_name,
               PROMO_GRPC_PORT=str(port), PROMO_LOG_LEVEL="WARNING",
               PROMO_MIGRATE_ON_START="false", PROMO_API_KEYS=json.dumps([
                   {"name": "admin", "key": ADMIN_KEY, "roles": ["admin"]}]), **extra)
    processes = [await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", command,
                                                      env=env, cwd=ROOT)
                 for command in ("serve", "worker")]
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        await channel.close()
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), timeout=30)


@pytest.fixture
async def live_address(settings: Settings) -> AsyncIterator[str]:
    """The default settings: clearance lead 1800 s and a sweeper every 30 s, so every job must
    travel through Redis at once for the demo to finish in time."""
    async with _service(settings) as address:
        yield address


async def _promo(*args: str, env: dict[str, str] | None = None,
                 within: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, cwd=ROOT,
        env={**os.environ, "PROMO_DATA_DIR": str(ROOT / "does-not-exist"), **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_demo_plays_every_story_against_a_real_service(live_address: str,
                                                                 pool: asyncpg.Pool) -> None:
    started = time.monotonic()
    code, out, err = await _promo("demo", "--address", live_address, "--json",
                                  env={"PROMO_API_KEY": ADMIN_KEY})
    took = time.monotonic() - started
    assert code == 0, err
    summary = json.loads(out)
    run = summary["run_id"]
    assert took < 60 and summary["seconds"] < 60

    flash = summary["flash_sale"]
    assert flash["promotion_code"] == f"FLASH48-{run}"
    assert (flash["customers"], flash["distinct_codes"], flash["fallback_grants"]) == (60, 50, 10)
    assert flash["fallback_code"] == f"LOYALTY10-{run}"
    assert flash["inventory"] == {"total": 50, "used": 50, "available": 0, "fallback_grants": 10}
    assert flash["fallback_active"] is True
    assert flash["alerts"] == ["CODE_POOL_DEPLETED", "CODE_POOL_THRESHOLD",
                               "FALLBACK_CODE_ACTIVE"]

    assert summary["tiered_cashback"]["rewards"] == {
        f"cb-{run}-a": "7.50", f"cb-{run}-b": "30.00", f"cb-{run}-c": "90.00",
        f"cb-{run}-d": "denied: NOT_ELIGIBLE", f"cb-{run}-e": "7.56"}

    campaign = summary["campaign"]
    targets = [f"camp-{run}-{i}" for i in range(1, 6)]
    assert campaign["clearance_event"] is True and campaign["executed"] is True
    assert campaign["status"] == "CAMPAIGN_STATUS_EXECUTED"
    assert (campaign["approved"], campaign["rejected"]) == (targets[:3], targets[3:])
    assert (campaign["approved_count"], campaign["rejected_count"]) == (3, 2)
    assert campaign["forecast"] == {f"RELOAD10-{run}": {
        "customers": 3, "projected_value": {f"demo_cashback-{run}": "30"}, "fits": True}}
    assert campaign["executed_event"] is True
    assert campaign["grants"] == {
        **{c: f"demo_cashback-{run}=10" for c in targets[:3]},
        **{c: "denied: NOT_ELIGIBLE" for c in targets[3:]}}

    bonus = summary["bonus"]
    assert bonus["queue"] == {
        f"bonus-{run}-1": {"status": "BONUS_STATUS_CALCULATED", "amount": "15.24",
                           "skip_reason": ""},
        f"bonus-{run}-2": {"status": "BONUS_STATUS_CALCULATED", "amount": "20",
                           "skip_reason": ""},
        f"bonus-{run}-3": {"status": "BONUS_STATUS_SKIPPED", "amount": "",
                           "skip_reason": "NO_MATCHING_TRANSACTIONS"}}
    assert bonus["issued"] == {f"bonus-{run}-1": "15.24", f"bonus-{run}-2": "20"}
    assert bonus["ledger"] == {f"bonus-{run}-1": ["15.24"], f"bonus-{run}-2": ["20"],
                               f"bonus-{run}-3": []}
    assert bonus["events"] == {"BONUS_SKIPPED": 1, "BONUS_CALCULATED": 2, "BONUS_ISSUED": 2}
    assert summary["listener"]["bad_signatures"] == 0
    # The stories went to stderr, story by story, and nothing went wrong on the way out.
    assert "Traceback" not in err and "error" not in err.lower()
    for title in ("1. Flash sale", "2. Tiered cashback", "3. Conditional campaign",
                  "4. Dynamic bonus"):
        assert title in err
    # The demo's listeners are gone: nothing is left registered.
    assert await pool.fetchval("SELECT count(*) FROM webhook_listeners") == 0

    # A second run against the same service works too (names are unique per run).
    code, out, err = await _promo("demo", "--address", live_address, "--json",
                                  env={"PROMO_API_KEY": ADMIN_KEY})
    assert code == 0, err
    assert json.loads(out)["run_id"] != run


async def test_without_time_to_approve_the_demo_says_so_and_shows_the_forecast(
        settings: Settings) -> None:
    """A server whose lead is 0 announces the campaign only at its execution: no time to
    approve. The demo says so plainly, shows the state and the forecast, and goes on."""
    async with _service(settings, PROMO_CLEARANCE_LEAD_SECONDS="0") as address:
        code, out, err = await _promo("demo", "--address", address, "--json",
                                      env={"PROMO_API_KEY": ADMIN_KEY})
    assert code == 0, err
    summary = json.loads(out)
    run = summary["run_id"]
    assert summary["campaign"] == {
        "campaign_id": f"reload-campaign-{run}", "promotion_code": f"RELOAD10-{run}",
        "clearance_event": False, "executed": False, "status": "CAMPAIGN_STATUS_SCHEDULED",
        "forecast": {f"RELOAD10-{run}": {"customers": 5, "fits": True,
                                         "projected_value": {f"demo_cashback-{run}": "50"}}}}
    assert "no time left to approve" in " ".join(err.split())
    assert summary["bonus"]["issued"] == {f"bonus-{run}-1": "15.24", f"bonus-{run}-2": "20"}


async def test_an_unreachable_service_is_one_line_and_exit_1() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = await _promo("demo", "--address", f"127.0.0.1:{port}", within=30)
    assert code == 1 and out == ""
    assert err == f"error: cannot reach the promo service at 127.0.0.1:{port}: start it with " \
                  "./run up\n"


async def test_a_failed_step_is_one_line_and_exit_1(api: Api) -> None:
    code, out, err = await _promo("demo", "--address", api.address, "--api-key",
                                  "not-a-key-0123456789", within=30)
    assert code == 1 and out.startswith("promo demo run ")
    assert err == ("error: ListenerService.RegisterListener: UNAUTHENTICATED: unknown API key "
                   "(INVALID_API_KEY)\n")
