"""E-mail delivery end to end below the API: emit in a transaction, a real arq worker on real
Redis, real SMTP (aiosmtplib) to a real local SMTP server (aiosmtpd, in its own thread) that
records what it accepts. Covers the message itself (subject, text, headers), a relay that is
down then up, transient (4xx) and permanent (5xx) refusals, recipients refused, STARTTLS with
login, and a worker without SMTP settings."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from arq.connections import ArqRedis
from pydantic import SecretStr

from config.settings import Settings
from core.events import Channel, EventType, email_subject
from storage import webhooks as repo
from tests.integration.test_webhook_delivery import (
    add_listener,
    attempts,
    deliveries,
    emit,
    outbox_row,
    running_worker,
    settled,
    wait_until,
)
from tests.webhook_listener import WebhookListener, free_port

FROM = "Promo alerts <alerts@promo.example.com>"
RECIPIENTS = ["ops@example.com", "marketing.lead+promo@example.org"]
THRESHOLD = {"promotion_code": "LOYALTY10", "remaining": 40, "total": 1000, "threshold": "50"}


@dataclass
class Accepted:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class Relay:
    """What the SMTP server does: answers to DATA from a script (default 250), refused
    recipients, and the messages it accepted."""

    data_replies: deque[str] = field(default_factory=deque)
    refused: dict[str, str] = field(default_factory=dict)
    accepted: list[Accepted] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    data_calls: int = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refused:
            return self.refused[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> str:
        self.data_calls += 1
        reply = self.data_replies.popleft() if self.data_replies else "250 OK: queued"
        if reply.startswith("250"):
            content = envelope.original_content or envelope.content
            assert isinstance(content, bytes)
            message = message_from_bytes(content, policy=policy.default)
            assert isinstance(message, EmailMessage)
            self.accepted.append(Accepted(str(envelope.mail_from), list(envelope.rcpt_tos),
                                          message))
        return reply

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = (auth_data.login.decode(), auth_data.password.decode())
        self.logins.append(login)
        return AuthResult(success=login == ("promo", "relay-password-123"))


@contextlib.contextmanager
def smtp_server(relay: Relay, port: int, **kwargs: Any) -> Iterator[Controller]:
    controller = Controller(relay, hostname="127.0.0.1", port=port, ready_timeout=5, **kwargs)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def relay() -> Relay:
    return Relay()


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def mail(settings: Settings, smtp_port: int) -> Settings:
    """A worker that sends e-mail to the local relay; retries in tens of milliseconds."""
    return settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_from": FROM,
        "smtp_starttls": False, "smtp_timeout_seconds": 2.0})


async def add_email_listener(pool: asyncpg.Pool, recipients: list[str] | None = None, *,
                             event_type: EventType = EventType.CODE_POOL_THRESHOLD) -> int:
    async with pool.acquire() as conn:
        row = await repo.insert_listener(
            conn, event_type=int(event_type), url="", secret="", active=True,
            description="alerts", now=datetime.now(UTC), channel=Channel.EMAIL,
            email_recipients=recipients or RECIPIENTS)
    assert row.channel is Channel.EMAIL and list(row.email_recipients) == (recipients
                                                                          or RECIPIENTS)
    return row.id


async def emit_threshold(pool: asyncpg.Pool, redis: ArqRedis | None,
                         settings: Settings) -> repo.EmittedEvent:
    emitted = await emit(pool, redis, settings, event_type=EventType.CODE_POOL_THRESHOLD,
                         payload=dict(THRESHOLD))
    assert emitted is not None and len(emitted.outbox_job_ids) == 1
    return emitted


async def test_an_alert_email_reaches_every_recipient(mail: Settings, pool: asyncpg.Pool,
                                                      arq_redis: ArqRedis, relay: Relay,
                                                      smtp_port: int) -> None:
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port):
        emitted = await emit_threshold(pool, arq_redis, mail)
        async with running_worker(mail):
            await wait_until(lambda: settled(pool), what="e-mail delivery")
    [got] = relay.accepted
    assert got.mail_from == "alerts@promo.example.com"
    assert got.rcpt_tos == RECIPIENTS
    message = got.message
    assert message["Subject"] == "[promo] Code pool threshold: LOYALTY10 has 40 codes left"
    assert message["From"] == FROM
    assert message["To"] == ", ".join(RECIPIENTS)
    assert message["Promo-Event-Id"] == emitted.event_id
    assert message["Promo-Event-Type"] == "101"
    assert message["Promo-Delivery-Attempt"] == "1"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@promo.example.com>")
    assert message["Date"] is not None
    assert message.get_content_type() == "text/plain"
    text = message.get_content()
    lines = text.splitlines()
    assert lines[0] == "Code pool threshold (event type 101)"
    assert "promotion_code: LOYALTY10" in lines
    assert "remaining:      40" in lines and "total:          1000" in lines
    assert "threshold:      50" in lines
    assert f"Event id:    {emitted.event_id}" in lines
    assert f'"event_id":"{emitted.event_id}"' in text  # the webhook's JSON, after the text

    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == (
        "DELIVERED", 1, 250, None)
    [attempt] = await attempts(pool, row["id"])
    assert attempt.url == "mailto:" + ",".join(RECIPIENTS)
    assert (attempt.status_code, attempt.error) == (250, None)
    assert (await outbox_row(pool, emitted.outbox_job_ids[0]))["status"] == "done"


async def test_a_relay_that_is_down_gets_the_alert_when_it_is_back(
        mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, relay: Relay,
        smtp_port: int) -> None:
    await add_email_listener(pool)
    emitted = await emit_threshold(pool, arq_redis, mail)  # nothing listens on smtp_port yet

    async def failed_twice() -> bool:
        # Two attempts logged as refused (the row's counter also counts one in flight).
        rows = await deliveries(pool)
        return bool(rows) and len([a for a in await attempts(pool, rows[0]["id"])
                                   if a.status_code is None and a.error]) >= 2

    async with running_worker(mail):
        await wait_until(failed_twice, what="two refused connections")
        [row] = await deliveries(pool)
        assert row["status"] == "PENDING" and row["last_status_code"] is None
        assert "onnect" in row["last_error"]  # SMTPConnectError: ... connection refused
        with smtp_server(relay, smtp_port):
            await wait_until(lambda: settled(pool), what="delivery once the relay is back")
    [row] = await deliveries(pool)
    assert row["status"] == "DELIVERED" and row["attempts"] >= 3
    logged = await attempts(pool, row["id"])
    assert [a.status_code for a in logged][-1] == 250
    assert all(a.status_code is None and a.error for a in logged[:-1])
    assert [a.message["Promo-Event-Id"] for a in relay.accepted] == [emitted.event_id]
    job = await outbox_row(pool, emitted.outbox_job_ids[0])
    assert (job["status"], job["attempts"]) == ("done", row["attempts"])


async def test_a_4xx_reply_is_retried(mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
                                      relay: Relay, smtp_port: int) -> None:
    relay.data_replies.append("451 4.3.0 Mailbox temporarily full, try again later")
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port):
        emitted = await emit_threshold(pool, arq_redis, mail)
        async with running_worker(mail):
            await wait_until(lambda: settled(pool), what="delivery on the second attempt")
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("DELIVERED", 2, 250)
    first, second = await attempts(pool, row["id"])
    assert first.status_code == 451
    assert first.error == "SMTP 451: 4.3.0 Mailbox temporarily full, try again later"
    assert second.status_code == 250
    assert [a.message["Promo-Event-Id"] for a in relay.accepted] == [emitted.event_id]
    assert [a.message["Promo-Delivery-Attempt"] for a in relay.accepted] == ["2"]


async def test_a_5xx_reply_fails_without_retry(mail: Settings, pool: asyncpg.Pool,
                                               arq_redis: ArqRedis, relay: Relay,
                                               smtp_port: int) -> None:
    relay.data_replies.append("554 5.7.1 Message rejected as spam")
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port):
        emitted = await emit_threshold(pool, arq_redis, mail)
        async with running_worker(mail):
            await wait_until(lambda: settled(pool), what="permanent failure")
            await asyncio.sleep(0.3)  # room for a (wrong) retry to show up
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("FAILED", 1, 554)
    assert row["last_error"] == "SMTP 554: 5.7.1 Message rejected as spam"
    assert relay.data_calls == 1 and relay.accepted == []
    job = await outbox_row(pool, emitted.outbox_job_ids[0])
    assert (job["status"], job["attempts"]) == ("dead", 1)
    assert "listener refused the delivery: SMTP 554" in job["last_error"]


async def test_recipients_refused(mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
                                  relay: Relay, smtp_port: int) -> None:
    """One refused recipient: sent to the others (sending again would repeat it to them), the
    refusal noted. Every recipient refused for good: FAILED."""
    relay.refused[RECIPIENTS[1]] = "550 5.1.1 No such user"
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port):
        await emit_threshold(pool, arq_redis, mail)
        async with running_worker(mail):
            await wait_until(lambda: settled(pool), what="partial delivery")
            [row] = await deliveries(pool)
            assert (row["status"], row["last_status_code"]) == ("DELIVERED", 250)
            assert row["last_error"] == (f"refused for some recipients: {RECIPIENTS[1]}: "
                                         "SMTP 550: 5.1.1 No such user")
            assert [a.rcpt_tos for a in relay.accepted] == [[RECIPIENTS[0]]]

            relay.refused[RECIPIENTS[0]] = "550 5.1.1 No such user"
            await emit_threshold(pool, arq_redis, mail)
            await wait_until(lambda: settled(pool), what="refusal")
    _, second = await deliveries(pool)
    assert (second["status"], second["attempts"], second["last_status_code"]) == (
        "FAILED", 1, 550)
    assert second["last_error"].startswith("all recipients refused: ops@example.com: SMTP 550")


async def test_starttls_and_login(mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
                                  relay: Relay, smtp_port: int, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The default: STARTTLS required (certificate verified), then AUTH with the configured
    user name and password."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the worker trusts the test's CA
    secure = mail.model_copy(update={
        "smtp_starttls": True, "smtp_username": "promo",
        "smtp_password": SecretStr("relay-password-123")})
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port, tls_context=server_context, require_starttls=True,
                     auth_required=True, authenticator=relay.authenticate):
        emitted = await emit_threshold(pool, arq_redis, secure)
        async with running_worker(secure):
            await wait_until(lambda: settled(pool), what="delivery over STARTTLS")
    [row] = await deliveries(pool)
    assert row["status"] == "DELIVERED", row["last_error"]
    assert relay.logins == [("promo", "relay-password-123")]
    assert [a.message["Promo-Event-Id"] for a in relay.accepted] == [emitted.event_id]


async def test_a_relay_without_starttls_is_refused_when_starttls_is_required(
        mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, relay: Relay,
        smtp_port: int) -> None:
    """PROMO_SMTP_STARTTLS=true (the default) never falls back to plain text."""
    strict = mail.model_copy(update={"smtp_starttls": True})
    await add_email_listener(pool)
    with smtp_server(relay, smtp_port):
        await emit_threshold(pool, arq_redis, strict)
        async with running_worker(strict):
            await wait_until(lambda: settled(pool), what="refusal")
    [row] = await deliveries(pool)
    assert row["status"] == "FAILED" and relay.accepted == []
    assert "STARTTLS" in row["last_error"] and "PROMO_SMTP_" in row["last_error"]


async def test_a_worker_without_smtp_settings_keeps_the_alert_pending(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """The listener was registered while e-mail was configured; this worker has no relay: the
    attempt is logged and retried (another worker, or this one once configured, sends it)."""
    await add_email_listener(pool)
    await emit_threshold(pool, arq_redis, settings)

    async def tried() -> bool:
        # The attempt is counted when it starts, its error recorded when it ends: wait for both.
        [row] = await deliveries(pool)
        return bool(row["attempts"] >= 1 and row["last_error"] is not None)

    async with running_worker(settings):
        await wait_until(tried, what="an attempt")
    [row] = await deliveries(pool)
    assert row["status"] == "PENDING"
    assert row["last_error"].startswith("e-mail delivery is not configured")


async def test_one_event_to_a_webhook_and_an_email_listener(
        mail: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, relay: Relay,
        smtp_port: int) -> None:
    """Both channels in one batch: the same event id in the POST and in the e-mail."""
    hook = await WebhookListener().start()
    try:
        await add_listener(pool, hook.url, event_type=EventType.CODE_POOL_THRESHOLD)
        await add_email_listener(pool)
        with smtp_server(relay, smtp_port):
            emitted = await emit(pool, arq_redis, mail, event_type=EventType.CODE_POOL_THRESHOLD,
                                 payload=dict(THRESHOLD))
            assert emitted is not None and len(emitted.outbox_job_ids) == 2
            async with running_worker(mail):
                await wait_until(lambda: settled(pool), what="both deliveries")
    finally:
        await hook.stop()
    assert [(r["status"], r["attempts"]) for r in await deliveries(pool)] == [
        ("DELIVERED", 1)] * 2
    assert [r.event_id for r in hook.received] == [emitted.event_id]
    assert [a.message["Promo-Event-Id"] for a in relay.accepted] == [emitted.event_id]


@pytest.mark.parametrize(("event_type", "data", "subject"), [
    (EventType.SCHEDULED_CAMPAIGN,
     {"campaign_id": "spring", "name": "Spring reload",
      "clearance_required_by": "2026-11-22T10:00:00+00:00"},
     "[promo] Campaign awaiting clearance: Spring reload needs approvals by "
     "2026-11-22T10:00:00+00:00"),
    (EventType.CAMPAIGN_EXECUTED,
     {"campaign_id": "spring", "name": "Spring reload", "approved_count": 10,
      "rejected_count": 2},
     "[promo] Campaign executed: Spring reload: 10 approved, 2 rejected"),
    (EventType.CODE_POOL_THRESHOLD, THRESHOLD,
     "[promo] Code pool threshold: LOYALTY10 has 40 codes left"),
    (EventType.CODE_POOL_DEPLETED,
     {"promotion_code": "LOYALTY10", "total": 1000, "fallback_code_active": True,
      "promotion_paused": False},
     "[promo] Code pool depleted: LOYALTY10 has no codes left; the fallback code is active"),
    (EventType.CODE_POOL_DEPLETED,
     {"promotion_code": "LOYALTY10", "fallback_code_active": False, "promotion_paused": True},
     "[promo] Code pool depleted: LOYALTY10 has no codes left; the promotion is paused"),
    (EventType.FALLBACK_CODE_ACTIVE, {"promotion_code": "LOYALTY10", "fallback_code": "THANKS"},
     "[promo] Fallback code active: LOYALTY10 now hands out THANKS"),
    (EventType.BONUS_SKIPPED, {"customer_id": "c-1", "reason": "NO_RESULT"},
     "[promo] Bonus skipped: customer c-1 (NO_RESULT)"),
    (EventType.BONUS_CALCULATED, {"customer_id": "c-1", "amount": "12.50", "currency": "EUR"},
     "[promo] Bonus calculated: 12.50 EUR for customer c-1"),
    (EventType.BONUS_ISSUED, {"customer_id": "c-1", "amount": "12.50", "currency": "EUR"},
     "[promo] Bonus issued: 12.50 EUR to customer c-1"),
    (EventType.BONUS_ISSUED, {}, "[promo] Bonus issued"),  # key facts missing: the title only
    (EventType.CODE_POOL_THRESHOLD, {"promotion_code": "A\r\nBcc: x@evil.example",
                                     "remaining": 1},
     "[promo] Code pool threshold: A Bcc: x@evil.example has 1 codes left"),  # one line
])
def test_subjects_name_the_event_and_its_key_facts(event_type: EventType, data: dict[str, Any],
                                                  subject: str) -> None:
    assert email_subject(event_type, data) == subject
    assert len(email_subject(event_type, {"promotion_code": "X" * 500, "remaining": 1})) <= 200
