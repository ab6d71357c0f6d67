"""Audit of README.md ("Settings", "CLI") and docs/operations.md against the code.

Each test quotes the statement it checks. Settings are checked as units (the environment cleared
of PROMO_* first); commands run the real `promo` (a subprocess for serve/worker/migrate, the
typer app in a thread for the client commands against an in-process server, as test_cli.py
does); metrics are read from prometheus_client's registry of this process, which the in-process
server records into.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import click
import pytest
import trustme
import typer.main
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from cli.main import app
from cli.runtime import start_metrics
from cli.settings_loader import settings_problems
from config.settings import DEFAULT_UP_METRICS_PORT, ApiKeyConfig, Settings
from core.clock import FixedClock
from tests.conftest import ADMIN_KEY, Api, Services, with_database
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import get_reward, promotion, reward_type
from tests.e2e.promo_process import clean_env as _env
from tests.e2e.promo_process import run_promo as _promo
from workers import campaigns as _campaigns  # noqa: F401  registers the campaign jobs
from workers.outbox import run_outbox_job
from workers.retention import purge_retention


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROMO_"):
            monkeypatch.delenv(name)


def _problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    """The `invalid settings:` lines the CLI would print for these PROMO_* values."""
    for name, value in env.items():
        monkeypatch.setenv(f"PROMO_{name}", value)
    try:
        Settings()
    except Exception as exc:
        return settings_problems(exc)
    return []


# --- README "Settings": defaults and ranges ----------------------------------------------------

README_DEFAULTS: dict[str, Any] = {
    "database_url": None, "redis_url": None, "data_dir": Path(".promo-data"),
    "embedded_pg_user": None, "grpc_host": "127.0.0.1", "grpc_port": 50051,
    "tls_cert_file": None, "tls_key_file": None, "tls_client_ca_file": None, "api_keys": [],
    "shutdown_grace_seconds": 10, "db_pool_min_size": 2, "db_pool_max_size": 10,
    "grant_batch_max": 32, "grant_batches_in_flight": 2, "db_command_timeout_seconds": 30,
    "migrate_on_start": True, "queue_name": "promo:queue", "worker_max_jobs": 20,
    "job_max_tries": 8, "job_retry_base_seconds": 1, "job_retry_max_seconds": 300,
    "job_lease_seconds": 300, "bonus_batch_window_seconds": 300,
    "sweeper_interval_seconds": 30, "clearance_lead_seconds": 1800,
    "webhook_timeout_seconds": 10, "webhook_max_attempts": 30,
    "webhook_retry_max_seconds": 3600,
    "webhook_deadline_seconds": 86400, "webhook_secret_grace_seconds": 86400,
    "webhook_batch_size": 100, "webhook_concurrency": 32, "secret_encryption_keys": None,
    "smtp_host": None, "smtp_port": 587, "smtp_username": None, "smtp_password": None,
    "smtp_from": None, "smtp_starttls": True, "smtp_timeout_seconds": 30,
    "webhook_event_retention_days": 30, "webhook_delivery_retention_days": 30,
    "webhook_attempt_retention_days": 30, "outbox_job_retention_days": 7,
    "idempotency_key_retention_days": 30, "bonus_result_retention_days": 30,
    "log_level": "INFO", "log_format": "json", "metrics_host": "127.0.0.1",
    "metrics_port": None, "worker_metrics_port": None,
}


def test_every_default_is_the_one_in_the_settings_table(clean_env: None) -> None:
    """README "Settings" table and docs/operations.md "Settings that matter at scale"."""
    settings = Settings()
    assert {name: getattr(settings, name) for name in README_DEFAULTS} == README_DEFAULTS
    assert DEFAULT_UP_METRICS_PORT == 9464  # "`promo up` uses 9464 when unset"


def test_grant_batch_max_is_1_to_60(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: PROMO_GRANT_BATCH_MAX "(1-60; 1 turns batching off)"."""
    assert _problems(monkeypatch, GRANT_BATCH_MAX="1") == []
    assert _problems(monkeypatch, GRANT_BATCH_MAX="60") == []
    assert _problems(monkeypatch, GRANT_BATCH_MAX="61") == [
        "PROMO_GRANT_BATCH_MAX: Input should be less than or equal to 60"]
    assert _problems(monkeypatch, GRANT_BATCH_MAX="0") == [
        "PROMO_GRANT_BATCH_MAX: Input should be greater than or equal to 1"]


