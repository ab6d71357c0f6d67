"""Settings audit: every deployment setting (`PROMO_*`, config/settings.py) against what README
"Settings", docs/operations.md and docs/webhooks.md say about it, through the real entry points.

- Documented: each field has a row in the README table, its documented default is the code's,
  and docs/operations.md / docs/webhooks.md give the same defaults where they repeat them.
- Used: the settings with a visible effect are exercised: the clearance lead moves the
  scheduled-campaign notification, the bonus batch window sets the window's length, the job
  lease and retry settings set the outbox row's lease and backoff, the webhook timeout, attempts
  and deadline decide a delivery's fate, and real `promo serve` / `promo worker` processes open
  PROMO_DB_POOL_MIN_SIZE connections, time out statements after PROMO_DB_COMMAND_TIMEOUT_SECONDS,
  log in PROMO_LOG_FORMAT at PROMO_LOG_LEVEL, stop with PROMO_SHUTDOWN_GRACE_SECONDS and serve
  metrics on their ports.
- Refused: README "Settings": "each bad setting is one line (`invalid settings: PROMO_... `) and
  the command exits with status 2 ... These lines name the setting, never its value". Bad values
  are given to real `promo serve` / `worker` / `up` / `migrate` subprocesses (or to Settings(),
  which is what those commands call, for the checks that need no process).
- Secrets (API keys, the secret-encryption key, the SMTP password, a database or Redis
  password in a URL) never appear in the output of a refused or a running process.

Found and fixed (each test was a strict xfail first): malformed database or Redis URLs, a busy
or unresolvable gRPC or metrics address, a data folder that is a file, an unreachable database
and an infinite duration ended the start with a traceback (now one line naming the setting:
URLs are checked at load, start failures are `error: PROMO_...` with exit status 1); durations
had no upper bound (a huge one failed later); a TOML syntax error did not name the file; a
misspelt key in the TOML file was ignored; a PROMO_API_KEYS that is not JSON hid every other bad
setting; one key listed twice, or a key with surrounding spaces, was accepted; SMTP username,
password or sender without PROMO_SMTP_HOST were ignored; the client CLI looked for `promo up`'s
admin key in another folder than the one `promo up` used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import trustme
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from cli.settings_loader import settings_problems
from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from server.auth import Authenticator
from storage import outbox
from tests.conftest import ADMIN_KEY, LISTENER_KEY, RUNTIME_KEY, TEST_API_KEYS, serving_api
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import promotion, reward_type
from tests.e2e.promo_process import REPO, clean_env
from tests.e2e.test_proto_promises_audit import bonuses, create_definition, definition, rid, upsert
from tests.integration.test_webhooks_doc_audit import add_listener, delivery, emit, worker_ctx
from tests.webhook_listener import WebhookListener, free_port
from workers import retention
from workers.outbox import run_outbox_job
from workers.registry import HANDLERS

API_KEYS_JSON = json.dumps([{"name": k.name, "key": key, "roles": k.roles} for k, key in zip(
    TEST_API_KEYS, (ADMIN_KEY, RUNTIME_KEY, LISTENER_KEY), strict=True)])
SECRET_KEY = "Zm9yLWEtc2V0dGluZ3MtYXVkaXQtc2VjcmV0LWtleSE="  # a valid key (32 bytes), a marker
DB_PASSWORD = "Db-Passw0rd-Never-Printed"
REDIS_PASSWORD = "Redis-Passw0rd-Never-Printed"
LONG_API_KEY = "api-key-that-must-never-be-printed-0123"


# --- helpers -------------------------------------------------------------------------------------

def _field_default(name: str) -> Any:
    field = Settings.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default


def _doc_table(path: Path) -> dict[str, str]:
    """`| `PROMO_X`[, `PROMO_Y`] | default[, default] | ...` rows: setting -> documented default."""
    rows: dict[str, str] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not cells[1].startswith("`PROMO_"):
            continue
        names = re.findall(r"`(PROMO_[A-Z0-9_]+)`", cells[1])
        defaults = [d.strip() for d in cells[2].split(",")]
        if len(defaults) != len(names):
            defaults = [cells[2]] * len(names)
        rows.update(zip(names, defaults, strict=True))
    return rows


def _documented_value(text: str, default: Any) -> bool:
    """Whether a documented default cell (`30`, (none), unset, `true`...) means ``default``."""
    text = text.strip().strip("`")
    if default is None or default == []:
        return text.startswith(("(none", "unset", "[]"))
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    return text == str(default)


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _run(args: list[str], env: dict[str, str], *,
               within: float = 20.0) -> tuple[int, str]:
    """Run `promo ARGS` to its end; (exit status, stdout and stderr). A process still running
    after ``within`` seconds (it did not refuse the setting) is stopped: status -1."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
        return -1, out.decode()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class Running:
    """A long-running `promo` process whose output goes to a file (no pipe to fill up)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, marker: str, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if marker in self.text():
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{marker!r} never logged:\n{self.text()}")

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


@contextlib.asynccontextmanager
async def _running(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[Running]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *args, env=env, cwd=REPO, stdout=out, stderr=out)
    running = Running(proc, log)
    try:
        yield running
    finally:
        await running.stop()


@contextlib.contextmanager
def _busy_port() -> Iterator[int]:
    """A port something else listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def _connections(database_url: str, application_name: str = "promo") -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = $1", application_name)
    finally:
        await conn.close()


