"""The operator CLI (`promo reward-types|promotions|campaigns|listeners|formulas|customers`)
against a real in-process server: JSON output parsed, human output, exit codes, and errors as one
line with the server's reason (never a traceback)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from click.testing import Result
from typer.testing import CliRunner

from cli.main import app
from config.settings import Settings
from core.clock import FixedClock
from server.app import Dependencies, start_server
from tests.conftest import ADMIN_KEY, RUNTIME_KEY, Api
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.promo_helpers import promotion, reward_type
from workers import campaigns as _campaigns  # noqa: F401  registers the campaign jobs
from workers.outbox import run_outbox_job


class Cli:
    """Runs `promo ...` in a thread (the test's loop keeps serving) against the test server."""

    def __init__(self, api: Api | str, data_dir: Path) -> None:
        address = api if isinstance(api, str) else api.address
        self.env = {"PROMO_ADDRESS": address, "PROMO_API_KEY": ADMIN_KEY,
                    "PROMO_DATA_DIR": str(data_dir), "COLUMNS": "200"}

    async def run(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        runner = CliRunner()
        merged = {**self.env, **(env or {})}
        return await asyncio.to_thread(runner.invoke, app, list(args), env=merged,
                                       catch_exceptions=False)

    async def ok(self, *args: str) -> str:
        result = await self.run(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))

    async def error(self, *args: str, env: dict[str, str | None] | None = None) -> str:
        result = await self.run(*args, env=env)
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert "Traceback" not in result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]


@pytest.fixture
def cli(api: Api, tmp_path: Path) -> Cli:
    return Cli(api, tmp_path)


async def test_reward_types_create_get_list_update(cli: Cli) -> None:
    created = await cli.json("reward-types", "create", "free_spins", "--display-name",
                             "Free spins", "--category", "units", "--min", "1", "--max", "100",
                             "--request-id", "rt-1")
    assert {k: created[k] for k in ("name", "display_name", "category", "min_value",
                                    "max_value")} == {
        "name": "free_spins", "display_name": "Free spins", "category": "REWARD_CATEGORY_UNITS",
        "min_value": "1.000000", "max_value": "100.000000"}
    # The same request id again: the first answer, nothing changed.
    again = await cli.json("reward-types", "create", "free_spins", "--display-name",
                           "Free spins", "--category", "units", "--min", "1", "--max", "100",
                           "--request-id", "rt-1")
    assert again == created
    await cli.ok("reward-types", "create", "cashback", "--display-name", "Cashback")
    listed = await cli.json("reward-types", "list")
    assert [r["name"] for r in listed["reward_types"]] == ["cashback", "free_spins"]
    assert listed["next_page_token"] == ""
    first_page = await cli.json("reward-types", "list", "--page-size", "1")
    assert [r["name"] for r in first_page["reward_types"]] == ["cashback"]
    second = await cli.json("reward-types", "list", "--page-size", "1", "--page-token",
                            first_page["next_page_token"])
    assert [r["name"] for r in second["reward_types"]] == ["free_spins"]
    every = await cli.json("reward-types", "list", "--page-size", "1", "--all")
    assert [r["name"] for r in every["reward_types"]] == ["cashback", "free_spins"]
    updated = await cli.json("reward-types", "update", "free_spins", "--display-name", "Spins",
                             "--max", "")
    assert (updated["display_name"], updated["max_value"], updated["min_value"]) == (
        "Spins", "", "1.000000")
    got = await cli.json("reward-types", "get", "free_spins")
    assert got["display_name"] == "Spins"
    table = await cli.ok("reward-types", "list")
    assert "free_spins" in table and "Spins" in table and "units" in table.lower()


