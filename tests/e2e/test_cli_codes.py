"""`promo codes` and the code columns of `promo promotions` against a real server: a personalized
promotion created from flags, a file uploaded with the progress bar, the lobby's inventory, a
rejected file reported as one line, GetReward handing out a pool code."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Api
from tests.e2e.test_cli import Cli


async def test_codes_upload_inventory_and_lobby(api: Api, tmp_path: Path) -> None:
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "percent_off", "--display-name", "Percent off")
    created = await cli.json("promotions", "create", "--code", "FLASH48", "--external-reward",
                             "percent_off", "--personalized", "--fallback-code", "LOYALTY10",
                             "--code-alert", "10%", "--code-alert", "2", "--activate")
    assert created["code_type"] == "CODE_TYPE_PERSONALIZED"
    assert created["code_alerts"] == [{"remaining_percent": "10"}, {"remaining_codes": 2}]

    file = tmp_path / "codes.csv"
    file.write_text("".join(f"FLASH-{i:03d}\n" for i in range(1, 6)))
    said = await cli.ok("codes", "upload", "FLASH48", str(file))
    assert "uploaded 5 codes to FLASH48" in said and "5 available, 0/5 used" in said

    granted = await cli.json("promotions", "get-reward", "FLASH48", "alice")
    assert granted["grant"]["promo_code"] == "FLASH-001"

    inventory = await cli.json("codes", "inventory", "FLASH48")
    assert inventory["inventory"] == {"total": "5", "used": "1", "available": "4",
                                      "fallback_grants": "0"}
    assert [u["codes"] for u in inventory["uploads"]] == ["5"]

    lobby = await cli.ok("promotions", "list")
    assert "personalized 1/5" in lobby and "4 available" in lobby

    bad = tmp_path / "bad.csv"
    bad.write_text("NEW-1\nFLASH-002\nA,B\n")
    line = await cli.error("codes", "upload", "FLASH48", str(bad))
    assert line == ("error: INVALID_ARGUMENT: the code file was rejected, nothing was added: "
                    "1 problem line: line 3: has more than one column (a comma); the file must "
                    "have one column (CODE_FILE_REJECTED)")
    bad.write_text("NEW-1\nFLASH-002\n")
    line = await cli.error("codes", "upload", "FLASH48", str(bad))
    assert line == ("error: INVALID_ARGUMENT: the code file was rejected, nothing was added: "
                    "1 problem line: line 2: code 'FLASH-002' is already in the pool "
                    "(CODE_FILE_REJECTED)")
    assert (await cli.json("codes", "inventory", "FLASH48"))["inventory"]["total"] == "5"
