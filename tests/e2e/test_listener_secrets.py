"""Listener secrets at rest, end to end: a real server seals them (PROMO_SECRET_ENCRYPTION_KEYS),
the real worker path (the outbox job runner, and a real arq worker) opens them and signs, a real
HTTP listener on loopback verifies with the plain secret (core.webhook_signature.verify). Key
rotation, `promo secrets reseal`, rows written in clear before, a missing key (retried, never
sent unsigned), the startup warning without a key, and `promo up`'s data-folder key.

Deliveries are driven through ``run_outbox_job`` (the arq entry point) with the test's pinned
clock, which the listener's timestamp check shares; no test waits for time to pass.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from click.testing import Result
from google.protobuf import field_mask_pb2
from grpc import aio
from pydantic import SecretStr
from typer.testing import CliRunner

from cli.main import SECRET_KEY_FILE, _local_secret_key, app
from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from core.secret_box import SecretBox, UnknownKeyError, key_id, sealed_key_id
from core.webhook_signature import HEADER_SIGNATURE, verify
from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc
from server.app import Dependencies, start_server
from storage import webhooks as repo
from storage.listener_secrets import LISTENER_SECRET_PURPOSE
from tests.conftest import ADMIN_KEY, Services, open_for_embedded_user, rpc_error_reason
from tests.integration.test_webhook_delivery import running_worker, wait_until
from tests.webhook_listener import SECRET, WebhookListener, free_port
from workers import webhooks
from workers.outbox import run_outbox_job

ROOT = Path(__file__).resolve().parents[2]
OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
OLD = base64.b64encode(OLD_KEY).decode()
NEW = base64.urlsafe_b64encode(NEW_KEY).decode()  # either alphabet is accepted
OLD_ID, NEW_ID = key_id(OLD_KEY), key_id(NEW_KEY)
ROTATED_SECRET = "rotated-secret-0123456789abcdef"
SCHEDULED = pb.EVENT_TYPE_SCHEDULED_CAMPAIGN
ALREADY = "not due or already done"


def keyed(settings: Settings, keys: str | None) -> Settings:
    return settings.model_copy(update={
        "secret_encryption_keys": SecretStr(keys) if keys else None})


@contextlib.asynccontextmanager
async def serving(settings: Settings, pool: asyncpg.Pool,
                  clock: FixedClock) -> AsyncIterator[pb_grpc.ListenerServiceStub]:
    """A real server with these settings (its keys), and a ListenerService stub to it."""
    running = await start_server(settings, Dependencies(pool=pool, clock=clock))
    channel = aio.insecure_channel(running.address)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        yield pb_grpc.ListenerServiceStub(channel)
    finally:
        await channel.close()
        await running.stop(0)


METADATA = (("x-api-key", ADMIN_KEY),)


async def register(stub: pb_grpc.ListenerServiceStub, url: str, *, request_id: str,
                   secret: str = SECRET) -> pb.RegisterListenerResponse:
    response: pb.RegisterListenerResponse = await stub.RegisterListener(
        pb.RegisterListenerRequest(request_id=request_id, listener=pb.Listener(
            event_type=SCHEDULED, url=url, secret=secret)), metadata=METADATA)
    return response


async def emit(pool: asyncpg.Pool, clock: FixedClock) -> str:
    async with pool.acquire() as conn, conn.transaction():
        emitted = await repo.emit_event(conn, event_type=EventType.SCHEDULED_CAMPAIGN,
                                        now=clock.now(), payload={"campaign_id": "spring"})
    assert emitted is not None
    return emitted.event_id


async def deliver_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    """Run every due delivery job through the outbox runner, as the arq worker would."""
    async with pool.acquire() as conn:
        job_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'webhook.deliver' AND status = 'pending'"
            " AND due_at <= $1 ORDER BY id", clock.now())]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await webhooks.setup(ctx)
    try:
        return [await run_outbox_job(ctx, job_id) for job_id in job_ids]
    finally:
        await webhooks.teardown(ctx)


async def stored(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch(
            "SELECT id, secret, previous_secret, row_to_json(l)::text AS whole"
            " FROM webhook_listeners l ORDER BY id"))


async def insert_clear(pool: asyncpg.Pool, url: str, clock: FixedClock) -> int:
    """A listener as written before encryption existed: the secret in clear."""
    async with pool.acquire() as conn:
        row = await repo.insert_listener(conn, event_type=int(EventType.SCHEDULED_CAMPAIGN),
                                         url=url, secret=SECRET, active=True,
                                         description="from before", now=clock.now())
    return row.id


@contextlib.contextmanager
def restored_logging() -> Any:
    """The CLI configures the root logger on its captured stream: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def promo(*args: str, env: dict[str, str | None]) -> Result:
    """`promo ...` in a thread (this loop keeps running), with the given environment."""
    def invoke() -> Result:
        with restored_logging():
            return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return await asyncio.to_thread(invoke)