async def test_promotion_lifecycle_lobby_and_rewards(cli: Cli) -> None:
    await cli.ok("reward-types", "create", "cashback", "--display-name", "Cashback")
    created = await cli.json(
        "promotions", "create", "--code", "VIP25", "--name", "VIP cashback", "--reward",
        "cashback=15", "--cap", "cashback:daily:40", "--customer-cap", "10", "--property",
        "expires=2026-12-31")
    assert created["status"] == "PROMOTION_STATUS_DRAFT"
    assert created["rewards"][0] == {**created["rewards"][0], "reward_type": "cashback",
                                     "kind": "REWARD_KIND_SINGLE", "value": "15"}
    assert created["budget_caps"] == [{"reward_type": "cashback",
                                       "period": "CAP_PERIOD_DAILY", "limit": "40"}]
    denied = await cli.json("promotions", "get-reward", "VIP25", "c1")
    assert denied["denial_reason"] == "DENIAL_REASON_NOT_ACTIVE"
    assert "grant" not in denied

    active = await cli.json("promotions", "activate", "VIP25")
    assert active["status"] == "PROMOTION_STATUS_ACTIVE"
    first = await cli.json("promotions", "get-reward", "VIP25", "c1", "--request-id", "r1")
    grant = first["grant"]
    assert [(r["reward_type"], r["value"], r["display_name"]) for r in grant["rewards"]] == [
        ("cashback", "15", "Cashback")]
    assert grant["properties"] == {"expires": "2026-12-31"}
    assert first["existing"] is False
    retry = await cli.json("promotions", "get-reward", "VIP25", "c1", "--request-id", "r1")
    assert retry["existing"] is True and retry["grant"]["grant_id"] == grant["grant_id"]
    text = await cli.ok("promotions", "get-reward", "VIP25", "c2")
    assert text.startswith("granted: grant ") and "cashback=15" in text
    # 30 of 40 used: a third customer would need 45.
    capped = await cli.json("promotions", "get-reward", "VIP25", "c3")
    assert capped["denial_reason"] == "DENIAL_REASON_BUDGET_CAP_REACHED"
    assert capped["denied_scope"] == "cashback"
    text = await cli.ok("promotions", "get-reward", "VIP25", "c3")
    assert text.strip() == ("denied: BUDGET_CAP_REACHED: the daily budget cap of cashback "
                            "would be exceeded")

    got = await cli.json("promotions", "get", "VIP25")
    usage = {(u["scope"], u["period"]): (u["used"], u["limit"]) for u in got["cap_usage"]}
    assert usage == {("cashback", "CAP_PERIOD_DAILY"): ("30", "40"),
                     ("#customers", "CAP_PERIOD_LIFETIME"): ("2", "10")}

    lobby = await cli.json("promotions", "list")
    assert [(p["promotion_code"], p["status"]) for p in lobby["promotions"]] == [
        ("VIP25", "PROMOTION_STATUS_ACTIVE")]
    table = await cli.ok("promotions", "list")
    assert "VIP25" in table and "active" in table and "single" in table
    assert "cashback daily 30/40 (reached)" in table and "customers 2/10" in table
    assert "━" in table  # the caps as progress bars

    shown = await cli.ok("promotions", "get", "VIP25")
    assert "VIP cashback" in shown and "PROMOTION_STATUS_ACTIVE" in shown
    assert "caps used:" in shown and "cashback daily 30/40 (reached)" in shown

    revoked = await cli.json("promotions", "revoke", grant["grant_id"], "--reason", "refund")
    assert revoked == {"revoked": True}
    assert (await cli.ok("promotions", "revoke", grant["grant_id"])).strip() == (
        f"grant {grant['grant_id']} was already revoked")
    rows = (await cli.json("promotions", "reconciliation", "VIP25"))["rows"]
    cashback = next(r for r in rows if r["scope"] == "cashback")
    assert (cashback["granted_count"], cashback["granted_amount"], cashback["revoked_count"],
            cashback["revoked_amount"], cashback["net_amount"], cashback["counter_matches"]) == (
        "2", "30", "1", "15", "15", True)

    off = await cli.json("promotions", "deactivate", "VIP25")
    assert off["status"] == "PROMOTION_STATUS_DEACTIVATED"
    assert (await cli.json("promotions", "list", "--status", "active"))["promotions"] == []


