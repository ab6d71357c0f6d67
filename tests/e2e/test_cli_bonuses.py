"""`promo bonuses` against a real server with the pinned clock: definitions from flags and files,
requests, the batch run by the outbox runner, the approval queue (list with filters, show,
approve, reject, recalculate), batches, the ledger, rules and schedules; errors as one line with
the server's reason."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import asyncpg

from config.settings import Settings
from core.clock import FixedClock
from tests.conftest import Api
from tests.e2e.test_bonuses_api import run_due_batches
from tests.e2e.test_cli import Cli


async def test_definitions_create_get_list_update(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    created = await cli.json(
        "bonuses", "create", "deposit-50", "--name", "Half of the last deposit", "--formula",
        "last(deposit.amount) * 50%", "--rounding", "round_down", "--decimals", "2", "--cap",
        "200", "--min", "5", "--days", "1", "--batch-window", "60", "--issued-message",
        "Your bonus of {{event.bonus_amount}} is here", "--request-id", "def-1")
    assert {k: created[k] for k in ("definition_id", "display_name", "result_type", "rounding",
                                    "decimals", "cap_amount", "min_allowed", "data_mode",
                                    "approval_mode", "batch_window_seconds", "revision")} == {
        "definition_id": "deposit-50", "display_name": "Half of the last deposit",
        "result_type": "BONUS_RESULT_TYPE_AMOUNT", "rounding": "ROUNDING_MODE_ROUND_DOWN",
        "decimals": 2, "cap_amount": "200", "min_allowed": "5",
        "data_mode": "BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES",
        "approval_mode": "APPROVAL_MODE_AUTOMATIC", "batch_window_seconds": 60,
        "revision": "1"}
    assert created["period"] == {"time_back": {"amount": 1, "unit": "TIME_UNIT_DAYS"}}

    file = tmp_path / "logins.json"
    file.write_text(json.dumps({
        "definition_id": "logins", "display_name": "Logins", "formula":
        'customer["Logins count ever"] * 2', "resultType": "BONUS_RESULT_TYPE_POINTS",
        "points_target": "POINTS_TARGET_LEADERBOARD",
        "data_mode": "BONUS_DATA_MODE_PROPERTIES_ONLY", "approval_mode": "APPROVAL_MODE_MANUAL"}))
    logins = await cli.json("bonuses", "create", "--file", str(file))
    assert (logins["result_type"], logins["points_target"], logins["approval_mode"]) == (
        "BONUS_RESULT_TYPE_POINTS", "POINTS_TARGET_LEADERBOARD", "APPROVAL_MODE_MANUAL")
    assert "period" not in logins

    listed = await cli.json("bonuses", "list")
    assert [d["definition_id"] for d in listed["definitions"]] == ["deposit-50", "logins"]
    assert listed["next_page_token"] == ""
    table = await cli.ok("bonuses", "list")
    assert "deposit-50" in table and "last(deposit.amount) * 50%" in table
    assert "points" in table and "manual" in table

    updated = await cli.json("bonuses", "update", "deposit-50", "--approval", "manual")
    assert (updated["approval_mode"], updated["revision"], updated["cap_amount"]) == (
        "APPROVAL_MODE_MANUAL", "1", "200")  # approval does not change calculations
    edit = tmp_path / "edit.json"
    edit.write_text(json.dumps({"formula": "last(deposit.amount) * 60%", "capAmount": ""}))
    updated = await cli.json("bonuses", "update", "deposit-50", "--file", str(edit))
    assert (updated["formula"], updated["revision"], updated["cap_amount"]) == (
        "last(deposit.amount) * 60%", "2", "")
    assert await cli.json("bonuses", "get", "deposit-50") == updated
    shown = await cli.ok("bonuses", "get", "deposit-50")
    assert "bonus definition deposit-50" in shown and "last(deposit.amount) * 60%" in shown

    line = await cli.error("bonuses", "update", "deposit-50", "--formula",
                           "x = 1\nlast(deposit.amount) * ")
    assert line == ("error: INVALID_ARGUMENT: formula: line 2, column 23: the formula ends too "
                    "early: expected an expression after '*' (FORMULA_SYNTAX)")
    line = await cli.error("bonuses", "create", "no-period", "--formula", "sum(deposit.amount)")
    assert line == ("error: INVALID_ARGUMENT: period: is required: this definition reads "
                    "transactions (INVALID_PERIOD)")
    line = await cli.error("bonuses", "get", "nope")
    assert line == "error: NOT_FOUND: no bonus definition 'nope' (BONUS_DEFINITION_NOT_FOUND)"
    line = await cli.error("bonuses", "update", "deposit-50")
    assert line == "error: nothing to change: give the fields to update as flags or --file"
    line = await cli.error("bonuses", "create", "--file", str(file), "--formula", "1")
    assert line == "error: give either --file or the definition's flags, not both"


async def test_requests_queue_approve_reject_recalculate_ledger(
        api: Api, tmp_path: Path, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("bonuses", "create", "manual-10", "--formula", "sum(deposit.amount) * 10%",
                 "--approval", "manual", "--rounding", "round", "--decimals", "2", "--min", "1",
                 "--days", "1")
    for customer in ("m1", "m2", "m3"):
        await cli.ok("customers", "upsert", customer, "--currency", "EUR", "--time-zone", "UTC")
    events = tmp_path / "events.csv"
    events.write_text("external_id,customer_id,kind,amount,currency,occurred_at\n"
                      "e1,m1,deposit,250,EUR,2026-11-22T08:00:00Z\n"
                      "e2,m2,deposit,80.10,EUR,2026-11-22T07:00:00Z\n"
                      "e3,m3,deposit,5,EUR,2026-11-22T07:00:00Z\n")
    await cli.ok("customers", "record-events", str(events))
    ids = tmp_path / "customers.csv"
    ids.write_text("customer_id\nm2\nm3\n")

    clock.advance(timedelta(minutes=1, seconds=30))  # 10:01:30, in the 10:00-10:05 window
    accepted = await cli.json("bonuses", "request", "manual-10", "m1", "--customers-file",
                              str(ids), "--request-id", "manual-1")
    assert accepted == {"window_start": "2026-11-22T10:00:00Z",
                        "due_time": "2026-11-22T10:05:00Z", "accepted_count": 3}
    said = await cli.ok("bonuses", "request", "manual-10", "m1", "--customers-file", str(ids),
                        "--request-id", "manual-1")
    assert said.strip() == ("accepted 3 customer(s) in the window of 2026-11-22T10:00:00Z; "
                            "the batch runs at 2026-11-22T10:05:00Z")
    assert (await cli.json("bonuses", "queue"))["results"] == []
    clock.advance(timedelta(minutes=4))
    assert await run_due_batches(pool, settings, clock) == 1

    queue = await cli.json("bonuses", "queue", "--definition", "manual-10", "--status",
                           "calculated")
    waiting = {r["customer_id"]: r for r in queue["results"]}
    assert {c: (r["status"], r["amount"], r["currency"]) for c, r in waiting.items()} == {
        "m1": ("BONUS_STATUS_CALCULATED", "25", "EUR"),
        "m2": ("BONUS_STATUS_CALCULATED", "8.01", "EUR")}
    skipped = await cli.json("bonuses", "queue", "--status", "skipped")
    [m3] = skipped["results"]
    assert (m3["customer_id"], m3["skip_reason"]) == ("m3", "BELOW_MINIMUM")
    assert [r["customer_id"] for r in
            (await cli.json("bonuses", "queue", "--customer", "m2"))["results"]] == ["m2"]
    assert len((await cli.json("bonuses", "queue", "--after", "2026-11-22T10:05:00Z"))[
        "results"]) == 3
    assert (await cli.json("bonuses", "queue", "--before", "2026-11-22T10:05"))["results"] == []
    first_page = await cli.json("bonuses", "queue", "--page-size", "2")
    assert len(first_page["results"]) == 2 and first_page["next_page_token"]
    assert len((await cli.json("bonuses", "queue", "--page-size", "2", "--all"))[
        "results"]) == 3
    table = await cli.ok("bonuses", "queue", "--definition", "manual-10")
    assert "Bonus results" in table and "25 EUR" in table and "8.01 EUR" in table
    assert "skipped: BELOW_MINIMUM" in table and "calculated" in table
    assert "2026-11-22T10:05:30Z" in table

    m2 = waiting["m2"]["bonus_id"]
    detail = await cli.json("bonuses", "show", m2)
    assert detail["result"]["raw_value"] == "8.01"
    assert [(a["description"], a["value"], a["count"])
            for a in detail["result"]["aggregates"]] == [
        ("sum(deposit.amount)", "80.100000", "1")]
    assert "Result: give 8.01." in detail["result"]["explanation"]
    assert [(e["kind"], e["amount"]) for e in detail["events"]] == [("deposit", "80.100000")]
    shown = await cli.ok("bonuses", "show", m2)
    assert f"bonus {m2}: calculated, 8.01 EUR" in shown
    assert "Aggregates" in shown and "sum(deposit.amount)" in shown
    assert "Result: give 8.01." in shown and "Events" in shown and "80.100000" in shown

    # The operator edits the formula and recalculates what is not issued yet.
    await cli.ok("bonuses", "update", "manual-10", "--formula", "sum(deposit.amount) * 20%")
    recalculated = await cli.json("bonuses", "recalculate", "manual-10", "--request-id", "rc-1")
    assert recalculated == {"recalculated_count": 3, "calculated_count": 3, "skipped_count": 0}
    assert (await cli.ok("bonuses", "recalculate", "manual-10", "--request-id", "rc-1")
            ).strip() == "recalculated 3: 3 calculated, 0 skipped"

    after = {r["customer_id"]: r for r in (await cli.json("bonuses", "queue"))["results"]}
    assert {c: r["amount"] for c, r in after.items()} == {"m1": "50", "m2": "16.02", "m3": "1"}
    approved = await cli.json("bonuses", "approve", after["m1"]["bonus_id"],
                              after["m2"]["bonus_id"], "--request-id", "ap-1")
    assert [(r["customer_id"], r["status"], r["decided_by"]) for r in approved["results"]] == [
        ("m1", "BONUS_STATUS_ISSUED", "test-admin"), ("m2", "BONUS_STATUS_ISSUED", "test-admin")]
    said = await cli.ok("bonuses", "reject", after["m3"]["bonus_id"], "--reason", "bonus abuse")
    assert "rejected 1 result(s)" in said and "rejected" in said
    rejected = await cli.json("bonuses", "show", after["m3"]["bonus_id"])
    assert (rejected["result"]["status"], rejected["result"]["reject_reason"]) == (
        "BONUS_STATUS_REJECTED", "bonus abuse")

    line = await cli.error("bonuses", "approve", after["m3"]["bonus_id"])
    assert line == (f"error: FAILED_PRECONDITION: bonus {after['m3']['bonus_id']} is REJECTED; "
                    "only CALCULATED results can be approved (BONUS_NOT_AWAITING_APPROVAL)")
    line = await cli.error("bonuses", "show", "nope")
    assert line == ("error: INVALID_ARGUMENT: bonus_id 'nope' is not a bonus id (a UUID) "
                    "(INVALID_ID)")

    ledger = await cli.json("bonuses", "ledger", "m1")
    assert [(e["amount"], e["source"], e["definition_id"]) for e in ledger["entries"]] == [
        ("50", "DYNAMIC_FORMULA", "manual-10")]
    assert (await cli.json("bonuses", "ledger", "m3"))["entries"] == []
    table = await cli.ok("bonuses", "ledger", "m2")
    assert "Ledger of m2" in table and "16.02" in table and "DYNAMIC_FORMULA" in table

    [batch] = (await cli.json("bonuses", "batches", "--definition", "manual-10"))["batches"]
    assert (batch["request_count"], batch["customer_count"], batch["events_read"]) == (
        3, 3, "3")
    table = await cli.ok("bonuses", "batches")
    assert "Bonus batches" in table and "manual-10" in table


async def test_rules_and_schedules(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("bonuses", "create", "bets-10", "--formula", "sum(bet.amount) * 10%",
                 "--days", "1")
    await cli.ok("customers", "upsert", "z1")
    rule = await cli.json("bonuses", "rules", "create", "gold-quest", "--definition", "bets-10",
                          "--event-kind", "bet", "--filter", 'game = "Gold Quest"', "--every",
                          "100", "--period-mode", "first_to_last")
    assert {k: rule[k] for k in ("rule_id", "definition_id", "event_kind", "filter", "every",
                                 "period_mode", "active")} == {
        "rule_id": "gold-quest", "definition_id": "bets-10", "event_kind": "bet",
        "filter": 'game = "Gold Quest"', "every": 100,
        "period_mode": "RULE_PERIOD_MODE_FIRST_TO_LAST", "active": True}
    file = tmp_path / "rule.json"
    file.write_text(json.dumps({
        "rule_id": "qualified", "definition_id": "bets-10", "event_kind": "bet", "every": 2,
        "qualification_kind": "deposit", "qualification_min_amount": "100",
        "max_executions": 3, "period_mode": "RULE_PERIOD_MODE_QUALIFICATION_TO_LAST"}))
    qualified = await cli.json("bonuses", "rules", "create", "--file", str(file))
    assert (qualified["qualification_kind"], qualified["max_executions"]) == ("deposit", 3)
    assert await cli.json("bonuses", "rules", "get", "qualified") == qualified
    listed = await cli.json("bonuses", "rules", "list")
    assert [r["rule_id"] for r in listed["rules"]] == ["gold-quest", "qualified"]
    paused = await cli.json("bonuses", "rules", "pause", "gold-quest")
    assert paused["active"] is False
    table = await cli.ok("bonuses", "rules", "list")
    assert 'bet where game = "Gold Quest"' in table and "deposit >= 100" in table
    assert "qualification_to_last" in table
    assert (await cli.ok("bonuses", "rules", "resume", "gold-quest")).strip() == (
        "rule gold-quest resumed")
    assert (await cli.json("bonuses", "rules", "get", "gold-quest"))["active"] is True
    line = await cli.error("bonuses", "rules", "create", "bad", "--definition", "bets-10",
                           "--event-kind", "bet", "--every", "2", "--max-executions", "3")
    assert line == ("error: INVALID_ARGUMENT: max_executions: limits executions per "
                    "qualification: set a qualification too (INVALID_BONUS_RULE)")

    schedule = await cli.json("bonuses", "schedules", "create", "monday", "--definition",
                              "bets-10", "--customer", "z1", "--weekday", "mon", "--at",
                              "12:00", "--time-zone", "Europe/Berlin")
    assert {k: schedule[k] for k in ("schedule_id", "customer_ids", "weekday", "local_time",
                                     "time_zone", "active", "next_run_time")} == {
        "schedule_id": "monday", "customer_ids": ["z1"], "weekday": 1, "local_time": "12:00",
        "time_zone": "Europe/Berlin", "active": True,
        "next_run_time": "2026-11-23T11:00:00Z"}  # Monday 12:00 in Berlin (UTC+1)
    listed = await cli.json("bonuses", "schedules", "list")
    assert [s["schedule_id"] for s in listed["schedules"]] == ["monday"]
    assert await cli.json("bonuses", "schedules", "get", "monday") == schedule
    line = await cli.error("bonuses", "schedules", "get", "ghost")
    assert line == "error: NOT_FOUND: no bonus schedule 'ghost' (BONUS_SCHEDULE_NOT_FOUND)"
    table = await cli.ok("bonuses", "schedules", "list")
    assert "mon 12:00 Europe/Berlin" in table and "1 customer(s)" in table
    assert (await cli.json("bonuses", "schedules", "pause", "monday"))["active"] is False
    said = await cli.ok("bonuses", "schedules", "resume", "monday")
    assert said.strip() == "schedule monday resumed, next run 2026-11-23T11:00:00Z"
    line = await cli.error("bonuses", "schedules", "pause", "ghost")
    assert line == "error: NOT_FOUND: no bonus schedule 'ghost' (BONUS_SCHEDULE_NOT_FOUND)"
    line = await cli.error("bonuses", "schedules", "create", "x", "--definition", "bets-10",
                           "--at", "12:00", "--weekday", "someday")
    assert line == ("error: --weekday takes mon..sun, 1..7 (1 = Monday) or 0 (every day), "
                    "got 'someday'")


async def test_variables_from_var_flags(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    created = await cli.json(
        "bonuses", "create", "capped", "--formula", "cap(sum(deposit.amount) * rate, max_bonus)",
        "--days", "1", "--var", "max_bonus=EUR:200,USD:250", "--var", "rate=0.5")
    assert created["variables"] == [
        {"name": "max_bonus", "value": "", "per_currency": {"EUR": "200", "USD": "250"}},
        {"name": "rate", "value": "0.5", "per_currency": {}}]
    line = await cli.error("bonuses", "update", "capped", "--var", "max_bonus=EUR:300")
    assert line.startswith("error: INVALID_ARGUMENT: formula: line 1, column 27: unknown name "
                           "'rate'")  # --var replaces all the variables
    assert line.endswith("(FORMULA_INVALID)")
    updated = await cli.json("bonuses", "update", "capped", "--var", "max_bonus=eur:300",
                             "--var", "rate=0.4")
    assert (updated["revision"], updated["variables"]) == ("2", [
        {"name": "max_bonus", "value": "", "per_currency": {"EUR": "300"}},
        {"name": "rate", "value": "0.4", "per_currency": {}}])
    line = await cli.error("bonuses", "update", "capped", "--var", "rate=lots")
    assert line == ("error: INVALID_ARGUMENT: variables[0] ('rate'): value must be a decimal "
                    "number, got 'lots' (INVALID_VARIABLE)")
    line = await cli.error("bonuses", "update", "capped", "--var", "max_bonus=EUR:300,USD")
    assert line == ("error: --var max_bonus: expected CODE:AMOUNT pairs like EUR:200,USD:250, "
                    "got 'USD'")
    line = await cli.error("bonuses", "update", "capped", "--var", "=5")
    assert line == "error: --var takes KEY=VALUE, got '=5'"
    # The same parser serves `promo formulas`.
    valid = await cli.json("formulas", "validate", "--source", "cap(1000 * rate, max_bonus)",
                           "--var", "max_bonus=EUR:200,USD:250", "--var", "rate=0.5")
    assert valid["variables_used"] == ["rate", "max_bonus"]


async def test_rules_and_schedules_update(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("bonuses", "create", "bets-10", "--formula", "sum(bet.amount) * 10%",
                 "--days", "1")
    await cli.ok("customers", "upsert", "z1")
    await cli.ok("customers", "upsert", "z2")
    await cli.ok("bonuses", "rules", "create", "gold-quest", "--definition", "bets-10",
                 "--event-kind", "bet", "--filter", 'game = "Gold Quest"', "--every", "100")
    rule = await cli.json("bonuses", "rules", "update", "gold-quest", "--every", "3",
                          "--filter", "", "--period-mode", "first_to_last",
                          "--request-id", "edit-1")
    assert {k: rule[k] for k in ("every", "filter", "event_kind", "period_mode")} == {
        "every": 3, "filter": "", "event_kind": "bet",
        "period_mode": "RULE_PERIOD_MODE_FIRST_TO_LAST"}
    again = await cli.json("bonuses", "rules", "update", "gold-quest", "--every", "3",
                           "--filter", "", "--period-mode", "first_to_last",
                           "--request-id", "edit-1")
    assert again == rule
    edit = tmp_path / "rule-edit.json"
    edit.write_text(json.dumps({"qualificationKind": "deposit", "max_executions": 2}))
    qualified = await cli.json("bonuses", "rules", "update", "gold-quest", "--file", str(edit))
    assert (qualified["qualification_kind"], qualified["max_executions"]) == ("deposit", 2)
    line = await cli.error("bonuses", "rules", "update", "gold-quest")
    assert line == "error: nothing to change: give the fields to update as flags or --file"
    line = await cli.error("bonuses", "rules", "update", "gold-quest", "--period-mode",
                           "first_to_fixed_end")
    assert line == ("error: INVALID_ARGUMENT: period_end: is required for FIRST_TO_FIXED_END "
                    "(MISSING_FIELD)")
    fixed = await cli.json("bonuses", "rules", "update", "gold-quest", "--period-mode",
                           "first_to_fixed_end", "--period-end", "2026-12-01")
    assert fixed["period_end"] == "2026-12-01T00:00:00Z"

    await cli.ok("bonuses", "schedules", "create", "monday", "--definition", "bets-10",
                 "--customer", "z1", "--weekday", "mon", "--at", "12:00", "--time-zone",
                 "Europe/Berlin")
    moved = await cli.json("bonuses", "schedules", "update", "monday", "--weekday", "wed",
                           "--at", "09:30")
    assert (moved["weekday"], moved["local_time"], moved["next_run_time"]) == (
        3, "09:30", "2026-11-25T08:30:00Z")  # Wednesday 09:30 in Berlin
    more = await cli.json("bonuses", "schedules", "update", "monday", "--customer", "z1",
                          "--customer", "z2")
    assert (more["customer_ids"], more["next_run_time"]) == (
        ["z1", "z2"], "2026-11-25T08:30:00Z")
    line = await cli.error("bonuses", "schedules", "update", "monday", "--time-zone", "Mars")
    assert line == ("error: INVALID_ARGUMENT: unknown time zone 'Mars' in time_zone; use an "
                    "IANA name such as 'Europe/Berlin' (INVALID_TIME_ZONE)")
    line = await cli.error("bonuses", "schedules", "update", "ghost", "--at", "10:00")
    assert line == "error: NOT_FOUND: no bonus schedule 'ghost' (BONUS_SCHEDULE_NOT_FOUND)"