def _base_env(database_url: str | None = None, redis_url: str | None = None,
              **values: str) -> dict[str, str]:
    env = clean_env(PROMO_MIGRATE_ON_START="false", PROMO_LOG_FORMAT="text",
                    PROMO_GRPC_PORT="0", PROMO_QUEUE_NAME="promo:test:settings-audit")
    if database_url:
        env["PROMO_DATABASE_URL"] = database_url
    if redis_url:
        env["PROMO_REDIS_URL"] = redis_url
    env.update(values)
    return env


def _one_line_naming(output: str, variable: str) -> bool:
    """The documented refusal: an `invalid settings: PROMO_X...` (or `error: ...`) line that
    names the variable, and no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    named = [line for line in lines if variable in line
             and line.startswith(("invalid settings:", "error:"))]
    return "Traceback" not in output and len(named) >= 1


# --- 1. Documented, with the code's defaults -----------------------------------------------------

def test_every_setting_has_a_readme_row_with_the_codes_default() -> None:
    """README "Settings": one row per field of config/settings.py, default as in the code."""
    table = _doc_table(REPO / "README.md")
    fields = {f"PROMO_{name.upper()}": name for name in Settings.model_fields}
    assert set(fields) - set(table) == set(), "settings without a README row"
    assert set(table) - set(fields) == set(), "README rows naming no setting"
    wrong = {var: (table[var], _field_default(name)) for var, name in fields.items()
             if not _documented_value(table[var], _field_default(name))}
    assert wrong == {}


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/webhooks.md"])
def test_the_other_settings_tables_repeat_the_same_defaults(doc: str) -> None:
    """docs/operations.md "Settings that matter at scale" and docs/webhooks.md's SMTP table."""
    table = _doc_table(REPO / doc)
    assert table, f"no settings table found in {doc}"
    wrong = {}
    for var, text in table.items():
        name = var.removeprefix("PROMO_").lower()
        assert name in Settings.model_fields, f"{doc} names {var}, which is no setting"
        if not _documented_value(text, _field_default(name)):
            wrong[var] = (text, _field_default(name))
    assert wrong == {}


def test_prose_defaults_match_the_code() -> None:
    """Defaults stated in prose: docs/webhooks.md "PROMO_WEBHOOK_TIMEOUT_SECONDS, 10 s by
    default", "(default 30 ...)", "(default 24 h)", "default an hour"; docs/bonuses.md
    "PROMO_BONUS_BATCH_WINDOW_SECONDS, default 300"; docs/webhooks.md event 5
    "PROMO_CLEARANCE_LEAD_SECONDS (30 min)"."""
    webhooks_doc = (REPO / "docs/webhooks.md").read_text()
    bonuses_doc = (REPO / "docs/bonuses.md").read_text()
    defaults = Settings.model_fields
    assert "`PROMO_WEBHOOK_TIMEOUT_SECONDS`, 10 s by default" in webhooks_doc
    assert defaults["webhook_timeout_seconds"].default == 10
    assert "`PROMO_WEBHOOK_MAX_ATTEMPTS` attempts (default 30" in webhooks_doc
    assert defaults["webhook_max_attempts"].default == 30
    assert "`PROMO_WEBHOOK_DEADLINE_SECONDS` (default 24 h)" in webhooks_doc
    assert defaults["webhook_deadline_seconds"].default == 24 * 3600
    assert "`PROMO_WEBHOOK_RETRY_MAX_SECONDS`, default an hour" in webhooks_doc
    assert defaults["webhook_retry_max_seconds"].default == 3600
    assert "`PROMO_BONUS_BATCH_WINDOW_SECONDS`, default 300" in bonuses_doc
    assert defaults["bonus_batch_window_seconds"].default == 300
    assert "`PROMO_CLEARANCE_LEAD_SECONDS` (30 min)" in webhooks_doc
    assert defaults["clearance_lead_seconds"].default == 1800


def test_every_setting_is_read_by_the_code() -> None:
    """No dead setting: every field is read somewhere outside config/ (server, workers,
    storage, cli)."""
    sources = "\n".join(path.read_text() for folder in ("server", "workers", "storage", "cli")
                        for path in (REPO / folder).rglob("*.py"))
    unread = [name for name in Settings.model_fields
              if not re.search(rf"\.{name}\b", sources)]
    assert unread == []


# --- 2. Used by what they claim to control -----------------------------------------------------

