"""Audit of the operator CLI as a user meets it: bad, empty, binary and odd input files, flags the
wire cannot carry, an unreachable server, idempotent retries with the same request id (and the
derived id of uploads from a file), `--json` against the table, and pagination hints. Errors are one
line on stderr with exit status 1 (usage errors: click's status 2), never a traceback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import Api
from tests.e2e.test_cli import Cli

NOWHERE = "127.0.0.1:1"  # no server: commands that fail before any call never get that far


async def _invoke(cli: Cli, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run `promo ...` catching exceptions, so a traceback shows up as the result's exception."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args),
                                   env={**cli.env, **(env or {})})


async def _one_line_error(cli: Cli, *args: str, env: dict[str, str | None] | None = None) -> str:
    result = await _invoke(cli, *args, env=env)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


async def _usage_error(cli: Cli, *args: str) -> str:
    result = await _invoke(cli, *args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


# --- files and flags refused before any call (no server needed) ---------------------------------

async def test_formula_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "formula.txt"
    path.write_bytes(b"\xff\xfe\x00sum(bet.amount)")
    line = await _one_line_error(cli, "formulas", "validate", "--file", str(path))
    assert str(path) in line


async def test_code_alert_digits_that_are_not_a_number_are_one_line(tmp_path: Path) -> None:
    # "²".isdigit() is True, int("²") raises ValueError.
    cli = Cli(NOWHERE, tmp_path)
    line = await _one_line_error(cli, "promotions", "create", "--code", "A", "--external-reward",
                                 "x", "--personalized", "--code-alert", "\u00b2")
    assert "--code-alert" in line


async def test_code_alert_beyond_int32_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    line = await _one_line_error(cli, "promotions", "create", "--code", "A", "--external-reward",
                                 "x", "--personalized", "--code-alert", "99999999999")
    assert "--code-alert" in line and "out of range" in line


async def test_customers_file_of_numbers_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "customers.json"
    path.write_text("[1, 2]")
    line = await _one_line_error(cli, "customers", "upsert", "--file", str(path))
    assert str(path) in line


async def test_deeply_nested_json_file_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    line = await _one_line_error(cli, "promotions", "create", "--file", str(path))
    assert str(path) in line


async def test_unknown_field_in_a_json_file_is_one_line(tmp_path: Path) -> None:
    """protobuf's ParseError text holds a newline ("...\\n Available Fields..."); the CLI's
    errors are one line."""
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "promotion.json"
    path.write_text(json.dumps({"promotion_code": "X", "bogus": 1}))
    line = await _one_line_error(cli, "promotions", "create", "--file", str(path))
    assert "bogus" in line
    events = tmp_path / "events.json"
    events.write_text(json.dumps([{"external_id": "e1", "bogus": 1}]))
    line = await _one_line_error(cli, "customers", "record-events", str(events))
    assert "bogus" in line


async def test_promotion_file_holding_a_list_says_an_object_is_expected(tmp_path: Path) -> None:
    """As `bonuses create --file` and `products discounts create --file` say it."""
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "promotion.json"
    path.write_text("[1, 2]")
    line = await _one_line_error(cli, "promotions", "create", "--file", str(path))
    assert "expected a JSON object" in line, line


async def test_binary_and_empty_files_are_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01bad")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    for path, args in ((binary, ("promotions", "create", "--file", str(binary))),
                       (empty, ("promotions", "create", "--file", str(empty))),
                       (binary, ("customers", "record-events", str(binary))),
                       (binary, ("customers", "upsert", "--file", str(binary))),
                       (binary, ("bonuses", "request", "d1", "--customers-file", str(binary))),
                       (empty, ("bonuses", "create", "--file", str(empty))),
                       (binary, ("products", "assign", "P", "--file", str(binary))),
                       (binary, ("products", "discounts", "create", "--file", str(binary)))):
        line = await _one_line_error(cli, *args)
        assert line.startswith(f"error: cannot read {path}: "), (args, line)


async def test_json_list_item_that_is_not_an_object_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    path = tmp_path / "items.json"
    path.write_text('["x"]')
    for args in (("bonuses", "create", "--file", str(path)),
                 ("products", "assign", "P", "--file", str(path)),
                 ("products", "discounts", "create", "--file", str(path))):
        await _one_line_error(cli, *args)


async def test_missing_files_and_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    missing = str(tmp_path / "nope.json")
    for args in (("promotions", "create", "--file", missing),
                 ("customers", "record-events", missing),
                 ("codes", "upload", "P", missing),
                 ("formulas", "validate", "--file", missing),
                 ("promotions", "--ca-file", missing, "list"),
                 ("promotions", "list", "--page-size", "-1"),
                 ("promotions", "list", "--page-size", "1001"),
                 ("promotions", "list", "--no-such-flag"),
                 ("promotions", "--timeout", "abc", "list")):
        stderr = await _usage_error(cli, *args)
        assert "Error" in stderr, (args, stderr)


async def test_cert_without_key_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert await _one_line_error(cli, "promotions", "--cert-file", str(cert), "list") == (
        "error: give both --cert-file and --key-file, or neither")


async def test_unreachable_or_malformed_address_is_one_line(tmp_path: Path) -> None:
    cli = Cli(NOWHERE, tmp_path)
    line = await _one_line_error(cli, "reward-types", "list", env={"PROMO_TIMEOUT": "3"})
    assert line.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: ")), line
    line = await _one_line_error(cli, "reward-types", "--address", "::::", "list",
                                 env={"PROMO_TIMEOUT": "3"})
    assert line.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: ")), line


# --- against the server ---------------------------------------------------------------------------

async def test_code_upload_again_without_request_id_changes_nothing(api: Api,
                                                                   tmp_path: Path) -> None:
    """README: "uploads from a file derive [the request id] from the file and the options", so
    the same `promo codes upload` again is a retry, not a second upload refused for duplicates."""
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "percent_off", "--display-name", "Percent off")
    await cli.ok("promotions", "create", "--code", "FLASH", "--external-reward", "percent_off",
                 "--personalized", "--activate")
    file = tmp_path / "codes.csv"
    file.write_text("".join(f"FLASH-{i}\n" for i in range(3)))
    first = await cli.ok("codes", "upload", "FLASH", str(file))
    assert "uploaded 3 codes to FLASH" in first
    again = await _invoke(cli, "codes", "upload", "FLASH", str(file))
    assert again.exit_code == 0, again.output
    assert again.stdout == first
    assert (await cli.json("codes", "inventory", "FLASH"))["inventory"]["total"] == "3"


async def test_code_upload_with_the_same_request_id_twice_is_one_upload(api: Api,
                                                                        tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "percent_off", "--display-name", "Percent off")
    await cli.ok("promotions", "create", "--code", "FLASH", "--external-reward", "percent_off",
                 "--personalized", "--activate")
    file = tmp_path / "codes.csv"
    file.write_text("".join(f"FLASH-{i}\n" for i in range(3)))
    first = await cli.json("codes", "upload", "FLASH", str(file), "--request-id", "up-1")
    again = await cli.json("codes", "upload", "FLASH", str(file), "--request-id", "up-1")
    assert again == first
    assert (await cli.json("codes", "inventory", "FLASH"))["inventory"]["total"] == "3"


async def test_retries_with_the_same_request_id_do_the_work_once(api: Api,
                                                                 tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "cashback", "--display-name", "Cashback")
    args = ("promotions", "create", "--code", "ONCE", "--reward", "cashback=5", "--activate",
            "--request-id", "create-once")
    first = await cli.json(*args)
    assert await cli.json(*args) == first
    upsert = ("customers", "upsert", "c1", "--currency", "EUR", "--request-id", "up-c1")
    assert (await cli.ok(*upsert)).strip() == "created 1, updated 0"
    assert (await cli.ok(*upsert)).strip() == "created 1, updated 0"
    grant = ("promotions", "get-reward", "ONCE", "c1", "--request-id", "gr-1")
    one = await cli.json(*grant)
    two = await cli.json(*grant)
    assert one["grant"]["grant_id"] == two["grant"]["grant_id"]
    revoke = ("promotions", "revoke", one["grant"]["grant_id"], "--request-id", "rv-1")
    assert (await cli.ok(*revoke)).strip() == f"grant {one['grant']['grant_id']} revoked"
    assert (await cli.ok(*revoke)).strip() == f"grant {one['grant']['grant_id']} revoked"
    listener = ("listeners", "register", "--event-type", "scheduled_campaign", "--url",
                "https://hooks.example.com/a", "--request-id", "ls-1")
    await cli.ok(*listener)
    await cli.ok(*listener)
    assert len((await cli.json("listeners", "list"))["listeners"]) == 1


async def test_a_page_of_a_longer_list_says_how_to_get_more(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    for name in ("alpha", "beta", "gamma"):
        await cli.ok("reward-types", "create", name, "--display-name", name.title())
        await cli.ok("customers", "upsert", f"cust-{name}")
    for group, key, names in (("reward-types", "reward_types", ["alpha", "beta", "gamma"]),
                              ("customers", "customers",
                               ["cust-alpha", "cust-beta", "cust-gamma"])):
        page = await cli.json(group, "list", "--page-size", "2")
        assert page["next_page_token"], page
        table = await cli.ok(group, "list", "--page-size", "2")
        assert f"more: --page-token {page['next_page_token']}" in table
        every = await cli.json(group, "list", "--page-size", "1", "--all")
        field = "name" if key == "reward_types" else "customer_id"
        assert [r[field] for r in every[key]] == names
        assert every["next_page_token"] == ""
        table = await cli.ok(group, "list", "--page-size", "1", "--all")
        assert all(n in table for n in names) and "more:" not in table


async def test_json_and_table_show_the_same_reward_types(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "free_spins", "--display-name", "Free spins",
                 "--category", "units", "--min", "1", "--max", "100")
    listed = await cli.json("reward-types", "list")
    table = await cli.ok("reward-types", "list")
    for item in listed["reward_types"]:
        for value in (item["name"], item["display_name"], item["min_value"], item["max_value"]):
            assert value in table, (value, table)
    got = await cli.json("reward-types", "get", "free_spins")
    assert got == listed["reward_types"][0]


async def test_wrong_api_key_is_one_line(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    line = await _one_line_error(cli, "customers", "list", env={"PROMO_API_KEY": "y" * 24})
    assert line == "error: UNAUTHENTICATED: unknown API key (INVALID_API_KEY)"