async def test_promotion_from_json_file(cli: Cli, api: Api, tmp_path: Path) -> None:
    await reward_type(api, "cashback")
    path = tmp_path / "tiered.json"
    path.write_text(json.dumps({
        "promotion_code": "TIERS", "name": "Tiered", "time_zone": "Europe/Berlin",
        "rewards": [{"reward_type": "cashback", "kind": "REWARD_KIND_TIERED", "lookback_days": 7,
                     "tiers": [{"condition": "sum(bet.amount) >= 100", "value": "20"},
                               {"condition": "true", "value": "5"}]}]}))
    created = await cli.json("promotions", "create", "--file", str(path), "--activate")
    assert created["status"] == "PROMOTION_STATUS_ACTIVE"
    assert created["rewards"][0]["kind"] == "REWARD_KIND_TIERED"
    assert [t["value"] for t in created["rewards"][0]["tiers"]] == ["20", "5"]
    newcomer = await cli.json("promotions", "get-reward", "TIERS", "newcomer")
    assert newcomer["denial_reason"] == "DENIAL_REASON_NOT_ELIGIBLE"
    assert newcomer["denial_message"] == ("cashback: no reward, NO_MATCHING_TRANSACTIONS (no "
                                          "events matched sum(bet.amount))")
    events = tmp_path / "bets.json"
    events.write_text(json.dumps([
        {"external_id": f"b{i}", "customer_id": "p1", "kind": "bet", "amount": amount,
         "currency": "EUR", "occurred_at": "2026-11-21T10:00:00Z"}
        for i, amount in enumerate(["60", "40", "1"])]))
    await cli.ok("customers", "record-events", str(events), "--create-missing")
    reward = await cli.json("promotions", "get-reward", "TIERS", "p1")
    assert reward["grant"]["rewards"][0]["value"] == "20"
    line = await cli.error("promotions", "create", "--file", str(path), "--code", "X")
    assert line == "error: give either --file or the promotion's flags, not both"


async def test_errors_are_one_line_with_the_servers_reason(cli: Cli, api: Api,
                                                           tmp_path: Path) -> None:
    assert await cli.error("promotions", "get", "NOPE") == (
        "error: NOT_FOUND: no promotion with code 'NOPE' (PROMOTION_NOT_FOUND)")
    assert await cli.error("promotions", "get", "NOPE", env={"PROMO_API_KEY": None}) == (
        "error: UNAUTHENTICATED: missing API key: send it as 'x-api-key: <key>' or "
        "'authorization: Bearer <key>' (MISSING_API_KEY)")
    assert await cli.error("reward-types", "list", env={"PROMO_API_KEY": "x" * 20}) == (
        "error: UNAUTHENTICATED: unknown API key (INVALID_API_KEY)")
    denied = await cli.error("promotions", "list", env={"PROMO_API_KEY": RUNTIME_KEY})
    assert denied.startswith("error: PERMISSION_DENIED: API key 'test-runtime' (roles: "
                             "runtime) may not call /promo.v1.PromotionService/ListPromotions")
    assert denied.endswith("(ROLE_REQUIRED)")
    bad = await cli.error("reward-types", "create", "x", "--display-name", "X", "--min", "abc")
    assert bad.startswith("error: INVALID_ARGUMENT: ") and bad.endswith("(INVALID_DECIMAL)")
    assert await cli.error("promotions", "create", "--code", "A", "--cap", "cashback:hourly:5") \
        == ("error: --cap period: 'hourly' is not one of daily, weekly, monthly, lifetime")
    # No server there: the transport's status, still one line.
    down = await cli.error("promotions", "list", env={"PROMO_ADDRESS": "127.0.0.1:1",
                                                      "PROMO_TIMEOUT": "3"})
    assert down.startswith("error: UNAVAILABLE: ") or down.startswith(
        "error: DEADLINE_EXCEEDED: "), down
    # The local admin key of `promo up` is used when no key is given.
    (tmp_path / "admin-api-key").write_text(ADMIN_KEY + "\n")
    listed = await cli.run("promotions", "list", "--json", env={"PROMO_API_KEY": None})
    assert listed.exit_code == 0 and json.loads(listed.stdout)["promotions"] == []