async def test_clearance_lead_sets_when_the_scheduled_campaign_event_is_due(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """README: PROMO_CLEARANCE_LEAD_SECONDS "How long before a conditional campaign's execution
    ... the listeners get the scheduled-campaign event (type 5). A campaign created later than
    that is announced at once.\""""
    lead = settings.model_copy(update={"clearance_lead_seconds": 600.0})
    async with serving_api(lead, pool, clock) as api:
        await reward_type(api)
        await promotion(api)
        far = clock.now() + timedelta(hours=2)
        near = clock.now() + timedelta(minutes=5)
        await create_campaign(api, "far", far, customers=["c1"])
        await create_campaign(api, "near", near, customers=["c1"])
    rows = await pool.fetch(
        "SELECT c.campaign_id AS campaign, j.due_at FROM outbox_jobs j JOIN campaigns c "
        "ON j.dedup_key = 'campaign:' || c.id || ':notify'")
    due = {r["campaign"]: r["due_at"] for r in rows}
    assert due == {"far": far - timedelta(seconds=600), "near": clock.now()}


async def test_bonus_batch_window_sets_the_window_length(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """README: PROMO_BONUS_BATCH_WINDOW_SECONDS "Dynamic-bonus requests pile up this long and
    are computed together"; docs/bonuses.md: batch_window_seconds 0 uses it."""
    short = settings.model_copy(update={"bonus_batch_window_seconds": 120})
    async with serving_api(short, pool, clock) as api:
        await upsert(api, "c1")
        await create_definition(api, definition("win"))
        answer = await bonuses(api).RequestBonusCalculation(bpb.RequestBonusCalculationRequest(
            request_id=rid(), definition_id="win", customer_ids=["c1"]),
            metadata=api.key("runtime"))
    start = answer.window_start.ToDatetime(UTC)
    assert answer.due_time.ToDatetime(UTC) - start == timedelta(seconds=120)
    assert start <= clock.now() < start + timedelta(seconds=120)
    job = await pool.fetchrow("SELECT due_at FROM outbox_jobs WHERE kind = 'bonus.batch'")
    assert job is not None and job["due_at"] == start + timedelta(seconds=120)


FAILING_KIND = "test.settings-audit.fail"


@pytest.fixture
def failing_kind(pool: asyncpg.Pool) -> Iterator[list[datetime | None]]:
    """An outbox kind whose handler records the row's lease and fails (transient)."""
    leases: list[datetime | None] = []

    async def handler(ctx: dict[str, Any], job: outbox.OutboxJob) -> None:
        leases.append(await ctx["pool"].fetchval(
            "SELECT locked_until FROM outbox_jobs WHERE id = $1", job.id))
        raise RuntimeError("listener of the audit is down")

    HANDLERS[FAILING_KIND] = handler
    try:
        yield leases
    finally:
        HANDLERS.pop(FAILING_KIND, None)


async def test_job_lease_and_retry_settings_set_the_lease_and_the_backoff(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        failing_kind: list[datetime | None]) -> None:
    """README: PROMO_JOB_LEASE_SECONDS "How long a queued or running outbox job is considered in
    flight"; PROMO_JOB_RETRY_BASE_SECONDS "base × 2^(attempt−1), with jitter" ...
    PROMO_JOB_RETRY_MAX_SECONDS "capped at this"; jitter is "times 0.5-1.0" (docs/webhooks.md)."""
    tuned = settings.model_copy(update={"job_lease_seconds": 77, "job_retry_base_seconds": 10.0,
                                        "job_retry_max_seconds": 15.0})
    async with pool.acquire() as conn:
        job_id = await outbox.add_job(conn, kind=FAILING_KIND, payload={}, due_at=clock.now())
    assert job_id is not None
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": tuned, "redis": None}
    waits = []
    for _ in range(3):
        started = clock.now()
        assert await run_outbox_job(ctx, job_id) == "pending"
        assert failing_kind[-1] == started + timedelta(seconds=77)
        due = await pool.fetchval("SELECT due_at FROM outbox_jobs WHERE id = $1", job_id)
        waits.append((due - started).total_seconds())
        clock.advance(timedelta(seconds=20))
    assert 5 <= waits[0] <= 10  # 10 × 2^0, times 0.5-1.0
    assert 7.5 <= waits[1] <= 15  # 10 × 2^1 = 20, capped at 15
    assert 7.5 <= waits[2] <= 15


@pytest.fixture
async def hook(clock: FixedClock) -> AsyncIterator[WebhookListener]:
    server = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        yield server
    finally:
        await server.stop()


async def test_webhook_timeout_bounds_one_post(settings: Settings, pool: asyncpg.Pool,
                                               clock: FixedClock, hook: WebhookListener) -> None:
    """README: PROMO_WEBHOOK_TIMEOUT_SECONDS "Timeout of one whole webhook POST; a timeout is
    retried"."""
    tuned = settings.model_copy(update={"webhook_timeout_seconds": 0.5})
    hook.answer((3.0, 200))
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    began = time.monotonic()
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
    assert time.monotonic() - began < 2.5
    row = await delivery(pool)
    assert row.status.value == "PENDING"
    assert row.last_error is not None and row.last_error.startswith("timeout after 0.5 s")


async def test_webhook_max_attempts_and_deadline_give_a_delivery_up(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """README: PROMO_WEBHOOK_MAX_ATTEMPTS "Attempts per delivery ... before it is `DEAD`";
    PROMO_WEBHOOK_DEADLINE_SECONDS "A delivery whose event gave no `deliver_by` is given up
    (`DEAD`) this long after it was emitted"."""
    hook.default = 503
    await add_listener(pool, hook.url, now=clock.now(),
                       event_type=EventType.CAMPAIGN_EXECUTED)
    two = settings.model_copy(update={"webhook_max_attempts": 2})
    first = await emit(pool, clock, event_type=EventType.CAMPAIGN_EXECUTED,
                       payload={"campaign_id": "a"})
    async with worker_ctx(two, pool, clock) as ctx:
        for _ in range(2):
            await run_outbox_job(ctx, first.outbox_job_ids[0])
            clock.advance(timedelta(seconds=5))
    dead = await delivery(pool)
    assert dead.status.value == "DEAD" and "gave up after 2 attempts" in (dead.last_error or "")

    short = settings.model_copy(update={"webhook_deadline_seconds": 60})
    second = await emit(pool, clock, event_type=EventType.CAMPAIGN_EXECUTED,
                        payload={"campaign_id": "b"})
    async with worker_ctx(short, pool, clock) as ctx:
        await run_outbox_job(ctx, second.outbox_job_ids[0])
        pending = await delivery(pool)
        assert pending.status.value == "PENDING"
        clock.advance(timedelta(seconds=61))
        await run_outbox_job(ctx, second.outbox_job_ids[0])
    late = await delivery(pool)
    assert late.status.value == "DEAD" and "deadline" in (late.last_error or "")



# --- 2b. Real processes use the pool, timeout, logging, grace and metrics settings --------------

async def _trust_password(url: str) -> str | None:
    """The URL with DB_PASSWORD in it, if the server accepts it (trust authentication)."""
    with_pw = _with_password(url, DB_PASSWORD)
    try:
        conn = await asyncpg.connect(with_pw)
    except Exception:
        return None
    await conn.close()
    return with_pw


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.read().decode()


async def test_serve_uses_pool_timeout_json_logs_grace_and_metrics_and_prints_no_secret(
        database_url: str, tmp_path: Path) -> None:
    """A real `promo serve`: README PROMO_DB_POOL_MIN_SIZE "asyncpg pool minimum connections
    per process"; docs/operations.md PROMO_DB_COMMAND_TIMEOUT_SECONDS "Per statement. A
    statement over it fails the call (UNAVAILABLE DATABASE_TIMEOUT) instead of holding the
    connection";
    PROMO_LOG_FORMAT json "one object per line"; PROMO_SHUTDOWN_GRACE_SECONDS; PROMO_METRICS_PORT.
    With PROMO_LOG_LEVEL=DEBUG nothing prints an API key, the secret-encryption key or the
    database password."""
    url = await _trust_password(database_url)
    grpc_port, metrics_port = free_port(), free_port()
    env = _base_env(url or database_url, PROMO_LOG_FORMAT="json", PROMO_LOG_LEVEL="DEBUG",
                    PROMO_DB_POOL_MIN_SIZE="3", PROMO_DB_POOL_MAX_SIZE="4",
                    PROMO_DB_COMMAND_TIMEOUT_SECONDS="1", PROMO_SHUTDOWN_GRACE_SECONDS="0.25",
                    PROMO_GRPC_PORT=str(grpc_port), PROMO_METRICS_PORT=str(metrics_port),
                    PROMO_API_KEYS=API_KEYS_JSON, PROMO_SECRET_ENCRYPTION_KEYS=SECRET_KEY)
    async with _running(["serve"], env, tmp_path / "serve.log") as proc:
        await proc.wait_for('"server listening"')
        assert 3 <= await _connections(database_url) <= 4
        locker = await asyncpg.connect(database_url)
        channel = aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE reward_types IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                await rtpb_grpc.RewardTypeServiceStub(channel).ListRewardTypes(
                    rtpb.ListRewardTypesRequest(), metadata=(("x-api-key", ADMIN_KEY),),
                    timeout=15)
            waited = time.monotonic() - began
            await tx.rollback()
        finally:
            await channel.close()
            await locker.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0.8 < waited < 5, waited
        status, metrics = await asyncio.to_thread(
            _get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "promo_rpc_handled_total" in metrics
        assert await proc.stop() == 0
    lines = [line for line in proc.text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r.get("msg") == "stopping" and r.get("grace_s") == 0.25 for r in records)
    assert {"DEBUG", "INFO"} <= {r["level"] for r in records}
    text = proc.text()
    for secret in (ADMIN_KEY, RUNTIME_KEY, LISTENER_KEY, SECRET_KEY, DB_PASSWORD):
        assert secret not in text


async def test_serve_logs_text_at_warning_level_only(services: Any, tmp_path: Path) -> None:
    """README: PROMO_LOG_LEVEL WARNING keeps only warnings and errors; PROMO_LOG_FORMAT text."""
    env = _base_env(services.database_url, PROMO_LOG_LEVEL="WARNING",
                    PROMO_DB_POOL_MIN_SIZE="0")
    async with _running(["serve"], env, tmp_path / "serve.log") as proc:
        await proc.wait_for("no API keys configured")
        assert await proc.stop() == 0
    lines = [line for line in proc.text().splitlines() if line.strip()]
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (WARNING|ERROR) ", line)
                         for line in lines), lines


async def test_worker_uses_pool_size_json_logs_and_its_metrics_port(
        database_url: str, services: Any, queue_name: str, tmp_path: Path) -> None:
    """README: the worker's pool follows PROMO_DB_POOL_MIN_SIZE; PROMO_WORKER_METRICS_PORT
    "The metrics port of `promo worker`"; PROMO_QUEUE_NAME is the queue it listens on."""
    metrics_port = free_port()
    env = _base_env(database_url, services.redis_url, PROMO_LOG_FORMAT="json",
                    PROMO_DB_POOL_MIN_SIZE="3", PROMO_QUEUE_NAME=queue_name,
                    PROMO_WORKER_METRICS_PORT=str(metrics_port),
                    PROMO_SECRET_ENCRYPTION_KEYS=SECRET_KEY)
    async with _running(["worker"], env, tmp_path / "worker.log") as proc:
        await proc.wait_for('"worker started"')
        assert await _connections(database_url) >= 3
        status, metrics = await asyncio.to_thread(
            _get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "promo_outbox_pending_jobs" in metrics
        assert await proc.stop() == 0
    records = [json.loads(line) for line in proc.text().splitlines() if line.strip()]
    assert any(r.get("msg") == "worker started" and r.get("queue") == queue_name
               for r in records)
    assert SECRET_KEY not in proc.text()



async def test_serve_speaks_tls_with_the_tls_file_settings(services: Any, tmp_path: Path) -> None:
    """README: PROMO_TLS_CERT_FILE "with the key file, the server speaks TLS only" (through the
    environment of a real `promo serve`; tests/e2e/test_tls.py covers mutual TLS in process)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    port = free_port()
    env = _base_env(services.database_url, PROMO_GRPC_PORT=str(port), PROMO_DB_POOL_MIN_SIZE="0",
                    PROMO_TLS_CERT_FILE=str(chain), PROMO_TLS_KEY_FILE=str(key))
    async with _running(["serve"], env, tmp_path / "serve.log") as proc:
        await proc.wait_for("server listening")
        assert "tls=True" in proc.text()
        secure = aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes()))
        plain = aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            answer = await health_pb2_grpc.HealthStub(secure).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=2)
        finally:
            await secure.close()
            await plain.close()
        assert await proc.stop() == 0

# --- 3. Bad values are refused at start, one line each, naming the variable -------------------

FIELD_ERRORS = {
    "PROMO_GRPC_PORT": "70000",
    "PROMO_DB_POOL_MAX_SIZE": "0",
    "PROMO_DB_COMMAND_TIMEOUT_SECONDS": "0",
    "PROMO_SHUTDOWN_GRACE_SECONDS": "-1",
    "PROMO_CLEARANCE_LEAD_SECONDS": "-5",
    "PROMO_JOB_LEASE_SECONDS": "1",
    "PROMO_JOB_RETRY_BASE_SECONDS": "0",
    "PROMO_WEBHOOK_TIMEOUT_SECONDS": "0",
    "PROMO_WEBHOOK_MAX_ATTEMPTS": "0",
    "PROMO_BONUS_BATCH_WINDOW_SECONDS": "0",
    "PROMO_SWEEPER_INTERVAL_SECONDS": "ten",
    "PROMO_WORKER_MAX_JOBS": "-3",
    "PROMO_MIGRATE_ON_START": "maybe",
    "PROMO_LOG_LEVEL": "LOUD",
    "PROMO_LOG_FORMAT": "xml",
    "PROMO_METRICS_PORT": "-1",
    "PROMO_OUTBOX_JOB_RETENTION_DAYS": "-1",
    "PROMO_SMTP_PORT": "0",
}


async def test_each_bad_value_is_one_line_naming_its_variable() -> None:
    """README "Settings": "each bad setting is one line ... and the command exits with status
    2" — negative, zero where meaningless, out of range, wrong type, not JSON."""
    env = _base_env("postgresql://postgres@127.0.0.1:1/none", "redis://127.0.0.1:1/0",
                    **FIELD_ERRORS)
    code, output = await _run(["worker"], env)
    lines = output.splitlines()
    assert code == 2, output
    assert "Traceback" not in output
    assert len(lines) == len(FIELD_ERRORS), output
    assert all(line.startswith("invalid settings: PROMO_") for line in lines), output
    assert {line.split(":")[1].strip() for line in lines} == set(FIELD_ERRORS)


def test_a_setting_that_is_not_json_does_not_hide_the_other_bad_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    problems = _problems(monkeypatch, PROMO_API_KEYS="not json", PROMO_GRPC_PORT="70000")
    assert "PROMO_API_KEYS: is not valid JSON" in problems
    assert any(line.startswith("PROMO_GRPC_PORT:") for line in problems), problems


def _problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    """What `promo serve` prints for these settings (cli/settings_loader, in process)."""
    for key in list(os.environ):
        if key.startswith("PROMO_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        Settings()
    except Exception as exc:
        return settings_problems(exc)
    return []


def test_contradictory_combinations_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Cross-setting checks of config/settings.py: pool min above max, half a TLS pair, a
    client CA without a server certificate, SMTP without a sender or with half the login."""
    assert _problems(monkeypatch, PROMO_DB_POOL_MIN_SIZE="5", PROMO_DB_POOL_MAX_SIZE="2") == [
        "PROMO_DB_POOL_MIN_SIZE must not exceed PROMO_DB_POOL_MAX_SIZE"]
    assert _problems(monkeypatch, PROMO_TLS_CERT_FILE=str(tmp_path / "c.pem")) == [
        "set both PROMO_TLS_CERT_FILE and PROMO_TLS_KEY_FILE, or neither"]
    assert _problems(monkeypatch, PROMO_TLS_CLIENT_CA_FILE=str(tmp_path / "ca.pem")) == [
        "PROMO_TLS_CLIENT_CA_FILE needs PROMO_TLS_CERT_FILE and KEY_FILE"]
    [line] = _problems(monkeypatch, PROMO_SMTP_HOST="smtp.example.com")
    assert line.startswith("PROMO_SMTP_FROM: PROMO_SMTP_HOST is set: set PROMO_SMTP_FROM too")
    assert _problems(monkeypatch, PROMO_SMTP_HOST="smtp.example.com", PROMO_SMTP_FROM="a@b.c",
                     PROMO_SMTP_USERNAME="promo") == [
        "PROMO_SMTP_FROM: set both PROMO_SMTP_USERNAME and PROMO_SMTP_PASSWORD, or neither"]


def test_tls_files_are_checked_at_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: PROMO_TLS_CERT_FILE "a missing or unreadable file, one that is not PEM, or a key
    that is not the first certificate's is a bad setting" (lines name the path, not content)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    other = ca.issue_cert("localhost")
    cert_file, key_file, other_key = (tmp_path / "cert.pem", tmp_path / "key.pem",
                                      tmp_path / "other-key.pem")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    other.private_key_pem.write_to_path(str(other_key))
    assert _problems(monkeypatch, PROMO_TLS_CERT_FILE=str(cert_file),
                     PROMO_TLS_KEY_FILE=str(key_file)) == []
    missing = tmp_path / "missing.pem"
    assert _problems(monkeypatch, PROMO_TLS_CERT_FILE=str(missing),
                     PROMO_TLS_KEY_FILE=str(key_file)) == [
        f"PROMO_TLS_CERT_FILE: {missing} does not exist"]
    [line] = _problems(monkeypatch, PROMO_TLS_CERT_FILE=str(cert_file),
                       PROMO_TLS_KEY_FILE=str(other_key))
    assert line.startswith(f"PROMO_TLS_KEY_FILE: {other_key} is not the private key")
    assert "PRIVATE KEY-----" not in line
    [line] = _problems(monkeypatch, PROMO_TLS_CERT_FILE=str(key_file),
                       PROMO_TLS_KEY_FILE=str(key_file))
    assert line == (f"PROMO_TLS_CERT_FILE: {key_file} holds no PEM certificate "
                    "(-----BEGIN CERTIFICATE----- ...)")


def test_a_toml_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """README: "a TOML file named by PROMO_CONFIG_FILE, with the same names in lower case
    without the prefix; the environment wins"."""
    config = tmp_path / "promo.toml"
    config.write_text('webhook_timeout_seconds = 4.5\nqueue_name = "from-file"\n')
    monkeypatch.setenv("PROMO_CONFIG_FILE", str(config))
    monkeypatch.setenv("PROMO_QUEUE_NAME", "from-env")
    monkeypatch.delenv("PROMO_WEBHOOK_TIMEOUT_SECONDS", raising=False)
    settings = Settings()
    assert (settings.webhook_timeout_seconds, settings.queue_name) == (4.5, "from-env")


def test_a_config_file_that_is_not_toml_is_one_line_naming_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "promo.toml"
    config.write_text('grpc_port = "fifty\n')
    [line] = _problems(monkeypatch, PROMO_CONFIG_FILE=str(config))
    assert line.startswith("PROMO_CONFIG_FILE") and str(config) in line, line


def test_a_misspelt_setting_in_the_config_file_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "promo.toml"
    config.write_text("webhook_timeout = 5\n")  # meant: webhook_timeout_seconds
    problems = _problems(monkeypatch, PROMO_CONFIG_FILE=str(config))
    assert any("webhook_timeout" in line for line in problems), problems


# Start failures: settings that pass validation but stop the command later, with a traceback.

START_FAILURES: dict[str, tuple[str, str, dict[str, str]]] = {
    # id: (command, the variable the message must name, settings)
    "database-url-not-a-url-serve": ("serve", "PROMO_DATABASE_URL",
                                     {"PROMO_DATABASE_URL": "not a url"}),
    "database-url-not-a-url-serve-pool-min-0": ("serve", "PROMO_DATABASE_URL", {
        "PROMO_DATABASE_URL": "not a url", "PROMO_DB_POOL_MIN_SIZE": "0"}),
    "database-url-not-a-url-migrate": ("migrate", "PROMO_DATABASE_URL",
                                       {"PROMO_DATABASE_URL": "not a url"}),
    "database-url-bad-port-worker": ("worker", "PROMO_DATABASE_URL", {
        "PROMO_DATABASE_URL": "postgresql://postgres@127.0.0.1:notaport/promo"}),
    "redis-url-not-a-url-serve": ("serve", "PROMO_REDIS_URL", {"PROMO_REDIS_URL": "nope"}),
    "redis-url-not-a-url-worker": ("worker", "PROMO_REDIS_URL", {"PROMO_REDIS_URL": "nope"}),
    "grpc-port-busy": ("serve", "PROMO_GRPC_PORT", {"PROMO_GRPC_PORT": "{busy}"}),
    "grpc-host-unknown": ("serve", "PROMO_GRPC_HOST",
                          {"PROMO_GRPC_HOST": "no-such-host.invalid"}),
    "metrics-port-busy": ("serve", "PROMO_METRICS_PORT", {"PROMO_METRICS_PORT": "{busy}"}),
    "worker-metrics-port-busy": ("worker", "PROMO_WORKER_METRICS_PORT",
                                 {"PROMO_WORKER_METRICS_PORT": "{busy}"}),
    "metrics-host-unknown": ("serve", "PROMO_METRICS_HOST", {
        "PROMO_METRICS_HOST": "no-such-host.invalid", "PROMO_METRICS_PORT": "{free}"}),
    "data-dir-is-a-file": ("up", "PROMO_DATA_DIR", {"PROMO_DATA_DIR": "{file}",
                                                    "PROMO_API_KEYS": API_KEYS_JSON}),
    "clearance-lead-infinite": ("serve", "PROMO_CLEARANCE_LEAD_SECONDS",
                                {"PROMO_CLEARANCE_LEAD_SECONDS": "inf"}),
}


@pytest.mark.parametrize("case", list(START_FAILURES))
async def test_a_setting_that_stops_the_start_is_one_line_naming_it(
        case: str, services: Any, queue_name: str, tmp_path: Path) -> None:
    command, variable, values = START_FAILURES[case]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with _busy_port() as busy:
        filled = {k: v.replace("{busy}", str(busy)).replace("{free}", str(free_port()))
                  .replace("{file}", str(a_file)) for k, v in values.items()}
        env = _base_env(services.database_url, services.redis_url,
                        PROMO_QUEUE_NAME=queue_name, **filled)
        # A refusal comes within a second or two of the start; a process still running
        # after 5 s has accepted the setting (stopped, then reported as status -1).
        code, output = await _run([command], env, within=5)
    assert code not in (0, -1), f"the command did not stop:\n{output}"
    assert _one_line_naming(output, variable), output


async def test_an_unreachable_database_is_one_line_naming_the_setting() -> None:
    env = _base_env(f"postgresql://postgres@127.0.0.1:{free_port()}/promo")
    code, output = await _run(["serve"], env)
    assert code not in (0, -1)
    assert _one_line_naming(output, "PROMO_DATABASE_URL"), output


# --- 4. Secrets never printed ------------------------------------------------------------------

SECRET_CASES: dict[str, tuple[str, list[str], dict[str, str]]] = {
    # id: (command, the secrets, settings). Several bad settings in one run where the first
    # does not hide the others (a JSON parse error and a bad sealing key do: runs of their own).
    "api-keys-smtp-password-and-port": (
        "serve", [LONG_API_KEY, "short-secret", "Smtp-Passw0rd-Never-Printed"], {
            "PROMO_GRPC_PORT": "x",
            "PROMO_API_KEYS": json.dumps([
                {"name": "crm", "key": LONG_API_KEY, "roles": ["root"]},  # unknown role
                {"name": "ops", "key": "short-secret", "roles": ["admin"]}]),  # too short
            "PROMO_SMTP_HOST": "smtp.example.com", "PROMO_SMTP_FROM": "a@example.com",
            "PROMO_SMTP_PASSWORD": "Smtp-Passw0rd-Never-Printed"}),  # without a username
    "api-keys-not-json": ("serve", [LONG_API_KEY], {
        "PROMO_API_KEYS": f'[{{"name": "crm", "key": "{LONG_API_KEY}", roles: ["admin"]}}]'}),
    "secret-encryption-key-malformed": ("worker", ["Sealing-Key-Never-Printed"], {
        "PROMO_SECRET_ENCRYPTION_KEYS": f"{SECRET_KEY},Sealing-Key-Never-Printed"}),
    "database-password-unreachable": ("serve", [DB_PASSWORD], {
        "PROMO_DATABASE_URL": f"postgresql://promo:{DB_PASSWORD}@127.0.0.1:{{free}}/promo"}),
    "database-password-bad-port": ("migrate", [DB_PASSWORD], {
        "PROMO_DATABASE_URL": f"postgresql://promo:{DB_PASSWORD}@127.0.0.1:notaport/promo"}),
    "redis-password-bad-port": ("worker", [REDIS_PASSWORD], {
        "PROMO_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:notaport/0"}),
}


@pytest.mark.parametrize("case", list(SECRET_CASES))
async def test_a_refused_or_failed_start_never_prints_a_secret(case: str, services: Any,
                                                              queue_name: str) -> None:
    """README "Settings": "These lines name the setting, never its value, so an API key or
    password in a bad setting is not printed"; PROMO_SMTP_PASSWORD "a secret, never logged"."""
    command, secrets, values = SECRET_CASES[case]
    filled = {k: v.replace("{free}", str(free_port())) for k, v in values.items()}
    env = _base_env(services.database_url, services.redis_url, PROMO_QUEUE_NAME=queue_name,
                    **filled)
    code, output = await _run([command], env)
    assert code not in (0, -1), output
    assert [secret for secret in secrets if secret in output] == []
    if case == "api-keys-smtp-password-and-port":  # every problem reported, each on its line
        assert code == 2 and len(output.splitlines()) == 4, output


async def test_a_config_file_with_a_bad_value_never_prints_its_api_key(
        tmp_path: Path) -> None:
    """The same through PROMO_CONFIG_FILE (pydantic's own error text would quote the input)."""
    config = tmp_path / "promo.toml"
    config.write_text(f'[[api_keys]]\nname = "crm"\nkey = "{LONG_API_KEY}"\n'
                      'roles = ["root"]\n')
    code, output = await _run(["serve"], _base_env(PROMO_CONFIG_FILE=str(config),
                                                   PROMO_DATABASE_URL="postgresql://x@h/db"))
    assert code == 2, output
    assert output.splitlines() == [
        "invalid settings: PROMO_API_KEYS[0].roles: unknown role(s) ['root']; known roles are "
        "['admin', 'listener', 'runtime']"], output
    assert LONG_API_KEY not in output


# --- More defects found in the settings' checks ------------------------------------------------

def test_the_same_api_key_listed_twice_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(api_keys=[{"name": "crm-admin", "key": LONG_API_KEY, "roles": ["admin"]},
                           {"name": "promo-system", "key": LONG_API_KEY, "roles": ["runtime"]}])
    lines = settings_problems(refused.value)
    assert any(line.startswith("PROMO_API_KEYS") for line in lines), lines
    assert LONG_API_KEY not in "\n".join(lines)


def test_an_api_key_with_surrounding_spaces_is_refused_or_works() -> None:
    try:
        settings = Settings(api_keys=[{"name": "crm", "key": f" {LONG_API_KEY} ",
                                       "roles": ["admin"]}])
    except ValidationError as exc:
        assert all(LONG_API_KEY not in line for line in settings_problems(exc))
        return
    auth = Authenticator(settings.api_keys, {})
    presented = Authenticator.presented_key([("x-api-key", f" {LONG_API_KEY} ")])
    assert auth.authenticate(presented).name == "crm"


def test_smtp_credentials_without_a_host_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = _problems(monkeypatch, PROMO_SMTP_USERNAME="promo",
                         PROMO_SMTP_PASSWORD="Smtp-Passw0rd-Never-Printed",
                         PROMO_SMTP_FROM="alerts@example.com")
    assert any("PROMO_SMTP_HOST" in line for line in problems), problems
    assert all("Smtp-Passw0rd-Never-Printed" not in line for line in problems)


@pytest.mark.parametrize("source", ["empty-variable", "config-file"])
def test_the_cli_finds_the_admin_key_where_promo_up_writes_it(
        source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cli.client import local_admin_key
    from cli.main import ADMIN_KEY_FILE

    for key in list(os.environ):
        if key.startswith("PROMO_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    if source == "empty-variable":
        monkeypatch.setenv("PROMO_DATA_DIR", "")
    else:
        (tmp_path / "promo.toml").write_text('data_dir = "elsewhere"\n')
        monkeypatch.setenv("PROMO_CONFIG_FILE", str(tmp_path / "promo.toml"))
    data_dir = Settings().data_dir  # where `promo up` keeps its admin key
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / ADMIN_KEY_FILE).write_text(LONG_API_KEY + "\n")
    assert local_admin_key() == LONG_API_KEY


HUGE = {
    "clearance_lead_seconds": 1e12,
    "job_lease_seconds": 10**12,
    "webhook_deadline_seconds": 10**12,
    "outbox_job_retention_days": 1_000_000,
}


@pytest.mark.parametrize("name", list(HUGE))
async def test_a_huge_duration_is_refused_at_load_or_works(
        name: str, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    value = HUGE[name]
    try:
        Settings(**{name: value})
    except ValidationError as exc:
        assert any(line.startswith(f"PROMO_{name.upper()}") for line in settings_problems(exc))
        return
    tuned = settings.model_copy(update={name: value})
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": tuned, "redis": None}
    if name == "clearance_lead_seconds":
        async with serving_api(tuned, pool, clock) as api:
            await reward_type(api)
            await promotion(api)
            await create_campaign(api, "c", clock.now() + timedelta(hours=2), customers=["c1"])
    elif name == "job_lease_seconds":
        async with pool.acquire() as conn:
            job_id = await outbox.add_job(conn, kind="no.such.kind", payload={},
                                          due_at=clock.now())
        assert await run_outbox_job(ctx, job_id) == "dead"
    elif name == "webhook_deadline_seconds":
        await add_listener(pool, hook.url, now=clock.now())
        emitted = await emit(pool, clock)
        async with worker_ctx(tuned, pool, clock) as wctx:
            await run_outbox_job(wctx, emitted.outbox_job_ids[0])
        assert (await delivery(pool)).status.value == "DELIVERED"
    else:
        await retention.purge_retention(ctx)