async def test_registered_secrets_are_sealed_and_deliveries_verify_with_the_plain_one(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    with_key = keyed(settings, NEW)
    async with serving(with_key, pool, clock) as stub:
        given = await register(stub, listener.url, request_id="given")
        request = pb.RegisterListenerRequest(request_id="generated", listener=pb.Listener(
            event_type=pb.EVENT_TYPE_BONUS_ISSUED, url=listener.url + "?other"))
        generated = await stub.RegisterListener(request, metadata=METADATA)
        assert await stub.RegisterListener(request, metadata=METADATA) == generated  # a retry
    assert len(generated.generated_secret) == 43
    async with pool.acquire() as conn:  # the answer a retry replays keeps it sealed too
        answers = [bytes(r["response"]) for r in await conn.fetch(
            "SELECT response FROM idempotency_keys ORDER BY request_id")]
    assert len(answers) == 2 and b"enc:v1:" in answers[0]  # "generated" sorts first
    assert not any(generated.generated_secret.encode() in answer for answer in answers)
    rows = await stored(pool)
    assert [r["id"] for r in rows] == [given.listener.listener_id,
                                       generated.listener.listener_id]
    for row, plain in zip(rows, [SECRET, generated.generated_secret], strict=True):
        assert row["secret"].startswith(f"enc:v1:{NEW_ID}:")
        assert plain not in row["whole"]  # nowhere in the row
        assert SecretBox([NEW_KEY]).open(row["secret"], purpose=LISTENER_SECRET_PURPOSE) == plain

    event_id = await emit(pool, clock)
    assert await deliver_due(pool, with_key, clock) == ["done"]
    [got] = listener.received
    assert got.event_id == event_id and got.verify_error is None
    verify(SECRET, got.headers, got.body, now=int(clock.now().timestamp()))
    assert got.headers[HEADER_SIGNATURE.lower()].count("v1=") == 1

    # A rotation through the API seals the new secret; the old one moves, still sealed.
    clock.advance(timedelta(minutes=1))
    async with serving(with_key, pool, clock) as stub:
        await stub.UpdateListener(pb.UpdateListenerRequest(
            request_id="rotate", listener=pb.Listener(listener_id=given.listener.listener_id,
                                                      secret=ROTATED_SECRET),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=METADATA)
    row = (await stored(pool))[0]
    assert sealed_key_id(row["secret"]) == NEW_ID
    assert sealed_key_id(row["previous_secret"]) == NEW_ID
    assert SECRET not in row["whole"] and ROTATED_SECRET not in row["whole"]
    await emit(pool, clock)
    assert await deliver_due(pool, with_key, clock) == ["done"]
    latest = listener.received[-1]
    assert latest.verify_error is None
    assert latest.headers[HEADER_SIGNATURE.lower()].count("v1=") == 2  # both, in the grace
    for secret in (ROTATED_SECRET, SECRET):
        verify(secret, latest.headers, latest.body, now=int(clock.now().timestamp()))


async def test_a_real_arq_worker_opens_sealed_secrets(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """The worker process's own wiring (on_startup's box), through arq on real Redis. The
    clock is pinned to the real time: arq defers a job until its due time."""
    clock.set(datetime.now(UTC))
    with_key = keyed(settings, NEW)
    async with serving(with_key, pool, clock) as stub:
        await register(stub, listener.url, request_id="r1")
    await emit(pool, clock)
    async with running_worker(with_key, clock=clock, sweeper=True):
        await wait_until(lambda: _delivered(pool), what="the delivery")
    [got] = listener.received
    assert got.verify_error is None


async def _delivered(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as conn:
        return bool(await conn.fetchval(
            "SELECT bool_and(status = 'DELIVERED') FROM webhook_deliveries"))


async def test_rotation_then_reseal_then_the_old_key_is_gone(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener, database_url: str) -> None:
    # Before: a row in clear (written before encryption), two sealed under the old key, one of
    # them rotated (its previous secret sealed too).
    clear_id = await insert_clear(pool, listener.url + "?clear", clock)
    async with serving(keyed(settings, OLD), pool, clock) as stub:
        first = await register(stub, listener.url + "?a", request_id="a")
        second = await register(stub, listener.url + "?b", request_id="b")
        await stub.UpdateListener(pb.UpdateListenerRequest(
            request_id="rotate", listener=pb.Listener(listener_id=second.listener.listener_id,
                                                      secret=ROTATED_SECRET),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=METADATA)
    listener.secrets = [SECRET, ROTATED_SECRET]

    # The new key goes first; the old one still opens everything, the new one seals.
    rotated = keyed(settings, f"{NEW},{OLD}")
    async with serving(rotated, pool, clock) as stub:
        third = await register(stub, listener.url + "?c", request_id="c")
    assert [sealed_key_id(r["secret"]) for r in await stored(pool)] == [
        None, OLD_ID, OLD_ID, NEW_ID]
    await emit(pool, clock)
    # The first job claims the other three along (one batch); their own runs find them done.
    assert await deliver_due(pool, rotated, clock) == ["done"] + [ALREADY] * 3
    assert len(listener.received) == 4  # the clear row's, both old-key rows' and the new one's
    assert [r.verify_error for r in listener.received] == [None] * 4

    env: dict[str, str | None] = {"PROMO_DATABASE_URL": database_url,
                                  "PROMO_SECRET_ENCRYPTION_KEYS": f"{NEW},{OLD}",
                                  "PROMO_LOG_FORMAT": "text"}
    result = await promo("secrets", "reseal", "--batch-size", "2", env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"resealed 3 listener(s) under key id {NEW_ID}; 1 already were\n"
    rows = await stored(pool)
    assert [r["id"] for r in rows] == [clear_id, first.listener.listener_id,
                                       second.listener.listener_id, third.listener.listener_id]
    new_only = SecretBox([NEW_KEY])
    for row in rows:
        assert sealed_key_id(row["secret"]) == NEW_ID
        assert SECRET not in row["whole"] and ROTATED_SECRET not in row["whole"]
    assert rows[0]["previous_secret"] is None  # NULL stays NULL
    assert sealed_key_id(rows[2]["previous_secret"]) == NEW_ID
    assert new_only.open(rows[2]["secret"], purpose=LISTENER_SECRET_PURPOSE) == ROTATED_SECRET
    assert new_only.open(rows[2]["previous_secret"], purpose=LISTENER_SECRET_PURPOSE) == SECRET
    old_only = SecretBox([OLD_KEY])
    for row in rows:
        with pytest.raises(UnknownKeyError):
            old_only.open(row["secret"], purpose=LISTENER_SECRET_PURPOSE)

    again = await promo("secrets", "reseal", env=env)  # idempotent
    assert again.exit_code == 0, again.output
    assert again.stdout == f"resealed 0 listener(s) under key id {NEW_ID}; 4 already were\n"
    assert await stored(pool) == rows

    # The old key dropped: the new one alone delivers to every listener.
    await emit(pool, clock)
    assert await deliver_due(pool, keyed(settings, NEW), clock) == ["done"] + [ALREADY] * 3
    assert len(listener.received) == 8
    assert [r.verify_error for r in listener.received[4:]] == [None] * 4


async def test_clear_rows_from_before_still_deliver(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    await insert_clear(pool, listener.url, clock)
    await emit(pool, clock)
    assert await deliver_due(pool, keyed(settings, NEW), clock) == ["done"]
    [got] = listener.received
    assert got.verify_error is None
    assert (await stored(pool))[0]["secret"] == SECRET  # a delivery does not rewrite it


@pytest.mark.parametrize(("worker_keys", "known"), [
    (OLD, f"PROMO_SECRET_ENCRYPTION_KEYS has key ids: {OLD_ID}"),
    (None, "PROMO_SECRET_ENCRYPTION_KEYS is not set")], ids=["other-key", "no-key"])
async def test_a_secret_no_key_opens_is_retried_never_sent_unsigned(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, listener: WebhookListener,
        caplog: pytest.LogCaptureFixture, worker_keys: str | None, known: str) -> None:
    with_key = keyed(settings, NEW)
    async with serving(with_key, pool, clock) as stub:
        created = await register(stub, listener.url, request_id="r1")
    await emit(pool, clock)
    missing = keyed(settings, worker_keys)
    with caplog.at_level(logging.INFO):
        assert await deliver_due(pool, missing, clock) == ["pending"]
    assert listener.received == []  # no request reached the listener
    error = f"not sent: secret sealed with key id {NEW_ID}, which is not configured ({known})"
    [delivery] = await _deliveries(pool)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == (
        "PENDING", 1, error)
    assert delivery["listener_id"] == created.listener.listener_id
    async with pool.acquire() as conn:
        [attempt] = await repo.list_attempts(conn, delivery["id"])
        job = await conn.fetchrow("SELECT status, last_error, due_at FROM outbox_jobs")
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, None, error)
    assert attempt.finished_at is not None
    assert job is not None and job["status"] == "pending"
    assert job["last_error"] == f"DeliveryRetry: {error}"
    [logged] = [r for r in caplog.records
                if r.getMessage() == "webhook not sent: the listener's secret cannot be opened"]
    assert logged.levelno == logging.ERROR and f"not sent: {logged.__dict__['error']}" == error
    assert not any(SECRET in r.getMessage() or SECRET in str(vars(r)) for r in caplog.records)

    # The key configured again: the retry goes out, signed.
    clock.set(job["due_at"])
    assert await deliver_due(pool, with_key, clock) == ["done"]
    [got] = listener.received
    assert got.verify_error is None
    [delivery] = await _deliveries(pool)
    assert (delivery["status"], delivery["attempts"]) == ("DELIVERED", 2)


async def _deliveries(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch("SELECT * FROM webhook_deliveries ORDER BY id"))


async def test_reseal_refuses_without_a_key_and_reports_unreadable_rows(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, database_url: str) -> None:
    env: dict[str, str | None] = {"PROMO_DATABASE_URL": database_url,
                                  "PROMO_SECRET_ENCRYPTION_KEYS": None}
    refused = await promo("secrets", "reseal", env=env)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert "PROMO_SECRET_ENCRYPTION_KEYS is not set" in refused.stderr

    async with serving(keyed(settings, OLD), pool, clock) as stub:
        lost = await register(stub, "http://127.0.0.1:9/lost", request_id="lost")
    clear_id = await insert_clear(pool, "http://127.0.0.1:9/clear", clock)
    result = await promo("secrets", "reseal",
                         env={**env, "PROMO_SECRET_ENCRYPTION_KEYS": NEW})  # OLD dropped early
    assert result.exit_code == 1
    assert result.stdout == f"resealed 1 listener(s) under key id {NEW_ID}; 0 already were\n"
    error = " ".join(result.stderr.split())  # rich wraps long lines
    assert (f"listener {lost.listener.listener_id}: secret left as it is: secret sealed with "
            f"key id {OLD_ID}, which is not configured") in error
    assert "1 listener(s) could not be re-sealed" in error
    rows = {r["id"]: r for r in await stored(pool)}
    assert sealed_key_id(rows[lost.listener.listener_id]["secret"]) == OLD_ID  # untouched
    assert sealed_key_id(rows[clear_id]["secret"]) == NEW_ID


async def test_a_bad_key_setting_stops_the_command_and_is_not_echoed(database_url: str) -> None:
    bad = base64.b64encode(b"only-sixteen-byt").decode()
    result = await promo("secrets", "reseal", env={
        "PROMO_DATABASE_URL": database_url, "PROMO_SECRET_ENCRYPTION_KEYS": f"{NEW},{bad}"})
    assert result.exit_code == 2
    error = " ".join(result.stderr.split())
    assert error == ("invalid settings: PROMO_SECRET_ENCRYPTION_KEYS: key 2 of 2 decodes to 16 "
                     "bytes; AES-256 needs 32 (make one with: openssl rand -base64 32)")
    assert bad not in result.output and NEW not in result.output


# Processes: one warning at startup without a key.

WARNING = "PROMO_SECRET_ENCRYPTION_KEYS is not set"


async def _read_until(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"the process exited before logging {text!r}:\n"
                                 + "".join(seen))
        seen.append(line)
        if text in line:
            return


@pytest.mark.parametrize(("command", "ready"), [
    ("serve", "server listening"), ("worker", "worker started"), ("up", "worker started")])
@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "key"])
async def test_one_warning_at_startup_without_a_key(
        database_url: str, services: Services, queue_name: str, command: str, ready: str,
        with_key: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=database_url, PROMO_REDIS_URL=services.redis_url,
               PROMO_QUEUE_NAME=queue_name, PROMO_LOG_FORMAT="text", PROMO_GRPC_PORT="0",
               PROMO_MIGRATE_ON_START="false", PROMO_DB_POOL_MIN_SIZE="1",
               PROMO_METRICS_PORT="0", PROMO_API_KEYS='[{"name": "a", "roles": ["admin"], '
                                                     f'"key": "{ADMIN_KEY}"}}]')
    if with_key:
        env["PROMO_SECRET_ENCRYPTION_KEYS"] = NEW
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", command, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        await asyncio.wait_for(_read_until(proc.stderr, ready, seen), 60)
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = "".join(seen) + rest.decode()
    assert proc.returncode == 0, stderr
    assert stderr.count(WARNING) == (0 if with_key else 1), stderr
    assert NEW not in stderr


def test_promo_up_keeps_one_key_in_the_data_folder(tmp_path: Path) -> None:
    first = _local_secret_key(tmp_path)
    path = tmp_path / SECRET_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == first + "\n"
    assert len(base64.b64decode(first)) == 32
    assert _local_secret_key(tmp_path) == first  # reused on later starts
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match="key 1 of 1 is not base64"):
        _local_secret_key(tmp_path)


async def test_unreadable_previous_secret_outside_the_grace_does_not_block(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """Only the secrets a send signs with are opened: an old previous secret past its grace
    period, sealed with a dropped key, does not stop deliveries."""
    async with serving(keyed(settings, OLD), pool, clock) as stub:
        created = await register(stub, listener.url, request_id="r1")
    async with serving(keyed(settings, f"{NEW},{OLD}"), pool, clock) as stub:
        await stub.UpdateListener(pb.UpdateListenerRequest(
            request_id="rotate", listener=pb.Listener(listener_id=created.listener.listener_id,
                                                      secret=ROTATED_SECRET),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=METADATA)
    listener.secrets = [ROTATED_SECRET]
    clock.advance(timedelta(seconds=settings.webhook_secret_grace_seconds))
    await emit(pool, clock)
    assert await deliver_due(pool, keyed(settings, NEW), clock) == ["done"]
    [got] = listener.received
    assert got.verify_error is None
    assert got.headers[HEADER_SIGNATURE.lower()].count("v1=") == 1


@pytest.mark.embedded
def test_promo_up_with_embedded_postgres_seals_with_the_data_folder_key(tmp_path: Path) -> None:
    """`promo up` on the zero-setup path: no key configured, yet nothing is stored in clear and
    no warning is logged; the key is the data folder's `secret-key` (mode 0600)."""
    if os.geteuid() == 0 and not os.environ.get("PROMO_EMBEDDED_PG_USER"):
        pytest.skip("running as root: set PROMO_EMBEDDED_PG_USER to an unprivileged user")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    open_for_embedded_user(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATA_DIR=str(data_dir), PROMO_GRPC_PORT=str(free_port()),
               PROMO_LOG_FORMAT="text", PROMO_SHUTDOWN_GRACE_SECONDS="2",
               PROMO_METRICS_PORT="0")
    if os.environ.get("PROMO_EMBEDDED_PG_USER"):
        env["PROMO_EMBEDDED_PG_USER"] = os.environ["PROMO_EMBEDDED_PG_USER"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        assert proc.stdout is not None
        fields: dict[str, str] = {}
        while True:
            line = proc.stdout.readline()
            assert line, "promo up did not come up:\n" + "".join(output)
            output.append(line)
            for name in ("gRPC on", "embedded PostgreSQL:", "admin API key:"):
                if name in line:
                    fields[name] = line.split(name, 1)[1].split()[0]
            if "press Ctrl-C to stop" in line:
                break
        key_file = data_dir / SECRET_KEY_FILE
        assert f"listener secrets sealed with the key in {key_file}\n" in output
        assert key_file.stat().st_mode & 0o777 == 0o600
        [key] = [base64.b64decode(key_file.read_text())]
        with grpc.insecure_channel(fields["gRPC on"]) as channel:
            pb_grpc.ListenerServiceStub(channel).RegisterListener(
                pb.RegisterListenerRequest(request_id="r1", listener=pb.Listener(
                    event_type=SCHEDULED, url="https://hooks.example.com/x", secret=SECRET)),
                metadata=(("x-api-key", fields["admin API key:"]),), timeout=10)

        async def row() -> asyncpg.Record:
            conn = await asyncpg.connect(fields["embedded PostgreSQL:"])
            try:
                found = await conn.fetchrow("SELECT secret FROM webhook_listeners")
            finally:
                await conn.close()
            assert found is not None
            return found

        sealed = asyncio.run(row())["secret"]
        assert sealed_key_id(sealed) == key_id(key)
        assert SecretBox([key]).open(sealed, purpose=LISTENER_SECRET_PURPOSE) == SECRET
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
        assert proc.returncode == 0, "".join(output)
        assert WARNING not in "".join(output)
        assert key_file.read_text() not in "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_replaying_a_generated_secret_needs_its_key(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    request = pb.RegisterListenerRequest(request_id="gen", listener=pb.Listener(
        event_type=SCHEDULED, url="https://hooks.example.com/x"))
    async with serving(keyed(settings, OLD), pool, clock) as stub:
        first = await stub.RegisterListener(request, metadata=METADATA)
    async with serving(keyed(settings, f"{NEW},{OLD}"), pool, clock) as stub:
        assert await stub.RegisterListener(request, metadata=METADATA) == first
    async with serving(keyed(settings, NEW), pool, clock) as stub:
        with pytest.raises(grpc.RpcError) as err:
            await stub.RegisterListener(request, metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "SECRET_KEY_NOT_CONFIGURED"
    assert err.value.details() == (
        f"the answer to this request_id cannot be replayed: secret sealed with key id {OLD_ID}, "
        f"which is not configured (PROMO_SECRET_ENCRYPTION_KEYS has key ids: {NEW_ID}); "
        "generate a new secret with UpdateListener (a new request_id)")
    assert first.generated_secret not in str(err.value)
