"""The signing helper listeners use (and its plain-Python twin in docs/webhooks.md), and the pure
event rules beside it: URLs, delivery outcomes, the JSON envelope."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidArgument
from core.events import (
    PAYLOAD_FIELDS,
    Envelope,
    EventType,
    Outcome,
    classify_status,
    parse_event_type,
    validate_listener_url,
    validate_secret,
)
from core.webhook_signature import (
    BadSignature,
    MalformedHeader,
    MissingHeader,
    StaleTimestamp,
    parse_signatures,
    sign,
    signature_header,
    verify,
)

SECRET = "whsec-0123456789abcdef"
BODY = b'{"event_id":"e1","event_type":5,"data":{}}'
NOW = 1_790_000_000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def headers(signature: str, timestamp: int = NOW) -> dict[str, str]:
    return {"Promo-Timestamp": str(timestamp), "Promo-Signature": signature,
            "Promo-Event-Id": "e1"}


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, NOW, BODY) == expected
    assert sign(SECRET.encode(), NOW, BODY) == expected
    assert signature_header(SECRET, NOW, BODY) == f"v1={expected}"


def test_a_valid_request_verifies() -> None:
    verify(SECRET, headers(signature_header(SECRET, NOW, BODY)), BODY, now=NOW + 299)


def test_header_names_are_matched_without_case() -> None:
    lowered = {k.lower(): v for k, v in headers(signature_header(SECRET, NOW, BODY)).items()}
    verify(SECRET, lowered, BODY, now=NOW)


@pytest.mark.parametrize("tampered", [
    BODY + b" ", BODY.replace(b"5", b"6"), b"",
])
def test_a_changed_body_is_a_bad_signature(tampered: bytes) -> None:
    with pytest.raises(BadSignature, match="no signature matches"):
        verify(SECRET, headers(signature_header(SECRET, NOW, BODY)), tampered, now=NOW)


def test_a_wrong_secret_or_a_changed_timestamp_is_a_bad_signature() -> None:
    with pytest.raises(BadSignature):
        verify("another-secret-000000", headers(signature_header(SECRET, NOW, BODY)), BODY,
               now=NOW)
    with pytest.raises(BadSignature):  # the timestamp is signed: moving it breaks the signature
        verify(SECRET, headers(signature_header(SECRET, NOW, BODY), NOW + 1), BODY, now=NOW)


@pytest.mark.parametrize("offset", [301, -301, 10_000])
def test_a_stale_or_future_timestamp_is_refused(offset: int) -> None:
    signed = headers(signature_header(SECRET, NOW, BODY))
    with pytest.raises(StaleTimestamp, match="at most 300 s"):
        verify(SECRET, signed, BODY, now=NOW + offset)
    verify(SECRET, signed, BODY, now=NOW + offset, tolerance_seconds=abs(offset))


@pytest.mark.parametrize("missing", ["Promo-Timestamp", "Promo-Signature"])
def test_a_missing_header_is_named(missing: str) -> None:
    incomplete = headers(signature_header(SECRET, NOW, BODY))
    del incomplete[missing]
    with pytest.raises(MissingHeader, match=missing):
        verify(SECRET, incomplete, BODY, now=NOW)
    incomplete[missing] = "  "
    with pytest.raises(MissingHeader):
        verify(SECRET, incomplete, BODY, now=NOW)


@pytest.mark.parametrize(("timestamp", "signature"), [
    ("yesterday", "v1=abc"), ("-5", "v1=abc"), ("1.5", "v1=abc"),
    (str(NOW), "sha256=abc"), (str(NOW), "v1="), (str(NOW), "garbage"),
])
def test_malformed_headers_are_refused(timestamp: str, signature: str) -> None:
    with pytest.raises(MalformedHeader):
        verify(SECRET, {"Promo-Timestamp": timestamp, "Promo-Signature": signature}, BODY,
               now=NOW)


def test_several_v1_values_during_a_rotation() -> None:
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    header = signature_header([new, old], NOW, BODY)
    assert header.count("v1=") == 2 and header.startswith(f"v1={sign(new, NOW, BODY)}, ")
    verify(old, headers(header), BODY, now=NOW)  # a listener still on the old secret
    verify(new, headers(header), BODY, now=NOW)  # one that switched already
    verify([new, old], headers(signature_header(old, NOW, BODY)), BODY, now=NOW)
    with pytest.raises(BadSignature):
        verify("third-secret-0123456789", headers(header), BODY, now=NOW)
    # Unknown schemes are skipped, separators may be commas and/or spaces.
    mixed = f"v0=dead, v2=beef v1={sign(new, NOW, BODY)}"
    assert parse_signatures(mixed) == [sign(new, NOW, BODY)]
    verify(new, headers(mixed), BODY, now=NOW)


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    header = signature_header(["a-secret-0123456789a", "b-secret-0123456789b"], NOW, BODY)
    verify(["a-secret-0123456789a", "c-secret-0123456789c"], headers(header), BODY, now=NOW)
    assert len(calls) == 4  # every pair, no early exit


def test_empty_secrets_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        sign("", NOW, BODY)
    with pytest.raises(ValueError):
        verify([], headers("v1=ab"), BODY, now=NOW)


def _docs_block(marker: str) -> str:
    text = DOCS.read_text()
    match = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/webhooks.md has no python block after {marker!r}"
    return match.group(1)


def test_the_plain_python_verifier_in_the_docs_agrees() -> None:
    namespace: dict[str, Any] = {}
    exec(_docs_block("<!-- plain-python -->"), namespace)
    check = namespace["verify_promo_webhook"]
    now = int(time.time())
    good = headers(signature_header(["new-secret-0123456789", SECRET], now, BODY), now)
    assert check(SECRET, good, BODY) is True
    assert check(SECRET, {k.lower(): v for k, v in good.items()}, BODY) is True
    assert check(SECRET, good, BODY + b"x") is False
    assert check("wrong-secret-0123456789", good, BODY) is False
    stale = headers(signature_header(SECRET, now - 600, BODY), now - 600)
    assert check(SECRET, stale, BODY) is False
    assert check(SECRET, {}, BODY) is False


def test_the_listener_in_the_docs_compiles() -> None:
    compile(_docs_block("a complete listener:\n"), "docs/webhooks.md", "exec")


# The pure event rules.

def test_event_numbers_are_stable() -> None:
    assert EventType.SCHEDULED_CAMPAIGN == 5
    assert all(t.value >= 100 for t in EventType if t is not EventType.SCHEDULED_CAMPAIGN)
    assert {t.name: t.value for t in EventType} == {
        "SCHEDULED_CAMPAIGN": 5, "CAMPAIGN_EXECUTED": 100, "CODE_POOL_THRESHOLD": 101,
        "CODE_POOL_DEPLETED": 102, "FALLBACK_CODE_ACTIVE": 103, "BONUS_SKIPPED": 110,
        "BONUS_CALCULATED": 111, "BONUS_ISSUED": 112}
    assert set(PAYLOAD_FIELDS) == set(EventType)
    docs = DOCS.read_text()
    for event_type, fields in PAYLOAD_FIELDS.items():
        row = next(line for line in docs.splitlines()
                   if line.startswith(f"| {event_type.value} | `{event_type.name}`"))
        assert all(f"`{name}`" in row for name in fields), event_type


def test_unknown_event_types_are_refused() -> None:
    assert parse_event_type(111) is EventType.BONUS_CALCULATED
    for value in (0, 1, 6, 99, 113):
        with pytest.raises(InvalidArgument) as err:
            parse_event_type(value)
        assert err.value.reason == "INVALID_EVENT_TYPE"
        assert "5 (SCHEDULED_CAMPAIGN)" in err.value.message


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.DELIVERED), (201, Outcome.DELIVERED), (204, Outcome.DELIVERED),
    (500, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY),
    (408, Outcome.RETRY), (425, Outcome.RETRY), (429, Outcome.RETRY),
    (400, Outcome.REJECTED), (401, Outcome.REJECTED), (404, Outcome.REJECTED),
    (410, Outcome.REJECTED), (301, Outcome.REJECTED), (302, Outcome.REJECTED),
    (100, Outcome.REJECTED),
])
def test_which_answers_are_retried(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/promo", "http://127.0.0.1:8080/x?y=1", "HTTPS://EXAMPLE.COM",
    "https://[::1]:8443/hook",
])
def test_good_urls(url: str) -> None:
    assert validate_listener_url(url) == url


@pytest.mark.parametrize(("url", "fragment"), [
    ("", "required"), ("ftp://h/x", "http or https"), ("mailto:a@b.c", "http or https"),
    ("//h/x", "http or https"), ("https://u@h/x", "user name"), ("https://u:p@h/x", "user name"),
    ("https://h/x#top", "fragment"), ("https://h/x#", "fragment"), ("https://:80/x", "host"),
    ("https://h:0/x", "port 0"), ("https://h:70000/", "not a valid URL"),
    ("https://h/\nx", "control"), ("https://" + "h" * 2050, "at most 2048"),
])
def test_bad_urls(url: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as err:
        validate_listener_url(url)
    assert err.value.reason == "INVALID_URL"


def test_secret_rules() -> None:
    assert validate_secret("x" * 16) == "x" * 16
    for bad in ("x" * 15, "x" * 257, " " + "x" * 20, "x" * 20 + "\n"):
        with pytest.raises(InvalidArgument):
            validate_secret(bad)


def test_the_envelope_is_exact_json() -> None:
    when = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)
    body = Envelope(event_id="e1", event_type=EventType.BONUS_ISSUED, occurred_at=when,
                    data={"amount": Decimal("10.50"), "issued_at": when, "n": 3,
                          "tags": {"b", "a"}, "name": "Bonus é"}).body()
    assert json.loads(body) == {
        "event_id": "e1", "event_type": 112, "occurred_at": "2026-11-22T09:30:00+00:00",
        "data": {"amount": "10.50", "issued_at": "2026-11-22T09:30:00+00:00", "n": 3,
                 "tags": ["a", "b"], "name": "Bonus é"}}
    assert b" " not in body.replace(b"Bonus \xc3\xa9", b"")  # compact, UTF-8


@pytest.mark.parametrize("data", [
    {"amount": float("nan")}, {"when": datetime(2026, 1, 1)}, {"x": object()},
    {"amount": Decimal("Infinity")}, {"nested": [{"v": float("inf")}]},
])
def test_the_envelope_refuses_what_json_cannot_carry_exactly(data: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        Envelope(event_id="e", event_type=EventType.BONUS_ISSUED,
                 occurred_at=datetime.now(UTC), data=data).body()
