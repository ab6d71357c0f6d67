"""Audit of README.md against the real behaviour: what the other doc audits do not check already.

Each test quotes the README line it checks. The commands the README shows run as written where
they can here: grpcurl's session (the real grpcurl binary against an in-process server, the
README's block fed to bash with only the address changed), the operator CLI (the typer app in a
thread, as tests/e2e/test_cli.py does), the settings checks of `serve`/`worker`/`up`/`migrate`/
`secrets reseal` (the real `promo` in a subprocess), the development commands CI runs
(`scripts/gen-protos --check`, buf lint, ruff, mypy). `promo up`'s start-up message is read from
the real command with the embedded services and the server replaced by stand-ins (nothing long-
running is started). Claims already asserted elsewhere are listed in the final report, not
repeated here (test_operations_doc_audit.py: settings defaults and the CLI session;
test_security_audit.py: keys and roles; test_pagination_matrix.py: page tokens; ...).
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import asyncpg
import click
import grpc
import pytest
import trustme
import typer.main
from google.protobuf import field_mask_pb2
from typer.testing import CliRunner

import cli.embedded
import cli.runtime
from cli.client import DEFAULT_ADDRESS, Connection
from cli.main import app
from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from server.app import Dependencies, start_server
from tests.conftest import ADMIN_KEY, Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.promo_helpers import cap, get_promotion, get_reward, promotion, revoke, reward_type
from tests.e2e.promo_process import clean_env, run_promo
from tests.e2e.test_bonuses_api import run_due_batches
from tests.e2e.test_cli import Cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def _section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of its level or above."""
    level = title.split(" ")[0]
    start = README.index(f"\n{title}\n")
    rest = README[start + len(title) + 2:]
    fences = [m.span() for m in re.finditer(r"^```.*?^```", rest, re.M | re.S)]
    ends = [m.start() for m in re.finditer(r"^(#+) ", rest, re.M)
            if len(m.group(1)) <= len(level)
            and not any(a <= m.start() < b for a, b in fences)]  # not a shell comment
    return rest[:ends[0]] if ends else rest


def _code_block_after(marker: str) -> str:
    """The first fenced block of the README after ``marker``."""
    tail = README[README.index(marker):]
    match = re.search(r"```[a-z]*\n(.*?)```", tail, re.S)
    assert match is not None, marker
    return match.group(1)


def _one_spaced(text: str) -> str:
    return " ".join(text.split())


# --- Intro and "Quick start" -------------------------------------------------------------------