async def test_customers_events_and_formulas(cli: Cli, clock: FixedClock,
                                             tmp_path: Path) -> None:
    upserted = await cli.json("customers", "upsert", "p1", "--currency", "EUR", "--time-zone",
                              "Europe/Berlin", "--property", "tier=gold", "--decimal",
                              "level=3", "--bool", "vip=true")
    assert upserted == {"created_count": 1, "updated_count": 0}
    customer = await cli.json("customers", "get", "p1")
    assert customer["properties"] == {"tier": {"string_value": "gold"},
                                      "level": {"decimal_value": "3"},
                                      "vip": {"bool_value": True}}
    at = [(clock.now() - timedelta(hours=h)).isoformat().replace("+00:00", "Z")
          for h in (1, 2, 3)]
    csv_file = tmp_path / "events.csv"
    csv_file.write_text("external_id,customer_id,kind,amount,currency,occurred_at,game\n"
                        f"e1,p1,bet,100,EUR,{at[0]},Slots\n"
                        f"e2,p1,win,30,EUR,{at[1]},Slots\n"
                        f"e3,p2,bet,50,EUR,{at[2]},Roulette\n")
    recorded = await cli.json("customers", "record-events", str(csv_file), "--create-missing")
    assert recorded == {"inserted_count": 3, "duplicate_count": 0, "created_customer_count": 1}
    # The same file again: the same request id, nothing new.
    assert await cli.json("customers", "record-events", str(csv_file), "--create-missing") \
        == recorded
    json_file = tmp_path / "more.json"
    json_file.write_text(json.dumps([
        {"external_id": "e1", "customer_id": "p1", "kind": "bet", "amount": "100",
         "currency": "EUR", "occurred_at": at[0], "attributes": {"game": "Slots"}},
        {"external_id": "e4", "customer_id": "p1", "kind": "bet", "amount": "20.50",
         "currency": "EUR", "occurred_at": at[0], "attributes": {"game": "Slots"}}]))
    assert await cli.json("customers", "record-events", str(json_file)) == {
        "inserted_count": 1, "duplicate_count": 1, "created_customer_count": 0}
    listed = await cli.json("customers", "events", "p1", "--kind", "bet")
    assert sorted((e["external_id"], e["amount"], e["attributes"]["game"])
                  for e in listed["events"]) == [("e1", "100.000000", "Slots"),
                                                   ("e4", "20.500000", "Slots")]
    assert [c["customer_id"] for c in (await cli.json("customers", "list"))["customers"]] == [
        "p1", "p2"]

    source = "(sum(bet.amount) - sum(win.amount)) * 10%"
    valid = await cli.json("formulas", "validate", "--source", source)
    assert [a["description"] for a in valid["aggregates"]] == ["sum(bet.amount)",
                                                               "sum(win.amount)"]
    bad = await cli.error("formulas", "validate", "--source", "sum(bet.amount) *")
    assert bad.startswith("error: INVALID_ARGUMENT: ") and bad.endswith("(FORMULA_SYNTAX)")
    run = await cli.json("formulas", "dry-run", "--customer", "p1", "--source", source,
                         "--days", "1", "--rounding", "round", "--decimals", "2")
    assert (run["outcome"], run["amount"]) == ("DRY_RUN_OUTCOME_AMOUNT", "9.05")
    text = await cli.ok("formulas", "dry-run", "--customer", "p1", "--source", source,
                        "--days", "1", "--rounding", "round", "--decimals", "2")
    assert text.startswith("amount: 9.05")