@pytest.mark.parametrize("name", ["WEBHOOK_EVENT_RETENTION_DAYS",
                                  "WEBHOOK_DELIVERY_RETENTION_DAYS",
                                  "WEBHOOK_ATTEMPT_RETENTION_DAYS", "OUTBOX_JOB_RETENTION_DAYS",
                                  "IDEMPOTENCY_KEY_RETENTION_DAYS",
                                  "BONUS_RESULT_RETENTION_DAYS"])
def test_retention_settings_take_zero_and_refuse_negative_days(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """README: "`0` keeps them"; operations.md: "Set a setting to `0` to keep that table's
    rows forever"."""
    assert _problems(monkeypatch, **{name: "0"}) == []
    assert _problems(monkeypatch, **{name: "-1"}) == [
        f"PROMO_{name}: Input should be greater than or equal to 0"]


def test_log_level_and_format_take_the_documented_values(
        clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: PROMO_LOG_LEVEL `DEBUG`, `INFO`, `WARNING`, `ERROR`; PROMO_LOG_FORMAT `json` or
    `text`."""
    for level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        assert _problems(monkeypatch, LOG_LEVEL=level) == []
    for fmt in ("json", "text"):
        assert _problems(monkeypatch, LOG_FORMAT=fmt) == []
    assert _problems(monkeypatch, LOG_FORMAT="xml") == [
        "PROMO_LOG_FORMAT: Input should be 'json' or 'text'"]


def test_a_toml_file_uses_lower_case_names_and_the_environment_wins(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: "a TOML file named by PROMO_CONFIG_FILE, with the same names in lower case
    without the prefix; the environment wins"."""
    path = tmp_path / "promo.toml"
    path.write_text('grant_batch_max = 8\nworker_metrics_port = 9500\nlog_format = "text"\n'
                    '[[api_keys]]\nname = "crm-admin"\nkey = "0123456789abcdef0"\n'
                    'roles = ["admin"]\n')
    monkeypatch.setenv("PROMO_CONFIG_FILE", str(path))
    monkeypatch.setenv("PROMO_LOG_FORMAT", "json")
    settings = Settings()
    assert (settings.grant_batch_max, settings.worker_metrics_port, settings.log_format) == (
        8, 9500, "json")
    assert [k.name for k in settings.api_keys] == ["crm-admin"]


def test_smtp_settings_need_a_sender_and_both_credentials(
        clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: PROMO_SMTP_FROM "required when PROMO_SMTP_HOST is set"; PROMO_SMTP_USERNAME
    "(with the password; both or neither)"; `Name <alerts@example.com>` is a valid sender."""
    assert _problems(monkeypatch, SMTP_HOST="relay.internal") == [
        "PROMO_SMTP_FROM: PROMO_SMTP_HOST is set: set PROMO_SMTP_FROM too (the sender address "
        "of alert e-mails, e.g. promo-alerts@example.com)"]
    assert _problems(monkeypatch, SMTP_FROM="Promo <alerts@example.com>") == []
    problems = _problems(monkeypatch, SMTP_USERNAME="promo")
    assert len(problems) == 1 and "PROMO_SMTP_PASSWORD" in problems[0]


def test_an_api_key_sha256_must_be_hex(clean_env: None) -> None:
    """README: `"key_sha256": "<sha256 hex of the key>"`; the settings' own message says
    "key_sha256 must be 64 hex characters". A 64-character value that is not hex can never
    match a key and should be a bad setting, like one of 63 characters."""
    with pytest.raises(ValueError, match="64 hex characters"):
        ApiKeyConfig(name="crm-admin", key_sha256="a" * 63, roles=["admin"])
    with pytest.raises(ValueError, match="64 hex characters"):
        ApiKeyConfig(name="crm-admin", key_sha256="z" * 64, roles=["admin"])


def test_an_encrypted_tls_key_or_a_missing_client_ca_is_one_line(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: PROMO_TLS_KEY_FILE "PEM private key, unencrypted"; "The files are checked when
    the settings load: a missing or unreadable file ... is a bad setting"."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    chain, key, encrypted = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "enc.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    private = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    encrypted.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass-phrase")))
    problems = _problems(monkeypatch, TLS_CERT_FILE=str(chain), TLS_KEY_FILE=str(encrypted))
    assert problems == [f"PROMO_TLS_KEY_FILE: {encrypted} holds an encrypted private key; gRPC "
                        "needs it unencrypted (openssl pkey -in KEY -out PLAIN_KEY)"]
    missing = tmp_path / "nope.pem"
    assert _problems(monkeypatch, TLS_KEY_FILE=str(key), TLS_CLIENT_CA_FILE=str(missing)) == [
        f"PROMO_TLS_CLIENT_CA_FILE: {missing} does not exist"]


# --- README "Settings": how `promo` reports a bad setting ---------------------------------------


async def test_a_bad_setting_line_never_prints_the_settings_value() -> None:
    """README: "each bad setting is one line (`invalid settings: PROMO_GRPC_PORT: Input should
    be ...`) and the command exits with status 2. These lines name the setting, never its
    value"."""
    value = "alerts-at-example.com"
    code, output = await _promo("migrate", env=_env(
        PROMO_SMTP_HOST="relay.internal", PROMO_SMTP_FROM=value))
    assert code == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("invalid settings: PROMO_SMTP_FROM: "), output
    assert value not in output, output


async def test_a_setting_that_is_not_json_is_one_line_naming_the_setting() -> None:
    """README: each bad setting is one line `invalid settings: PROMO_<NAME>: ...`, exit 2."""
    code, output = await _promo("migrate", env=_env(PROMO_API_KEYS="[{not json"))
    assert code == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("invalid settings: PROMO_API_KEYS"), output


@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_serve_and_worker_without_a_database_url_say_so_in_one_line(command: str) -> None:
    """README: PROMO_DATABASE_URL: "`serve`, `worker` and `migrate` require it", and
    "`serve`, `worker`, `up`, `migrate` and `secrets reseal` check them at start: each bad
    setting is one line ... and the command exits with status 2". `promo migrate` does
    (`PROMO_DATABASE_URL is not set`, status 2); serve and worker should too, without a
    traceback."""
    code, output = await _promo(command, env=_env(PROMO_REDIS_URL="redis://127.0.0.1:1/0",
                                                  PROMO_LOG_FORMAT="text"))
    assert "Traceback" not in output, output
    assert code == 2, output
    assert "PROMO_DATABASE_URL" in output


async def test_migrate_without_a_database_url_is_one_line_with_status_2() -> None:
    code, output = await _promo("migrate", env=_env())
    assert (code, output.splitlines()) == (2, ["PROMO_DATABASE_URL is not set"])


async def test_migrate_applies_once_then_reports_up_to_date(services: Services) -> None:
    """README/operations.md: "run `promo migrate` once from your deploy job" (safe to run
    again: a migrated database is up to date)."""
    name = f"promo_audit_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        env = _env(PROMO_DATABASE_URL=with_database(services.database_url, name),
                   PROMO_LOG_FORMAT="text")
        code, first = await _promo("migrate", env=env)
        assert code == 0, first
        assert "applied " in first and " migration(s): [1, 2, 3," in first, first
        code, again = await _promo("migrate", env=env)
        assert (code, again.splitlines()[-1]) == (0, "database is up to date")
    finally:
        admin = await asyncpg.connect(services.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# --- Metrics endpoints ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_metrics_port_unset_or_zero_means_no_endpoint(clean_env: None) -> None:
    """operations.md: "`promo serve`: on `PROMO_METRICS_PORT` (unset or 0: no endpoint)";
    `promo up` with PROMO_METRICS_PORT=0 has none either (README: "unset or 0: none")."""
    settings = Settings()
    assert start_metrics(settings, None) is None
    assert start_metrics(settings, 0) is None
    assert start_metrics(settings, 0, default_port=DEFAULT_UP_METRICS_PORT) is None


def test_promo_up_skips_a_busy_default_metrics_port_with_a_warning(
        clean_env: None, caplog: pytest.LogCaptureFixture) -> None:
    """operations.md: "`promo up` ...: on `PROMO_METRICS_PORT`, by default 9464; if that port
    is busy it logs a warning and runs without"; PROMO_METRICS_HOST is the listen address."""
    settings = Settings()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="promo.cli"):
            assert start_metrics(settings, None, default_port=port) is None
    assert any(r.levelname == "WARNING" and "busy" in r.getMessage() for r in caplog.records)
    free = _free_port()
    endpoint = start_metrics(settings, None, default_port=free)
    assert endpoint is not None
    try:
        assert endpoint.url == f"http://127.0.0.1:{free}/metrics"
    finally:
        endpoint.close()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _reward_metrics() -> dict[str, float]:
    """The GetReward counters a test compares before and after its calls."""
    return {
        "not_active": _sample("promo_rewards_total", outcome="denied", reason="NOT_ACTIVE"),
        "granted": _sample("promo_rewards_total", outcome="granted", reason=""),
        "existing": _sample("promo_rewards_total", outcome="existing", reason=""),
        "count": _sample("promo_grant_batch_size_count"),
        "sum": _sample("promo_grant_batch_size_sum"),
        "ok": _sample("promo_rpc_handled_total", grpc_service="promo.v1.RewardService",
                      grpc_method="GetReward", grpc_code="OK"),
    }


async def test_health_and_reflection_are_not_counted_and_rewards_are(api: Api) -> None:
    """operations.md metrics table: promo_rpc_handled_total{grpc_service, grpc_method,
    grpc_code} "Health checks and reflection are not counted"; promo_rewards_total{outcome,
    reason} with `denied` NOT_ACTIVE; promo_grant_batch_size "`_count` is the number of
    transactions, `_sum` the grants"."""
    health = health_pb2_grpc.HealthStub(api.channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""))

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for _ in reflection_pb2_grpc.ServerReflectionStub(api.channel).ServerReflectionInfo(
            requests()):
        pass
    counted = {s.labels.get("grpc_service") for family in REGISTRY.collect()
               if family.name == "promo_rpc_handled" for s in family.samples}
    assert not {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                "grpc.reflection.v1.ServerReflection"} & counted

    await reward_type(api)
    await promotion(api, "SLEEPY", activate=False)
    await promotion(api, "VIP25")
    before = _reward_metrics()
    denied = await get_reward(api, "c1", "SLEEPY")
    assert not denied.HasField("grant")
    for customer in ("c1", "c2", "c3"):
        assert (await get_reward(api, customer)).HasField("grant")
    assert (await get_reward(api, "c1")).existing  # the customer's earlier grant
    after = _reward_metrics()
    delta = {k: after[k] - before[k] for k in before}
    assert (delta["not_active"], delta["granted"], delta["existing"], delta["ok"]) == (
        1, 3, 1, 5)
    # Calls one after another: each is a transaction of its own ("A lone call is never held
    # back"). Every GetReward that reaches the database counts, the NOT_ACTIVE denial and the
    # customer's earlier grant included (both are decided in that transaction).
    assert (delta["count"], delta["sum"]) == (5, 5)


async def test_the_retention_purge_counts_deleted_rows_per_table(
        settings: Settings, pool: asyncpg.Pool) -> None:
    """operations.md: "`promo_retention_deleted_rows_total{table}` counts them"."""
    now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    async with pool.acquire() as conn:
        for _ in range(2):
            await conn.execute(
                """INSERT INTO outbox_jobs (kind, status, due_at, created_at, finished_at)
                   VALUES ('test.kind', 'done', $1, $1, $1)""", now - timedelta(days=8))
    before = _sample("promo_retention_deleted_rows_total", table="outbox_jobs")
    counts = await purge_retention({"pool": pool, "settings": settings,
                                    "clock": FixedClock(now)})
    assert counts["outbox_jobs"] == 2
    assert _sample("promo_retention_deleted_rows_total", table="outbox_jobs") - before == 2


# --- The `promo` CLI -----------------------------------------------------------------------------


class Cli:
    """Runs `promo ...` in a thread (the test's loop keeps serving) against the test server."""

    def __init__(self, api: Api, data_dir: Path) -> None:
        self.env = {"PROMO_ADDRESS": api.address, "PROMO_API_KEY": ADMIN_KEY,
                    "PROMO_DATA_DIR": str(data_dir), "COLUMNS": "200"}

    async def run(self, *args: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=self.env,
                                       catch_exceptions=False)

    async def ok(self, *args: str) -> str:
        result = await self.run(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))


async def test_the_readme_cli_session_works_as_shown(api: Api, tmp_path: Path) -> None:
    """README "CLI": the five commands and the answer `granted: grant 1, promo code VIP25:
    cashback=15`."""
    cli = Cli(api, tmp_path)
    await cli.ok("reward-types", "create", "cashback", "--display-name", "Cashback",
                 "--category", "amount")
    await cli.ok("promotions", "create", "--code", "VIP25", "--name", "VIP cashback",
                 "--reward", "cashback=15", "--cap", "cashback:daily:1000", "--customer-cap",
                 "500", "--activate")
    answer = await cli.ok("promotions", "get-reward", "VIP25", "customer-42")
    assert answer.strip() == "granted: grant 1, promo code VIP25: cashback=15"
    lobby = await cli.ok("promotions", "list")
    assert "VIP25" in lobby and "cashback daily 15/1000" in lobby
    listed = await cli.json("promotions", "list")
    assert [p["promotion_code"] for p in listed["promotions"]] == ["VIP25"]


def _commands() -> list[tuple[str, Any, list[Any]]]:
    """Every command of the `promo` CLI with its path and the groups above it."""
    found: list[tuple[str, Any, list[Any]]] = []

    def walk(command: Any, path: list[str], parents: list[Any]) -> None:
        if hasattr(command, "list_commands"):  # typer's (vendored click) groups
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, [*path, name], [*parents, command])
        else:
            found.append((" ".join(path), command, parents))

    walk(typer.main.get_command(app), [], [])
    return found


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_every_get_and_list_takes_json_and_lists_take_paging() -> None:
    """README: "Every `get` and `list` takes `--json`; lists take `--page-size`,
    `--page-token` and `--all`"; "The connection options belong to the group"."""
    commands = _commands()
    gets = [(p, c) for p, c, _ in commands if p.split()[-1] in ("get", "list")]
    assert len(gets) > 10
    assert [p for p, c in gets if "--json" not in _options(c)] == []
    assert [p for p, c in gets if p.endswith("list")
            and not {"--page-size", "--page-token", "--all"} <= _options(c)] == []
    connection = {"--address", "--api-key", "--ca-file", "--tls", "--cert-file", "--key-file",
                  "--timeout"}
    client = [(p, parents) for p, _, parents in commands
              if p.split()[0] not in ("serve", "worker", "migrate", "up", "demo", "secrets")]
    assert [p for p, parents in client
            if not any(connection <= _options(g) for g in parents)] == []


def test_the_documented_listing_and_mutating_flags_exist() -> None:
    """README/operations.md: `promo listeners deliveries --status dead`, `promo listeners
    redeliver ID`, `promo bonuses queue --status calculated` with `--definition`, `--status`,
    `--customer`, `--after`, `--before`; mutating commands take `--request-id`."""
    by_path = {p: c for p, c, _ in _commands()}
    assert {"--status", "--json", "--all"} <= _options(by_path["listeners deliveries"])
    assert "--request-id" in _options(by_path["listeners redeliver"])
    assert {"--definition", "--status", "--customer", "--after", "--before"} <= _options(
        by_path["bonuses queue"])
    mutating = ["reward-types create", "reward-types update", "promotions create",
                "promotions activate", "promotions deactivate", "promotions get-reward",
                "promotions revoke", "listeners register", "listeners redeliver",
                "customers upsert", "customers record-events", "bonuses create",
                "bonuses update", "bonuses request", "bonuses approve", "bonuses reject",
                "bonuses recalculate", "products create", "products update", "products delete",
                "products assign", "products remove", "products select", "codes upload",
                "products basket apply"]
    assert [p for p in mutating if "--request-id" not in _options(by_path[p])] == []


async def test_a_dead_delivery_is_listed_and_redelivered_from_the_cli(
        api: Api, clock: FixedClock, pool: asyncpg.Pool, settings: Settings,
        tmp_path: Path) -> None:
    """operations.md: "Any `dead` or `failed` needs a look at the delivery log (`promo
    listeners deliveries --status dead`) and perhaps `promo listeners redeliver ID`"."""
    cli = Cli(api, tmp_path)
    registered = await cli.json("listeners", "register", "--event-type", "scheduled_campaign",
                                "--url", "https://hooks.example.com/a")
    listener_id = registered["listener"]["listener_id"]
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "camp-dead", clock.now() + timedelta(minutes=10),
                          customers=["c1"])
    notify = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'campaign.notify'")
    assert await run_outbox_job({"pool": pool, "clock": clock, "settings": settings},
                                notify) == "done"
    await pool.execute("UPDATE webhook_deliveries SET status = 'DEAD', last_error = 'gave up'")
    dead = await cli.json("listeners", "deliveries", "--status", "dead")
    [delivery] = dead["deliveries"]
    assert (delivery["status"], delivery["listener_id"]) == ("DELIVERY_STATUS_DEAD",
                                                             listener_id)
    table = await cli.ok("listeners", "deliveries", "--status", "dead")
    assert "dead" in table
    again = await cli.json("listeners", "redeliver", str(delivery["delivery_id"]))
    assert again["delivery"]["status"] == "DELIVERY_STATUS_PENDING"
    assert (await cli.json("listeners", "deliveries", "--status", "dead"))["deliveries"] == []


async def test_json_logs_are_one_line_per_rpc_with_its_fields(api: Api) -> None:
    """operations.md: PROMO_LOG_FORMAT json: "One JSON line per RPC (request id, method,
    caller's key name, code, ms)"; README: "(one object per line, with request id, method,
    principal, code, ms)"."""
    from server.logs import JsonFormatter

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))  # formatted in the call's context, as in use

    handler = Keep()
    handler.setFormatter(JsonFormatter())
    rpc_log = logging.getLogger("promo.rpc")
    old_level = rpc_log.level
    rpc_log.addHandler(handler)
    rpc_log.setLevel(logging.INFO)
    try:
        await reward_type(api)
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(old_level)
    entries = [json.loads(line) for line in lines]
    [entry] = [e for e in entries if e["msg"] == "rpc"]
    assert entry["method"] == "/promo.v1.RewardTypeService/CreateRewardType"
    assert entry["principal"] == "test-admin" and entry["code"] == "OK"
    assert len(entry["request_id"]) > 0 and isinstance(entry["ms"], float)
    assert all("\n" not in line for line in lines)