def test_the_files_and_commands_the_quick_start_names_exist() -> None:
    """README: "You need Python 3.11 or newer"; "Design notes: `../shared/DESIGN.md` ...; the
    vendor documents the behaviour follows are in `../shared/seeds/`" (seeds 000 to 004 are
    cited); `./run up`, `./run test` (arguments go to pytest), `./run install`."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    cited = set(re.findall(r"\bseeds? (\d{3})", README))
    cited |= {n for m in re.findall(r"seeds (\d{3}) and (\d{3})", README) for n in m}
    assert cited == {"000", "001", "002", "003", "004"}
    shared = ROOT / "../shared"
    if shared.is_dir():  # beside the checkout here; a clone elsewhere (CI) has no ../shared
        assert (shared / "DESIGN.md").is_file()
        assert cited <= {p.name[:3] for p in (shared / "seeds").glob("*.txt")}
    run = (ROOT / "run").read_text()
    assert os.access(ROOT / "run", os.X_OK)
    for command in ("up)", "test)", "install)"):
        assert f"\n  {command}\n" in run, command
    assert 'exec .venv/bin/promo up "$@"' in run
    assert 'exec .venv/bin/python -m pytest "$@"' in run  # `./run test -k reward -x`, `-n 2`
    ci = (ROOT / ".ci/run").read_text()
    assert "./run test -q -n 2" in ci  # "CI runs it so"


class _FakeEmbedded:
    """Stands in for cli.embedded's servers: hands out the README's example URLs."""

    url = ""
    started: ClassVar[list[str]] = []

    def __init__(self, data_dir: Path, **_: Any) -> None:
        self.data_dir = data_dir

    def start(self) -> str:
        _FakeEmbedded.started.append(type(self).__name__)
        return self.url

    def stop(self) -> None:
        pass


class _FakePostgres(_FakeEmbedded):
    url = "postgresql://postgres@127.0.0.1:41235/postgres"


class _FakeRedis(_FakeEmbedded):
    url = "redis://127.0.0.1:40111/0"


def _promo_up_output(monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                     **env: str) -> tuple[int, list[str], str]:
    """What the real `promo up` prints once it is up, the embedded services and the server
    replaced by stand-ins (nothing is started). The key and the data folder as in the README."""

    async def fake_run_server(settings: Settings, *, on_ready: Any = None,
                              with_worker: bool = False) -> None:
        assert with_worker  # "start server + worker"
        on_ready(SimpleNamespace(address=f"{settings.grpc_host}:{settings.grpc_port}"))

    monkeypatch.setattr(cli.embedded, "EmbeddedPostgres", _FakePostgres)
    monkeypatch.setattr(cli.embedded, "EmbeddedRedis", _FakeRedis)
    monkeypatch.setattr(cli.runtime, "run_server", fake_run_server)
    _FakeEmbedded.started = []
    # `promo up` configures logging for the process (server.logs.configure_logging): put the
    # root handlers (pytest's among them) and the levels it touches back afterwards.
    loggers = [logging.getLogger(name) for name in ("", "asyncio", "arq.worker", "arq.jobs",
                                                    "httpx")]
    handlers, levels = list(loggers[0].handlers), [logger.level for logger in loggers]
    try:
        result = CliRunner().invoke(app, ["up"], env={
            **{k: None for k in os.environ if k.startswith("PROMO_")},
            "PROMO_DATA_DIR": str(data_dir), "PROMO_LOG_LEVEL": "ERROR", **env})
    finally:
        loggers[0].handlers[:] = handlers
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    key_file = data_dir / "admin-api-key"
    key = key_file.read_text().strip() if key_file.exists() else "<no key>"
    text = (result.stdout + result.stderr).replace(key, "pk_3q...").replace(
        str(data_dir.resolve()), "/home/you/promo/.promo-data")
    return result.exit_code, [_one_spaced(line) for line in text.splitlines()], key


def test_promo_up_prints_what_the_readme_shows(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """README "Quick start": "`./run up` prints something like" the lines shown (the data
    folder's absolute path written as /home/you/promo/.promo-data), the key files mode 0600."""
    shown = [_one_spaced(line) for line in
             _code_block_after("`./run up` prints something like").splitlines()]
    code, lines, key = _promo_up_output(monkeypatch, tmp_path / ".promo-data")
    assert code == 0
    assert key.startswith("pk_") and len(key) > 16
    assert (tmp_path / ".promo-data" / "admin-api-key").stat().st_mode & 0o777 == 0o600
    assert lines == shown


def test_promo_up_with_both_urls_starts_nothing_embedded(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """README: "`promo up` with both URLs set uses them and starts nothing embedded"."""
    code, lines, _ = _promo_up_output(
        monkeypatch, tmp_path / ".promo-data",
        PROMO_DATABASE_URL="postgresql://promo@db.internal:5432/promo",
        PROMO_REDIS_URL="redis://redis.internal:6379/0")
    assert code == 0
    assert _FakeEmbedded.started == []
    assert not [line for line in lines if "embedded" in line]
    assert lines[0] == "promo is up: gRPC on 127.0.0.1:50051 (plaintext)"


def test_a_secret_key_file_without_a_valid_key_stops_promo_up_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: PROMO_DATA_DIR holds "(with the embedded PostgreSQL) the listener-secret key ...;
    a key file that holds no valid key stops `promo up` with one line naming it" (the admin
    key's file: test_security_formulas_regressions.py)."""
    data_dir = tmp_path / ".promo-data"
    data_dir.mkdir()
    (data_dir / "secret-key").write_text("not a key\n")
    code, lines, _ = _promo_up_output(monkeypatch, data_dir)
    assert (code, lines) == (2, [
        "error: /home/you/promo/.promo-data/secret-key holds no valid key: key 1 of 1 is not "
        "base64 (standard "
        "or URL-safe)"])
    assert (data_dir / "secret-key").read_text() == "not a key\n"  # left for the operator


# --- "Against your own PostgreSQL and Redis" ----------------------------------------------------


def test_the_api_keys_example_is_a_valid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `export PROMO_API_KEYS='[{"name": "crm-admin", "key_sha256": "<sha256 hex of the
    key>", "roles": ["admin"]}, {"name": "promo-system", "key": "<a long random key>", "roles":
    ["runtime"]}]'`, with the placeholders filled in."""
    block = _code_block_after("### Against your own PostgreSQL and Redis")
    value = re.search(r"PROMO_API_KEYS='(.*?)'", block, re.S)
    assert value is not None
    admin_key, runtime_key = "crm-admin-key-0123456789abcdef", "promo-system-key-0123456789"
    text = (value.group(1).replace("<sha256 hex of the key>",
                                   hashlib.sha256(admin_key.encode()).hexdigest())
            .replace("<a long random key>", runtime_key))
    for name in list(os.environ):
        if name.startswith("PROMO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROMO_API_KEYS", text)
    settings = Settings()
    assert [(k.name, k.roles, k.key, k.key_sha256) for k in settings.api_keys] == [
        ("crm-admin", ["admin"], None, hashlib.sha256(admin_key.encode()).hexdigest()),
        ("promo-system", ["runtime"], None, hashlib.sha256(runtime_key.encode()).hexdigest())]
    for command in ("migrate", "serve", "worker"):
        assert f".venv/bin/promo {command}" in block
        assert command in _paths()


# --- "Calling it" ------------------------------------------------------------------------------


async def test_the_grpcurl_session_runs_as_written(api: Api, tmp_path: Path) -> None:
    """README "Calling it": the grpcurl block (list, Health/Check, KEY from
    .promo-data/admin-api-key, CreateRewardType with the JSON shown, ListRewardTypes with
    page_size 10), run by bash with the real grpcurl; only the address is the test server's."""
    block = _code_block_after("With [grpcurl]")
    script = "set -euo pipefail\n" + block.replace("127.0.0.1:50051", api.address)
    (tmp_path / ".promo-data").mkdir()
    (tmp_path / ".promo-data" / "admin-api-key").write_text(ADMIN_KEY + "\n")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "promo.v1.RewardTypeService" in text and "grpc.health.v1.Health" in text
    assert '"status": "SERVING"' in text
    documents = [json.loads(d) for d in re.findall(r"^\{\n.*?^\}\n", text, re.S | re.M)]
    created = next(d for d in documents if "reward_type" in d)["reward_type"]
    assert (created["name"], created["display_name"], created["category"], created["min_value"],
            created["max_value"]) == ("free_spins", "Free spins", "REWARD_CATEGORY_UNITS",
                                      "1.000000", "100.000000")
    listed = next(d for d in documents if "reward_types" in d)
    assert [r["name"] for r in listed["reward_types"]] == ["free_spins"]


async def test_every_paged_rpc_takes_page_size_as_the_conventions_say(
        api: Api, clock: FixedClock) -> None:
    """README "Conventions of the API": "Lists take `page_size` (0 means 50, at most 1000;
    `GetProcessedCampaignCustomers` ... 0 means 1,000, at most 10,000)"."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "big", clock.now() + timedelta(hours=2),
                          customers=[f"c{i:04d}" for i in range(1200)])
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    default = await stub.GetProcessedCampaignCustomers(
        cpb.GetProcessedCampaignCustomersRequest(campaign_id="big", page_size=0),
        metadata=api.key("listener"))
    large = await stub.GetProcessedCampaignCustomers(
        cpb.GetProcessedCampaignCustomersRequest(campaign_id="big", page_size=5000),
        metadata=api.key("listener"))
    assert (len(default.customers), len(large.customers)) == (1000, 1200)


def _source_text(*folders: str, suffixes: tuple[str, ...] = (".py", ".proto", ".sql")) -> str:
    return "\n".join(path.read_text() for folder in folders for path in (ROOT / folder).rglob("*")
                     if path.suffix in suffixes and "_pb2" not in path.name)


def test_every_reason_and_enum_value_the_readme_names_exists() -> None:
    """README: the error reasons (`REWARD_TYPE_NOT_FOUND`, `INVALID_DECIMAL`, `MISSING_API_KEY`,
    `REQUEST_ID_REUSED`, `INVALID_PAGE_TOKEN`, `INVALID_TEXT`, `PROMOTION_NOT_FOUND`), the
    denials and skips (`NOT_ELIGIBLE`, `OUT_OF_CODES`, `NO_MATCHING_TRANSACTIONS`), the events
    (`BONUS_ISSUED`) and the enum value of the grpcurl example (`REWARD_CATEGORY_UNITS`) are
    names the service really uses; the CLI's `PROMO_*` variables are the ones it reads."""
    code = _source_text("core", "server", "storage", "workers", "protos")
    reasons = ("REWARD_TYPE_NOT_FOUND", "INVALID_DECIMAL", "MISSING_API_KEY",
               "REQUEST_ID_REUSED", "INVALID_PAGE_TOKEN", "INVALID_TEXT", "PROMOTION_NOT_FOUND")
    for name in reasons:
        assert name in README and f'"{name}"' in code, name
    for name in ("DENIAL_REASON_NOT_ELIGIBLE", "DENIAL_REASON_OUT_OF_CODES",
                 "EVENT_TYPE_BONUS_ISSUED", "REWARD_CATEGORY_UNITS"):
        assert re.search(rf"\b{name} = \d+;", code), name
    assert '"NO_MATCHING_TRANSACTIONS"' in code
    cli_code = _source_text("cli", "config")
    cli_variables = set(re.findall(r"`(PROMO_[A-Z_]+)[`=]", _section("## CLI")))
    settings = {f"PROMO_{name.upper()}" for name in Settings.model_fields}
    assert cli_variables - settings == {"PROMO_ADDRESS", "PROMO_API_KEY", "PROMO_CA_FILE",
                                        "PROMO_TLS", "PROMO_CLIENT_CERT_FILE",
                                        "PROMO_CLIENT_KEY_FILE", "PROMO_TIMEOUT"}
    for name in cli_variables - settings:
        assert f'"{name}"' in cli_code, name
    assert '"PROMO_CONFIG_FILE"' in cli_code


# --- "CLI" --------------------------------------------------------------------------------------


def _walk(command: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
    if hasattr(command, "list_commands"):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), [*path, name])
    else:
        yield " ".join(path), command


def _paths() -> dict[str, Any]:
    return dict(_walk(typer.main.get_command(app), []))


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def _cli_table() -> dict[str, set[str]]:
    """README "CLI" table: every command it names (``group command``) with the flags it names."""
    table: dict[str, set[str]] = {}
    for group, cell in re.findall(r"^\| `promo ([a-z-]+)` \| (.*) \|$", README, re.M):
        current: list[str] = []
        for token in re.findall(r"`([^`]+)`", cell):
            words = token.split()
            if words[0].startswith("--"):
                assert current, token
                # `discounts create/update/get/list/delete` (`--file` proto JSON): a flag
                # after a/b/c belongs to some of them; it is kept under the group's first.
                table[current[0]].add(words[0])
                continue
            if not re.fullmatch(r"[a-z][a-z-]*(/[a-z-]+)*", words[0]):
                continue  # an example value (`events[10000]`, `customer_id,product,...`)
            rest = words[1:]
            if "/" in (rest[0] if rest else "") and re.fullmatch(r"[a-z/-]+", rest[0]):
                names = [f"{words[0]} {sub}" for sub in rest[0].split("/")]
                rest = rest[1:]
            else:
                names = [words[0]]
            current = [f"{group} {name}" for name in names]
            for name in current:
                table[name] = {w for w in rest if w.startswith("--")}
    return table


def test_every_command_and_flag_in_the_cli_table_exists() -> None:
    """README "CLI": the table of groups and commands, with the flags it names (`--file`,
    `--customer`, `--status`, `--kind`, `--line`, `--definition`, ...)."""
    paths = _paths()
    table = _cli_table()
    assert len(table) > 60
    assert [name for name in table if name not in paths] == []
    assert {name: sorted(flags - _options(paths[name])) for name, flags in table.items()
            if flags - _options(paths[name])} == {}


def test_the_cli_table_lists_every_command_that_operates_the_service() -> None:
    """README "CLI": "The `promo` command also operates a running service over gRPC" and the
    table of its groups and commands; every client command should be findable there."""
    table = _cli_table()
    not_client = ("serve", "worker", "migrate", "up", "demo", "secrets reseal")
    missing = sorted(name for name in _paths() if name not in not_client and name not in table)
    assert missing == []


async def test_the_readme_cli_examples_run(api: Api, tmp_path: Path) -> None:
    """README "CLI": `promo bonuses queue --status calculated` and `promo products basket
    evaluate c1 --line bread:1:2.50 --line espresso:2:7.99` as written (no promotion: nothing
    to discount)."""
    cli = Cli(api, tmp_path)
    await cli.ok("customers", "upsert", "c1", "--currency", "EUR")  # a basket is a customer's
    block = _code_block_after("| `promo products` |")
    commands = [line.split("#")[0].split()[1:] for line in block.splitlines()]
    queue = next(c for c in commands if c[:2] == ["bonuses", "queue"])
    basket = next(c for c in commands if c[:3] == ["products", "basket", "evaluate"])
    assert queue == ["bonuses", "queue", "--status", "calculated"]
    assert (await cli.json(*queue))["results"] == []
    said = await cli.ok(*basket)
    assert "basket 18.48 (2 line(s)), discounts 0.00, to pay 18.48" in _one_spaced(said)
    # The table's `promo jobs list` (`--status dead`, `--kind`).
    assert (await cli.json("jobs", "list", "--status", "dead", "--kind", "webhook.deliver"))[
        "jobs"] == []


async def test_connection_options_belong_to_the_group_and_come_from_the_environment(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README "CLI": "Next to a running `./run up` it needs no options: it calls
    `127.0.0.1:50051` with the admin key that `promo up` keeps in `.promo-data/admin-api-key`";
    "The connection options belong to the group (`promo promotions --address host:50051
    list`) or come from the environment: ... `PROMO_TLS=1` for the system's CAs ...
    `PROMO_TIMEOUT` (seconds per call, default 30)"."""
    assert DEFAULT_ADDRESS == "127.0.0.1:50051"
    assert Connection().timeout == 30
    cli = Cli(api, tmp_path)
    # The group's --address wins over PROMO_ADDRESS (here a port nobody listens on).
    result = await cli.run("promotions", "--address", api.address, "list", "--json",
                           env={"PROMO_ADDRESS": "127.0.0.1:1"})
    assert result.exit_code == 0, result.output
    # No key given: the one in .promo-data/admin-api-key of the working folder.
    (tmp_path / ".promo-data").mkdir()
    (tmp_path / ".promo-data" / "admin-api-key").write_text(ADMIN_KEY + "\n")
    monkeypatch.chdir(tmp_path)
    result = await cli.run("reward-types", "list", "--json",
                           env={"PROMO_API_KEY": None, "PROMO_DATA_DIR": None})
    assert result.exit_code == 0, result.output
    # PROMO_TLS=1: TLS, which this plaintext server does not speak: one line, status 1.
    line = await cli.error("reward-types", "list", env={"PROMO_TLS": "1", "PROMO_TIMEOUT": "5"})
    assert line.startswith("error: UNAVAILABLE: "), line
    helped = await cli.run("reward-types", "--help")
    assert "PROMO_TIMEOUT" in helped.stdout and "30" in helped.stdout


async def test_mutual_tls_from_the_environment(settings: Settings, pool: asyncpg.Pool,
                                              tmp_path: Path) -> None:
    """README "CLI": connection options from the environment: "`PROMO_CA_FILE` (TLS with that
    CA ...), `PROMO_CLIENT_CERT_FILE`/`PROMO_CLIENT_KEY_FILE` (mutual TLS)", against a server
    with PROMO_TLS_CERT_FILE, PROMO_TLS_KEY_FILE and PROMO_TLS_CLIENT_CA_FILE ("clients must
    present a certificate it signed")."""
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("localhost"), ca.issue_cert("promo-operator")
    files = {name: tmp_path / f"{name}.pem" for name in ("chain", "key", "ca", "cchain", "ckey")}
    files["chain"].write_bytes(b"".join(b.bytes() for b in server_cert.cert_chain_pems))
    files["key"].write_bytes(server_cert.private_key_pem.bytes())
    files["ca"].write_bytes(ca.cert_pem.bytes())
    files["cchain"].write_bytes(b"".join(b.bytes() for b in client_cert.cert_chain_pems))
    files["ckey"].write_bytes(client_cert.private_key_pem.bytes())
    mtls = settings.model_copy(update={"tls_cert_file": files["chain"],
                                       "tls_key_file": files["key"],
                                       "tls_client_ca_file": files["ca"]})
    running = await start_server(mtls, Dependencies(pool=pool))
    try:
        cli = Cli(f"localhost:{running.port}", tmp_path)
        env: dict[str, str | None] = {
            "PROMO_CA_FILE": str(files["ca"]), "PROMO_CLIENT_CERT_FILE": str(files["cchain"]),
            "PROMO_CLIENT_KEY_FILE": str(files["ckey"]), "PROMO_TIMEOUT": "5"}
        listed = await cli.run("reward-types", "list", "--json", env=env)
        assert listed.exit_code == 0, listed.output
        assert json.loads(listed.stdout) == {"reward_types": [], "next_page_token": ""}
        line = await cli.error("reward-types", "list", env={
            **env, "PROMO_CLIENT_CERT_FILE": None, "PROMO_CLIENT_KEY_FILE": None})
        assert line.startswith("error: UNAVAILABLE: "), line
    finally:
        await running.stop(0)


async def test_an_upsert_from_a_file_is_retried_with_its_request_id(api: Api,
                                                                    tmp_path: Path) -> None:
    """README "CLI": `customers upsert --file` does not derive its request id from the file
    ("give `--request-id` to retry one"): with the same --request-id the second run is a retry
    (the first answer back); without it, a new request (the rows are simply upserted again)."""
    cli = Cli(api, tmp_path)
    path = tmp_path / "customers.json"
    path.write_text(json.dumps([{"customer_id": "c1", "currency": "EUR"},
                                {"customer_id": "c2", "currency": "EUR"}]))
    first = await cli.json("customers", "upsert", "--file", str(path), "--request-id", "up-1")
    again = await cli.json("customers", "upsert", "--file", str(path), "--request-id", "up-1")
    assert (first["created_count"], first["updated_count"]) == (2, 0)
    assert again == first
    later = await cli.json("customers", "upsert", "--file", str(path))
    assert (later["created_count"], later["updated_count"]) == (0, 2)


async def test_a_bonus_request_from_a_customers_file_is_retried_with_its_request_id(
        api: Api, tmp_path: Path, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock) -> None:
    """The same README sentence for `promo bonuses request DEFINITION --customers-file FILE`:
    run again with the same --request-id (say, after a lost answer) it is a retry, not a second
    calculation of every customer in the file; without one, running it again later is a new
    request (e.g. next week's), by design."""
    cli = Cli(api, tmp_path)
    await cli.ok("bonuses", "create", "cashback-10", "--formula", "sum(deposit.amount) * 10%",
                 "--approval", "automatic", "--days", "1")
    events = tmp_path / "events.csv"
    events.write_text("external_id,customer_id,kind,amount,currency,occurred_at\n"
                      "e1,m1,deposit,250,EUR,2026-11-22T08:00:00Z\n"
                      "e2,m2,deposit,80,EUR,2026-11-22T07:00:00Z\n")
    await cli.ok("customers", "record-events", str(events), "--create-missing")
    ids = tmp_path / "customers.csv"
    ids.write_text("customer_id\nm1\nm2\n")
    first = await cli.json("bonuses", "request", "cashback-10", "--customers-file", str(ids),
                           "--request-id", "weekly-1")
    again = await cli.json("bonuses", "request", "cashback-10", "--customers-file", str(ids),
                           "--request-id", "weekly-1")
    assert first["accepted_count"] == 2 and again == first
    clock.advance(timedelta(seconds=settings.bonus_batch_window_seconds))
    assert await run_due_batches(pool, settings, clock) == 1
    issued = {c: [e["amount"] for e in (await cli.json("bonuses", "ledger", c))["entries"]]
              for c in ("m1", "m2")}
    assert issued == {"m1": ["25"], "m2": ["8"]}


# --- "Settings" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["up"], ["migrate"],
                                     ["secrets", "reseal"]])
async def test_each_command_that_reads_the_settings_refuses_a_bad_one_in_one_line(
        command: list[str], tmp_path: Path) -> None:
    """README "Settings": "`serve`, `worker`, `up`, `migrate` and `secrets reseal` check them
    at start: each bad setting is one line (`invalid settings: PROMO_GRPC_PORT: Input should be
    ...`) and the command exits with status 2"."""
    code, output = await run_promo(*command, env=clean_env(
        PROMO_GRPC_PORT="fifty", PROMO_DATA_DIR=str(tmp_path / "data")))
    assert (code, output.splitlines()) == (2, [
        "invalid settings: PROMO_GRPC_PORT: Input should be a valid integer, unable to parse "
        "string as an integer"])
    assert not (tmp_path / "data").exists()  # nothing started, nothing created


async def test_worker_without_a_redis_url_is_one_line_with_status_2() -> None:
    """README "Settings": "so is a setting a command needs that is not set (... `worker`
    without it or `PROMO_REDIS_URL`)"."""
    code, output = await run_promo("worker", env=clean_env(
        PROMO_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none"))
    assert code == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("invalid settings: PROMO_REDIS_URL: is not set"), output


def test_the_settings_table_names_every_setting_and_only_those() -> None:
    """README "Settings": the table of `PROMO_*` variables against config/settings.py (the
    defaults are checked by test_operations_doc_audit.py)."""
    table = set(re.findall(r"^\| `PROMO_([A-Z0-9_]+)` \|", _section("## Settings"), re.M))
    assert table == {name.upper() for name in Settings.model_fields}


def test_the_smtp_timeout_uses_at_most_half_the_job_lease() -> None:
    """README: PROMO_SMTP_TIMEOUT_SECONDS "At most half of `PROMO_JOB_LEASE_SECONDS` is used"
    (the webhook timeout's half is checked by test_webhooks_doc_audit.py)."""
    from workers.webhooks import smtp_timeout  # what each e-mail send is limited to

    settings = Settings(smtp_timeout_seconds=200, job_lease_seconds=300)
    assert smtp_timeout(settings) == 150
    assert smtp_timeout(Settings(smtp_timeout_seconds=30)) == 30


# --- "Status" -----------------------------------------------------------------------------------


async def test_approvals_take_10000_customers_per_call(api: Api, clock: FixedClock) -> None:
    """README "Status": "approvals (10,000 per call)"."""
    await reward_type(api)
    await promotion(api)
    customers = [f"c{i:05d}" for i in range(10_001)]
    await create_campaign(api, "many", clock.now() + timedelta(hours=2), customers=customers)
    applied = await set_statuses(api, "many", dict.fromkeys(customers[:10_000], True), "all")
    assert applied.updated == 10_000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await set_statuses(api, "many", dict.fromkeys(customers, True), "too-many")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(refused.value) == "TOO_MANY_ENTRIES"


async def _caps(api: Api, code: str = "VIP25") -> dict[str, str]:
    """The promotion's live cap state: {"cashback": used, "#customers": used}."""
    got = await get_promotion(api, code)
    return {u.scope: u.used for u in got.cap_usage}


async def _edit_caps(api: Api, request_id: str, *, on: bool) -> None:
    """Caps on (daily 100 cashback, 10 customers) or off; an active promotion is edited
    deactivated, then activated again."""
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id=f"{request_id}-d", promotion_code="VIP25"), metadata=api.key())
    await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id=request_id, promotion=ppb.Promotion(
            promotion_code="VIP25", customer_cap=10 if on else 0,
            budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "100")] if on else []),
        update_mask=field_mask_pb2.FieldMask(paths=["customer_cap", "budget_caps"])),
        metadata=api.key())
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id=f"{request_id}-a", promotion_code="VIP25"), metadata=api.key())


async def test_caps_after_an_edit_count_what_is_really_out(api: Api) -> None:
    """README "Status", *Caps after an edit*: "`UpdatePromotion` recounts every cap's current
    window from the live (not revoked) grants, so a cap added, removed and set again ...
    counts what is really out: the customer cap counts the customers holding a live grant; a
    budget cap's current window ... holds the values of its reward type in the live grants made
    inside that window, including those made while the cap was off. ... a revoke gives back
    what its grant was charged (a grant made while a cap was off gives that cap nothing back
    until the next edit recounts), and frees a customer slot only while a customer cap is
    set"."""
    await reward_type(api)
    await promotion(api, customer_cap=10, caps=[cap(ppb.CAP_PERIOD_DAILY, "100")])
    c1 = await get_reward(api, "c1")
    assert await _caps(api) == {"cashback": "15", "#customers": "1"}
    await _edit_caps(api, "off-1", on=False)
    c2 = await get_reward(api, "c2")  # made while the caps were off
    await _edit_caps(api, "on-1", on=True)
    assert await _caps(api) == {"cashback": "30", "#customers": "2"}  # c1 and c2
    await revoke(api, c1.grant.grant_id)  # charged 15 and a slot: both come back
    assert await _caps(api) == {"cashback": "15", "#customers": "1"}
    await revoke(api, c2.grant.grant_id)  # made while off: the budget cap gets nothing back,
    assert await _caps(api) == {"cashback": "15", "#customers": "0"}  # the slot is freed
    await _edit_caps(api, "off-2", on=False)
    await _edit_caps(api, "on-2", on=True)  # the next edit recounts: nothing is out
    assert await _caps(api) == {"cashback": "0", "#customers": "0"}


# --- "Layout", "Development" and "Why each library" ---------------------------------------------


def _imports(package: str) -> dict[str, set[str]]:
    """Our top-level packages each module of ``package`` imports (at any depth)."""
    ours = {"core", "storage", "server", "workers", "cli", "config"}
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ours and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_layout_and_the_direction_of_imports() -> None:
    """README "Layout": the folders, and "Imports point down: `cli` → `server`, `workers` →
    `storage` → `core`. `server` and `workers` never import each other"."""
    block = _code_block_after("## Layout")
    for line in block.splitlines():
        folder = line.split()[0]
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "docs/benchmarks.md").is_file()
    assert set(_imports("core")) == set()
    assert set(_imports("storage")) <= {"core"}
    assert "workers" not in _imports("server") and "cli" not in _imports("server")
    assert "server" not in _imports("workers") and "cli" not in _imports("workers")


@pytest.mark.parametrize("command", [
    ["scripts/gen-protos", "--check"],
    ["node_modules/.bin/buf", "lint"],
    [str(VENV_BIN / "ruff"), "check", "--no-cache", "."],
    [str(VENV_BIN / "mypy"), "core"],
])
async def test_the_development_checks_pass(command: list[str]) -> None:
    """README "Layout"/"Development": the contract is "buf lint clean", `core/` is "mypy
    --strict clean" (pyproject: strict = true), `scripts/gen-protos --check` "fails if the
    checked-in stubs are stale", `.venv/bin/ruff check .`; CI runs each (.ci/run)."""
    ci = (ROOT / ".ci/run").read_text()
    assert command[0].rsplit("/", 1)[-1] in ci
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()


def test_why_each_library_names_every_dependency() -> None:
    """README "Why each library": a row per dependency of pyproject.toml (pydantic comes with
    pydantic-settings). The webhook POSTs go through `h11` (workers/webhooks.py Http11Client;
    `httpx` only behind a proxy or for a URL that is not plain ASCII http(s), though its row says
    "The async HTTP client for webhook delivery"), and e-mails go through `aiosmtplib`
    (workers/email.py)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*pyproject["project"]["dependencies"],
                    *pyproject["project"]["optional-dependencies"]["dev"]]
    names = {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    section = _section("## Why each library")
    documented = {n.lower() for n in re.findall(r"`([A-Za-z0-9_.-]+)`", section)}
    assert sorted(names - documented - {"pydantic"}) == []