async def test_listeners_and_campaigns(cli: Cli, api: Api, clock: FixedClock) -> None:
    registered = await cli.json("listeners", "register", "--event-type", "scheduled_campaign",
                                "--url", "https://hooks.example.com/a", "--description",
                                "compliance")
    listener = registered["listener"]
    assert (listener["event_type"], listener["url"], listener["channel"]) == (
        "EVENT_TYPE_SCHEDULED_CAMPAIGN", "https://hooks.example.com/a",
        "LISTENER_CHANNEL_WEBHOOK")
    assert len(registered["generated_secret"]) >= 32
    listed = await cli.json("listeners", "list")
    assert [x["listener_id"] for x in listed["listeners"]] == [listener["listener_id"]]
    table = await cli.ok("listeners", "list")
    assert "scheduled_campaign" in table and "https://hooks.example.com/a" in table
    assert (await cli.json("listeners", "deliveries"))["deliveries"] == []

    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "camp-1", clock.now() + timedelta(hours=4),
                          customers=["c1", "c2", "c3"])
    await set_statuses(api, "camp-1", {"c1": True, "c2": False}, request_id="s1")
    campaigns = await cli.json("campaigns", "list")
    assert [(c["campaign_id"], c["status"]) for c in campaigns["campaigns"]] == [
        ("camp-1", "CAMPAIGN_STATUS_SCHEDULED")]
    got = await cli.json("campaigns", "get", "camp-1")
    assert (got["campaign_id"], got["target_count"], got["conditional_execution"]) == (
        "camp-1", "3", True)
    state = await cli.json("campaigns", "clearance", "camp-1", "--customers")
    assert (state["target_count"], state["approved"], state["rejected"], state["pending"]) == (
        3, 1, 1, 1)
    assert state["clearance_required_by"] == "2026-11-22T14:00:00Z"
    assert {c["customer_id"]: c.get("approved") for c in state["customers"]} == {
        "c1": True, "c2": False, "c3": None}
    summary = await cli.json("campaigns", "clearance", "camp-1", "--page-size", "1")
    assert (summary["approved"], summary["rejected"], summary["pending"]) == (1, 1, 1)
    assert "customers" not in summary
    text = await cli.ok("campaigns", "clearance", "camp-1", "--customers")
    assert "3 targets: approved 1, rejected 1, pending 1" in text
    assert "c3" in text and "pending" in text
    assert await cli.error("campaigns", "get", "nope") == (
        "error: NOT_FOUND: no campaign 'nope' (CAMPAIGN_NOT_FOUND)")


async def test_delivery_log(cli: Cli, api: Api, clock: FixedClock, pool: asyncpg.Pool,
                            settings: Settings) -> None:
    registered = await cli.json("listeners", "register", "--event-type", "scheduled_campaign",
                                "--url", "https://hooks.example.com/a")
    listener_id = registered["listener"]["listener_id"]
    await reward_type(api)
    await promotion(api)
    # Inside the clearance lead: the notification is due at once. Run that one outbox job (as
    # a worker would); it emits the scheduled-campaign event, whose delivery stays pending
    # because no worker sends it here.
    await create_campaign(api, "camp-2", clock.now() + timedelta(minutes=10), customers=["c1"])
    notify = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'campaign.notify'")
    assert await run_outbox_job({"pool": pool, "clock": clock, "settings": settings},
                                notify) == "done"
    log = await cli.json("listeners", "deliveries", "--listener", listener_id)
    [delivery] = log["deliveries"]
    assert (delivery["status"], delivery["event_type"], delivery["attempt_count"]) == (
        "DELIVERY_STATUS_PENDING", "EVENT_TYPE_SCHEDULED_CAMPAIGN", 0)
    assert (await cli.json("listeners", "deliveries", "--status", "dead"))["deliveries"] == []
    detail = await cli.json("listeners", "delivery", delivery["delivery_id"])
    body = json.loads(detail["event_body"])
    assert body["data"]["campaign_id"] == "camp-2" and detail["attempts"] == []
    table = await cli.ok("listeners", "deliveries")
    assert "pending" in table and "scheduled_campaign" in table
    assert await cli.error("listeners", "redeliver", delivery["delivery_id"]) == (
        f"error: FAILED_PRECONDITION: delivery {delivery['delivery_id']} is PENDING: it is "
        "already on its way; see its next attempt time (DELIVERY_PENDING)")


async def test_tls_with_a_ca_file(settings: Settings, pool: asyncpg.Pool,
                                  tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, root = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    root.write_bytes(ca.cert_pem.bytes())
    tls = settings.model_copy(update={"tls_cert_file": chain, "tls_key_file": key})
    running = await start_server(tls, Dependencies(pool=pool))
    try:
        cli = Cli(f"localhost:{running.port}", tmp_path)
        listed = await cli.run("reward-types", "--ca-file", str(root), "list", "--json")
        assert listed.exit_code == 0, listed.output
        assert json.loads(listed.stdout) == {"reward_types": [], "next_page_token": ""}
        plain = await cli.error("reward-types", "--timeout", "3", "list")
        assert plain.startswith("error: UNAVAILABLE: ") or plain.startswith(
            "error: DEADLINE_EXCEEDED: "), plain
    finally:
        await running.stop(0)
