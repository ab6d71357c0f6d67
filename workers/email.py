"""E-mail delivery: one event as a plain-text alert to an e-mail listener's recipients, by SMTP.

The e-mail channel shares everything else with webhooks (workers/webhooks.py): the delivery rows,
the attempt log, retries with backoff, the deadline, redelivery and dead-lettering. This module
only builds the message and sends it through the configured relay (PROMO_SMTP_*) with aiosmtplib,
then says what the relay's answer means: 2xx delivered; 4xx ("transient negative completion"),
a lost connection or a timeout retried; 5xx refused for good (FAILED). The subject and the text
come from core.events (email_subject, email_text); the event id travels in a Promo-Event-Id
header so a mail filter or a person can drop repeats (delivery is at least once).

One SMTP connection per message: alerts are few, and a relay closes idle connections anyway.
The password is a SecretStr: it is read only here, when logging in, and never logged.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Any

import aiosmtplib

from config.settings import Settings
from core.events import EventType, Outcome, classify_smtp_code, email_subject, email_text
from core.webhook_signature import HEADER_EVENT_ID, HEADER_EVENT_TYPE

HEADER_DELIVERY_ID = "Promo-Delivery-Id"
HEADER_DELIVERY_ATTEMPT = "Promo-Delivery-Attempt"
MAILER = "promo-engine-alerts/1"


@dataclass(frozen=True)
class EmailJob:
    """What one e-mail attempt needs (read from the claimed delivery)."""

    delivery_id: int
    attempt: int
    event_id: str
    event_type: int
    body: bytes  # the event's JSON, as a webhook would receive it
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class SendResult:
    code: int | None  # the relay's reply code (250 when accepted), None without an answer
    error: str | None
    outcome: Outcome


def enabled(settings: Settings) -> bool:
    """The e-mail channel is on when an SMTP relay is configured."""
    return settings.smtp_host is not None


DISABLED_MESSAGE = ("e-mail delivery is not configured: set PROMO_SMTP_HOST and PROMO_SMTP_FROM "
                    "(see docs/webhooks.md, \"E-mail listeners\")")


def build_message(settings: Settings, job: EmailJob, *, sent_at_header: str) -> EmailMessage:
    """The alert: a subject naming the event and its key facts, a text body listing its data,
    and the event id in a header."""
    event_type: EventType | None
    try:
        event_type = EventType(job.event_type)
    except ValueError:  # a type this version does not know: send the JSON as it is
        event_type = None
    document: Any
    try:
        document = json.loads(job.body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        document = {}
    data: Mapping[str, Any] = document["data"] if isinstance(document.get("data"), dict) else {}
    assert settings.smtp_from is not None
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(job.recipients)
    if event_type is not None:
        message["Subject"] = email_subject(event_type, data)
    else:
        message["Subject"] = f"[promo] Event type {job.event_type}"
    message["Date"] = sent_at_header
    sender_domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or None
    message["Message-ID"] = make_msgid(idstring=f"promo.{job.delivery_id}.{job.attempt}",
                                       domain=sender_domain)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies, please
    message["X-Mailer"] = MAILER
    message[HEADER_EVENT_ID] = job.event_id
    message[HEADER_EVENT_TYPE] = str(job.event_type)
    message[HEADER_DELIVERY_ID] = str(job.delivery_id)
    message[HEADER_DELIVERY_ATTEMPT] = str(job.attempt)
    text = email_text(
        event_type, data, event_id=job.event_id,
        occurred_at=str(document.get("occurred_at", "")), delivery_id=job.delivery_id,
        attempt=job.attempt, body=job.body.decode(errors="replace"),
    ) if event_type is not None else job.body.decode(errors="replace")
    message.set_content(text)
    return message


def _reply(code: int, message: str) -> str:
    return f"SMTP {code}: {' '.join(str(message).split())}"[:500]


def classify_error(exc: BaseException) -> SendResult:
    """What a failed send means. Reply codes decide (4xx retried, 5xx refused for good);
    without a reply (refused connection, lost connection, timeout, TLS trouble) it is retried;
    any other SMTP error (e.g. the relay does not offer STARTTLS or AUTH) is a configuration
    problem that retrying does not fix."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        outcome = (Outcome.RETRY if any(classify_smtp_code(c) is Outcome.RETRY for c in codes)
                   else Outcome.REJECTED)
        detail = "; ".join(f"{r.recipient}: {_reply(r.code, r.message)}"
                           for r in exc.recipients)
        return SendResult(max(codes, default=None), f"all recipients refused: {detail}"[:1000],
                          outcome)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return SendResult(exc.code, _reply(exc.code, exc.message), classify_smtp_code(exc.code))
    if isinstance(exc, TimeoutError):
        return SendResult(None, f"SMTP timeout ({type(exc).__name__}: {exc})", Outcome.RETRY)
    if isinstance(exc, ConnectionError | OSError | ssl.SSLError):
        return SendResult(None, f"{type(exc).__name__}: {exc or 'connection failed'}",
                          Outcome.RETRY)
    if isinstance(exc, aiosmtplib.SMTPException):
        return SendResult(None, f"{type(exc).__name__}: {exc} (check the PROMO_SMTP_* settings)",
                          Outcome.REJECTED)
    raise exc


async def send(settings: Settings, job: EmailJob, *, sent_at_header: str,
               limit_seconds: float) -> SendResult:
    """Send one alert; never raises for SMTP or network trouble."""
    if not enabled(settings):
        return SendResult(None, DISABLED_MESSAGE, Outcome.RETRY)
    assert settings.smtp_from is not None
    message = build_message(settings, job, sent_at_header=sent_at_header)
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
    try:
        # aiosmtplib's timeout is per command; this bounds the whole exchange.
        async with asyncio.timeout(limit_seconds):
            refused, _ = await aiosmtplib.send(
                message, sender=parseaddr(settings.smtp_from)[1],
                recipients=list(job.recipients), hostname=settings.smtp_host,
                port=settings.smtp_port, username=settings.smtp_username, password=password,
                start_tls=settings.smtp_starttls, timeout=limit_seconds)
    except Exception as exc:  # mapped by classify_error; anything unexpected is re-raised
        return classify_error(exc)
    if refused:
        # Accepted for some recipients: it was sent (sending again would repeat it to them).
        detail = "; ".join(f"{rcpt}: {_reply(r.code, r.message)}" for rcpt, r in refused.items())
        return SendResult(250, f"refused for some recipients: {detail}"[:1000],
                          Outcome.DELIVERED)
    return SendResult(250, None, Outcome.DELIVERED)


def date_header(moment: datetime) -> str:
    """An RFC 5322 Date header value."""
    return format_datetime(moment)
