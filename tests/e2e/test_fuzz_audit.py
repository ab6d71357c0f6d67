"""Hostile-input audit: no request a client can send gets INTERNAL or UNKNOWN.

Every RPC of every service (found from the generated descriptors, so a new one cannot be
forgotten) is called with a VALID request first (checked to be OK, so that mutations reach deep
validation and storage rather than the first missing-field check), then with that request
mutated one field at a time: every field of the request, nested messages, repeated elements and
map entries included, gets the hostile values of its type (empty/huge/NUL/unicode strings,
decimals spelled oddly, int32/int64 extremes, enum values out of range, Timestamps just outside
their range, repeated fields with thousands of elements or duplicates, map keys that are odd,
field masks with unknown/duplicate/nested paths, formulas nested 500 deep, ...), plus the values
that matter for what the field means (time zones, URLs, local times, formulas, page tokens).

The property checked for every call: the status is never INTERNAL, UNKNOWN, DATA_LOSS,
UNIMPLEMENTED, or DEADLINE_EXCEEDED/UNAVAILABLE/CANCELLED (a crash or a hang), an error carries
a google.rpc ErrorInfo, and an INVALID_ARGUMENT has a non-empty message. A crash is reported with
the exception and the innermost project frame of the traceback the server logged.

Besides the one-field mutations (one test per service): page tokens forged with a correct
checksum but odd keys, Timestamps at the very edges of their range stored and then used by later
calls, formulas that compile then run by GetReward, errors that echo long non-ASCII values, and
hostile call metadata.

Deterministic: every value is from an explicit list; nothing is random. Mutations of one RPC
run IN_FLIGHT at a time (each builds its own resources); a crash is matched to its call by the
x-request-id the call sends. The channel refuses trailers over 8 KiB (gRPC's soft limit, which
a default client applies at random between 8 and 16 KiB), so that outcome is deterministic too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import pkgutil
import re
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor as _d
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc import aio

import promo.v1 as promo_v1
from config.settings import Settings
from core.clock import FixedClock
from core.pagination import _checksum
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import codes_pb2 as codepb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import jobs_pb2 as jpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import products_pb2 as prodpb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import rewards_pb2 as rpb
from server.errors import error_info_of
from server.logs import call_context
from storage import outbox as outbox_repo
from storage import webhooks as webhooks_repo
from tests.conftest import Api, serving_api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import ts
from tests.e2e.code_helpers import codes_file

_CHECKOUT = str(Path(__file__).resolve().parents[2]) + "/"  # where crash frames are ours

CALL_TIMEOUT = 20.0
IN_FLIGHT = 4  # mutations of one RPC called at once (each names its own resources)
BAD_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED", "DEADLINE_EXCEEDED",
             "UNAVAILABLE", "CANCELLED"}


# --- the descriptors ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    path: str
    request_type: Any
    response_type: Any
    client_streaming: bool

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method}"


def _rpcs() -> dict[str, Rpc]:
    found: dict[str, Rpc] = {}
    for info in pkgutil.iter_modules(promo_v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"promo.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpc = Rpc(service.name, method.name, f"/{service.full_name}/{method.name}",
                          getattr(module, method.input_type.name),
                          getattr(module, method.output_type.name), method.client_streaming)
                found[rpc.name] = rpc
    return found


RPCS = _rpcs()
SERVICES = sorted({rpc.service for rpc in RPCS.values()})


# --- hostile values ----------------------------------------------------------------------------

HUGE = "x" * 100_000
STRINGS: list[tuple[str, str]] = [
    ("empty", ""), ("space", " "), ("whitespace", " \t\r\n "), ("NUL", "\x00"),
    ("embedded NUL", "a\x00b"), ("100k chars", HUGE), ("composed e-acute", "\u00e9"),
    ("decomposed e-acute", "e\u0301"), ("RTL override", "\u202eabc"), ("zero width", "\u200b"),
    ("emoji", "\U0001f600" * 3), ("2000 emoji", "\U0001f600" * 2000), ("U+FFFF", "\uffff"),
    ("BOM", "\ufeffabc"), ("control chars", "\x01\x1b[31m\x7f"), ("NaN", "NaN"),
    ("Infinity", "Infinity"), ("1e999999", "1e999999"), ("-0", "-0"), ("1e-999999", "1e-999999"),
    ("0x10", "0x10"), ("leading space 1", " 1"), ("1_000", "1_000"), ("5000 digits", "9" * 5000),
    ("-1", "-1"), ("arabic digits", "\u0661\u0662"), ("fullwidth 1", "\uff11"), ("1e6", "1e6"),
    ("0.0000001", "0.0000001"), ("1E+19", "1E+19"), ("1.", "1."),
    ("sql quote", "'; DROP TABLE x; --"), ("template", "{{x}}"),
]
FORMULAS: list[tuple[str, str]] = [
    ("500 nested parens", "(" * 500 + "1" + ")" * 500),
    ("5000 nested parens", "(" * 5000 + "1" + ")" * 5000),
    ("49 nested parens", "(" * 49 + "last(deposit.amount)" + ")" * 49),
    ("division by zero", "1 / 0"), ("aggregate / 0", "sum(deposit.amount) / 0"),
    ("0/0", "0 / 0"), ("5000 unary minus", "-" * 5000 + "1"),
    ("long sum", "1" + " + 1" * 2400), ("long product", "2" + " * 2" * 2400),
    ("5000 not", "not " * 2000 + "true"), ("huge literal", "9" * 40),
    ("30-digit product", "999999999999999999999999999999 * 999999999999999999999999999999"),
    ("squarings overflow", "\n".join(["a0 = 99999999999999999999"]
                                     + [f"a{i} = a{i - 1} * a{i - 1}" for i in range(1, 20)]
                                     + ["a19"])),
    ("tiny squarings", "\n".join(["a0 = 0.000001"]
                                 + [f"a{i} = a{i - 1} * a{i - 1}" for i in range(1, 20)]
                                 + ["a19 + 1"])),
    ("round 999999999", "round(last(deposit.amount), 999999999)"),
    ("round -1", "round(last(deposit.amount), -1)"),
    ("round 1e30", "round(last(deposit.amount), 1000000000000000000000000000000)"),
    ("cap neg", "cap(last(deposit.amount), -5)"), ("floor huge", "floor(" + "9" * 30 + ")"),
    ("template huge", 'template("' + "t" * 5000 + '")'), ("template empty", 'template("")'),
    ("template NUL", 'template("\x00")'), ("customer NUL prop", 'customer["\x00"]'),
    ("customer huge prop", 'customer["' + "p" * 5000 + '"]'),
    ("string escape", 'customer["\\u0000"]'), ("unterminated", 'customer["abc'),
    ("where huge", 'sum(deposit.amount where game = "' + "g" * 5000 + '")'),
    ("where neg", "sum(deposit.amount where amount > -99999999999999999999999999)"),
    ("where in many", "count(bet where game in (" + ", ".join(f'"g{i}"' for i in range(2000))
     + "))"),
    ("64+ aggregates", " + ".join(f'sum(deposit.amount where g = "{i}")' for i in range(80))),
    ("5000 assignments", "\n".join(f"v{i} = {i}" for i in range(1500)) + "\nv1"),
    ("if chain", "if true then 1 " + "elif true then 1 " * 1500 + "else 2"),
    ("percent huge", "9" * 25 + "%"), ("comment only", "# nothing"), ("skip", "skip"),
    ("unknown func", "foo(1)"), ("comparison chain", "1 < 2 < 3"), ("string result", '"x"'),
    ("bool result", "true"), ("dotted unknown", "x.y.z"),
]
TIME_ZONES: list[tuple[str, str]] = [
    ("tz Mars", "Mars/Phobos"), ("tz path", "../../../../etc/passwd"), ("tz abs", "/etc/localtime"),
    ("tz lower utc", "utc"), ("tz localtime", "localtime"), ("tz posixrules", "posixrules"),
    ("tz Factory", "Factory"), ("tz EST5EDT", "EST5EDT"), ("tz Etc/GMT+14", "Etc/GMT+14"),
    ("tz Etc/GMT-14", "Etc/GMT-14"), ("tz +25:00", "+25:00"), ("tz dot", "."),
    ("tz trailing slash", "Europe/"), ("tz Europe/Berlin/x", "Europe/Berlin/x"),
    ("tz posix", "EST+5EDT,M3.2.0/2,M11.1.0/2"), ("tz Pacific/Kiritimati", "Pacific/Kiritimati"),
    ("tz America/St_Johns", "America/St_Johns"), ("tz zoneinfo dir", "zoneinfo"),
    ("tz right/UTC", "right/UTC"), ("tz posix/UTC", "posix/UTC"), ("tz tzdata.zi", "tzdata.zi"),
    ("tz leapseconds", "leapseconds"), ("tz iso3166.tab", "iso3166.tab"),
    ("tz __init__", "__init__"), ("tz Europe", "Europe"), ("tz backslash", "Europe\\Berlin"),
]
URLS: list[tuple[str, str]] = [
    ("url open bracket", "http://["), ("url bad ipv6", "https://[zz]/"),
    ("url NFKC", "https://a\uff03b.example.com/"),
    ("url huge port", "https://a.example.com:99999999/"),
    ("url port 0", "https://a.example.com:0/"), ("url neg port", "https://a.example.com:-1/"),
    ("url javascript", "javascript:alert(1)"), ("url userinfo", "https://u:p@a.example.com/"),
    ("url fragment", "https://a.example.com/#x"), ("url no host", "https:///path"),
    ("url idna", "https://\u00e9xample.com/"), ("url bad idna", "https://xn--/"),
    ("url huge label", "https://" + "a" * 300 + ".com/"),
    ("url ipv6 zone", "https://[fe80::1%25eth0]/"),
    ("url 2048", "https://a.example.com/" + "p" * 2026),
    ("url 2049", "https://a.example.com/" + "p" * 2027),
    ("url file", "file:///etc/passwd"), ("url localhost", "http://127.0.0.1:6379/"),
]
LOCAL_TIMES: list[tuple[str, str]] = [
    ("24:00", "24:00"), ("25:61", "25:61"), ("06:00:00", "06:00:00"), ("6:0", "6:0"),
    ("99:99", "99:99"), ("-1:00", "-1:00"), ("arabic 06:00", "\u0660\u0666:\u0660\u0660"),
    ("06:00 NUL", "06:00\x00"), ("23:59:60", "23:59:60"), ("T06:00", "T06:00"), ("06", "06"),
    ("06:00Z", "06:00Z"), ("06:00+01:00", "06:00+01:00"), ("06:00.5", "06:00.5"),
]
EMAILS: list[tuple[str, str]] = [
    ("email @", "@"), ("email no at", "ops.example.com"), ("email huge local", "a" * 65 + "@x.com"),
    ("email idna", "ops@\u00e9xample.com"), ("email quoted", '"a b"@x.com'),
    ("email two at", "a@b@c"), ("email newline", "a@x.com\r\nBcc: b@y.com"),
    ("email huge domain", "a@" + "d" * 300 + ".com"),
]
CURRENCIES: list[tuple[str, str]] = [
    ("currency lower", "eur"), ("currency 4", "EURO"), ("currency symbol", "\u20ac"),
    ("currency XXX", "XXX"), ("currency digits", "123"),
]
GARBAGE_TOKENS: list[tuple[str, str]] = [
    ("token not base64", "!!!!"), ("token {}", base64.urlsafe_b64encode(b"{}").decode()),
    ("token []", base64.urlsafe_b64encode(b"[]").decode()),
    ("token deep json", base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()),
    ("token padded", "e30=" + "=" * 10), ("token null", base64.urlsafe_b64encode(b"null").decode()),
    ("token big number",
     base64.urlsafe_b64encode(b'{"a": [1e999999], "f": "x", "c": "y"}').decode()),
    ("token bad utf8", base64.urlsafe_b64encode(b'{"a": ["\xff"], "f": "x", "c": "y"}').decode()),
]
INT32 = [("-1", -1), ("int32 min", -2**31), ("int32 max", 2**31 - 1), ("large", 1_000_000_000)]
INT64 = [("-1", -1), ("int64 min", -2**63), ("int64 max", 2**63 - 1), ("2^53+1", 2**53 + 1),
         ("int32 max+1", 2**31)]
UINT32 = [("uint32 max", 2**32 - 1)]
UINT64 = [("uint64 max", 2**64 - 1)]
TIMESTAMPS: list[tuple[str, tuple[int, int]]] = [
    ("epoch", (0, 0)), ("min valid", (-62_135_596_800, 0)),
    ("max valid", (253_402_300_799, 999_999_999)), ("before year 1", (-62_135_596_801, 0)),
    ("after 9999", (253_402_300_800, 0)), ("nanos -1", (1_795_000_000, -1)),
    ("nanos 1e9", (1_795_000_000, 1_000_000_000)), ("int64 max seconds", (2**63 - 1, 0)),
    ("int64 min seconds", (-2**63, 0)), ("far past valid", (-62_000_000_000, 0)),
    ("year 9999 minus a day", (253_402_214_400, 0)), ("int32 min nanos", (0, -2**31)),
]
MAP_KEYS: list[tuple[str, str]] = [
    ("key empty", ""), ("key space", " "), ("key NUL", "\x00"), ("key 100k", HUGE),
    ("key dotted", "a.b"), ("key dollar", "$where"), ("key unicode", "\u00e9\U0001f600"),
    ("key __proto__", "__proto__"), ("key path", "../x"), ("key newline", "a\nb"),
    ("key 1001", "k" * 1001),
]
BYTES: list[tuple[str, bytes]] = [
    ("bytes empty", b""), ("bytes NUL", b"\x00"), ("bytes invalid utf8", b"\xff\xfe\xfd\n"),
    ("bytes lone surrogate utf8", b"\xed\xa0\x80\n"), ("bytes overlong", b"\xc0\xaf\n"),
    ("bytes BOM", b"\xef\xbb\xbfAAA-1\n"), ("bytes CRLF", b"AAA-1\r\nAAA-2\r\n"),
    ("bytes CR only", b"AAA-1\rAAA-2\r"), ("bytes whitespace", b" \t \n\n"),
    ("bytes 100k line", b"L" * 100_000 + b"\n"), ("bytes NUL in code", b"AA\x00A\n"),
    ("bytes duplicates", b"DUP-1\n" * 1000), ("bytes 50k lines", b"".join(
        b"Z%06d\n" % i for i in range(50_000))), ("bytes comma", b"a,b,c\n"),
    ("bytes unicode", "\u00e9\U0001f600-1\n".encode()), ("bytes control", b"A\x01B\n"),
    ("bytes 5MB", b"M" * (5 * 1024 * 1024)),
]


def _extras(name: str, full: str) -> list[tuple[str, str]]:
    """Values that matter for what the field means, by its name."""
    extra: list[tuple[str, str]] = []
    if name in ("formula", "source", "filter", "qualification_filter", "condition") or \
            full.endswith("tiers.value"):
        extra += FORMULAS
    if name == "time_zone":
        extra += TIME_ZONES
    if name in ("url", "image_url"):
        extra += URLS
    if name == "local_time":
        extra += LOCAL_TIMES
    if name == "email_recipients":
        extra += EMAILS
    if "currency" in name:
        extra += CURRENCIES
    if name == "page_token":
        extra += GARBAGE_TOKENS
    if name in ("grant_id", "job_id", "bonus_ids", "bonus_id", "event_id"):
        extra += [("19 digits", "9" * 19), ("18 nines", "9" * 18), ("int64 max", str(2**63 - 1)),
                  ("int64 max+1", str(2**63)), ("zero", "0"), ("plus", "+5"),
                  ("uuid-ish", str(uuid.UUID(int=1)))]
    if name in ("secret",):
        extra += [("secret 16 unicode", "\u00e9" * 16), ("secret 256", "s" * 256),
                  ("secret 257", "s" * 257), ("secret emoji", "\U0001f600" * 20)]
    if name.endswith("_id") or name.endswith("_ids") or name in ("name", "promotion_code",
                                                                   "promotion_codes", "kind",
                                                                   "kinds", "event_kind",
                                                                   "qualification_kind",
                                                                   "reward_type"):
        extra += [("128 chars", "i" * 128), ("129 chars", "i" * 129), ("200 chars", "i" * 200),
                  ("2705 bytes", "\u00e9" * 1353), ("3000 chars", "i" * 3000),
                  ("upper", "ABC"), ("dots", "..."), ("tab inside", "a\tb"),
                  ("bracket", "a[0]"), ("quote", 'a"b'), ("comma", "a,b"), ("braces", "{a}")]
    return extra


# --- mutations ---------------------------------------------------------------------------------

Step = tuple[str, Any]  # ("f", field name) | ("i", index) | ("k", map key)


def _walk(target: Any, steps: list[Step]) -> Any:
    for kind, key in steps:
        target = getattr(target, key) if kind == "f" else target[key]
    return target


@dataclass(frozen=True)
class Mutation:
    path: str
    label: str
    apply: Callable[[Message], None]


def _setter(steps: list[Step], name: str, value: Any) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        setattr(_walk(root, steps), name, value)
    return apply


def _ts_setter(steps: list[Step], name: str, value: tuple[int, int] | None
               ) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        parent = _walk(root, steps)
        if value is None:
            parent.ClearField(name)
            return
        stamp = getattr(parent, name)
        stamp.seconds, stamp.nanos = value
    return apply


def _repeated_setter(steps: list[Step], name: str, values: list[Any]
                     ) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        container = getattr(_walk(root, steps), name)
        del container[:]
        if values and isinstance(values[0], Message):
            for value in values:
                container.add().CopyFrom(value)
        else:
            container.extend(values)
    return apply


def _element_setter(steps: list[Step], name: str, value: Any) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        container = getattr(_walk(root, steps), name)
        if len(container) == 0:
            container.append(value)
        else:
            container[0] = value
    return apply


def _map_setter(steps: list[Step], name: str, entries: dict[str, Any] | None,
                clear: bool = False) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        container = getattr(_walk(root, steps), name)
        if clear:
            container.clear()
        for key, value in (entries or {}).items():
            if isinstance(value, Message):
                container[key].CopyFrom(value)
            else:
                container[key] = value
    return apply


def _clear(steps: list[Step], name: str) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        _walk(root, steps).ClearField(name)
    return apply


def _set_empty(steps: list[Step], name: str) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        getattr(_walk(root, steps), name).SetInParent()
    return apply


def _mask_values(valid: list[str]) -> list[tuple[str, list[str]]]:
    first = valid[0] if valid else "name"
    return [("mask empty", []), ("mask unknown", ["no_such_field"]),
            ("mask duplicate", [first, first]), ("mask nested", [f"{first}.x"]),
            ("mask star", ["*"]), ("mask empty path", [""]), ("mask upper", [first.upper()]),
            ("mask camel", ["displayName"]), ("mask 100k", [HUGE]), ("mask NUL", ["\x00"]),
            ("mask 2000 paths", [first] * 2000), ("mask output only", ["create_time"]),
            ("mask id field", ["name", "promotion_code", "definition_id", "rule_id",
                               "schedule_id", "listener_id", "backend_id", "discount_id"]),
            ("mask trailing dot", [f"{first}."]), ("mask spaces", [f" {first} "])]


def _enum_values(field_desc: _d.FieldDescriptor, current: int) -> list[tuple[str, int]]:
    values = [("enum 0", 0), ("enum 999", 999), ("enum -1", -1), ("enum int32 max", 2**31 - 1),
              ("enum int32 min", -2**31)]
    values += [(f"enum {v.name}", v.number) for v in field_desc.enum_type.values
               if v.number not in (0, current)]
    return values


_STR = _d.FieldDescriptor.TYPE_STRING
_BYTES = _d.FieldDescriptor.TYPE_BYTES
_BOOL = _d.FieldDescriptor.TYPE_BOOL
_ENUM = _d.FieldDescriptor.TYPE_ENUM
_MSG = _d.FieldDescriptor.TYPE_MESSAGE
_INT32S = {_d.FieldDescriptor.TYPE_INT32, _d.FieldDescriptor.TYPE_SINT32,
           _d.FieldDescriptor.TYPE_SFIXED32}
_INT64S = {_d.FieldDescriptor.TYPE_INT64, _d.FieldDescriptor.TYPE_SINT64,
           _d.FieldDescriptor.TYPE_SFIXED64}
_FLOATS = {_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT}


def _is_repeated(f: _d.FieldDescriptor) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED


def _scalar_values(f: _d.FieldDescriptor, full: str, current: Any) -> list[tuple[str, Any]]:
    if f.type == _STR:
        return STRINGS + _extras(f.name, full)
    if f.type == _BYTES:
        return BYTES
    if f.type == _BOOL:
        return [("flip", not current)]
    if f.type == _ENUM:
        return _enum_values(f, current)
    if f.type in _INT32S:
        return [*INT32, ("zero", 0), ("one", 1)]
    if f.type in _INT64S:
        return [*INT64, ("zero", 0), ("one", 1)]
    if f.type == _d.FieldDescriptor.TYPE_UINT32:
        return [*UINT32, ("zero", 0)]
    if f.type == _d.FieldDescriptor.TYPE_UINT64:
        return [*UINT64, ("zero", 0)]
    if f.type in _FLOATS:
        return [("nan", float("nan")), ("inf", float("inf")), ("-0.0", -0.0)]
    return []


def _big_list(f: _d.FieldDescriptor, current: list[Any]) -> list[tuple[str, list[Any]]]:
    if f.type == _STR:
        base = current[0] if current else "v"
        return [("none", []), ("one empty", [""]), ("duplicates", [base, base, base]),
                ("5000 distinct", [f"{base}{i}" for i in range(5000)]),
                ("5000 same", [base] * 5000), ("10001 distinct", [f"e{i}" for i in range(10_001)]),
                ("100001 short", [f"{i}" for i in range(100_001)])]
    if f.type == _ENUM:
        valid = [v.number for v in f.enum_type.values if v.number != 0] or [0]
        return [("none", []), ("[999]", [999]), ("[0]", [0]), ("[-1]", [-1]),
                ("duplicates", [valid[0]] * 3), ("5000 valid", [valid[0]] * 5000),
                ("all and 999", [*valid, 999])]
    if f.type in _INT32S | _INT64S:
        return [("none", []), ("[-1]", [-1]), ("5000", list(range(5000)))]
    return []


def mutations(message: Message) -> Iterator[Mutation]:
    """One field at a time, every field of ``message`` (nested ones included, every element of a
    repeated message field); a (field, value) already tried in an earlier element of the same
    repeated field is not tried again."""
    seen: set[tuple[str, str]] = set()
    for mutation in _mutations(message):
        key = (re.sub(r"\[[^\]]*\]", "[]", mutation.path), mutation.label)
        if key not in seen:
            seen.add(key)
            yield mutation


def _mutations(message: Message, prefix: str = "", steps: list[Step] | None = None,
               depth: int = 0) -> Iterator[Mutation]:
    steps = steps or []
    for f in message.DESCRIPTOR.fields:
        full = f"{prefix}{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            yield from _map_mutations(message, f, full, steps, depth)
            continue
        if _is_repeated(f):
            current = getattr(message, f.name)
            if f.type == _MSG:
                items = list(current)
                template = items[0] if items else f.message_type._concrete_class()
                yield Mutation(full, "none", _repeated_setter(steps, f.name, []))
                yield Mutation(full, "empty element", _repeated_setter(
                    steps, f.name, [*items, f.message_type._concrete_class()]))
                yield Mutation(full, "first twice", _repeated_setter(
                    steps, f.name, [template, template, *items[1:]]))
                yield Mutation(full, "2000 copies", _repeated_setter(
                    steps, f.name, [template] * 2000))
                if depth < 5:
                    for index, item in enumerate(items):
                        yield from _mutations(item, f"{full}[{index}].",
                                              [*steps, ("f", f.name), ("i", index)], depth + 1)
            else:
                for label, values in _big_list(f, list(current)):
                    yield Mutation(full, label, _repeated_setter(steps, f.name, values))
                for label, value in _scalar_values(f, full, current[0] if current else 0):
                    yield Mutation(f"{full}[0]", label, _element_setter(steps, f.name, value))
            continue
        if f.type == _MSG:
            kind = f.message_type.full_name
            if kind == "google.protobuf.Timestamp":
                yield Mutation(full, "unset", _ts_setter(steps, f.name, None))
                for label, value in TIMESTAMPS:
                    yield Mutation(full, label, _ts_setter(steps, f.name, value))
                continue
            if kind == "google.protobuf.FieldMask":
                valid = list(getattr(message, f.name).paths)
                for label, paths in _mask_values(valid):
                    def apply(root: Message, s: list[Step] = steps, n: str = f.name,
                              p: list[str] = paths) -> None:
                        getattr(_walk(root, s), n).CopyFrom(field_mask_pb2.FieldMask(paths=p))
                    yield Mutation(full, label, apply)
                continue
            if message.HasField(f.name):
                yield Mutation(full, "unset", _clear(steps, f.name))
                if depth < 5:
                    yield from _mutations(getattr(message, f.name), f"{full}.",
                                          [*steps, ("f", f.name)], depth + 1)
            else:
                yield Mutation(full, "empty message", _set_empty(steps, f.name))
            continue
        current = getattr(message, f.name)
        for label, value in _scalar_values(f, full, current):
            yield Mutation(full, label, _setter(steps, f.name, value))


def _map_mutations(message: Message, f: _d.FieldDescriptor, full: str, steps: list[Step],
                   depth: int) -> Iterator[Mutation]:
    value_field = f.message_type.fields_by_name["value"]
    current = getattr(message, f.name)
    keys = sorted(current)
    if value_field.type == _MSG:
        sample: Any = (current[keys[0]] if keys else value_field.message_type._concrete_class())
        copy = type(sample)()
        copy.CopyFrom(sample)
        sample = copy
    else:
        sample = current[keys[0]] if keys else "v"
    yield Mutation(full, "none", _map_setter(steps, f.name, None, clear=True))
    for label, key in MAP_KEYS:
        yield Mutation(full, label, _map_setter(steps, f.name, {key: sample}))
    yield Mutation(full, "1000 entries", _map_setter(
        steps, f.name, {f"k{i}": sample for i in range(1000)}))
    if value_field.type == _MSG:
        yield Mutation(full, "empty value", _map_setter(
            steps, f.name, {keys[0] if keys else "k": value_field.message_type._concrete_class()}))
        if depth < 5:
            for key in keys:
                yield from _mutations(current[key], f"{full}[{key!r}].",
                                      [*steps, ("f", f.name), ("k", key)], depth + 1)
    else:
        key = keys[0] if keys else "k"
        for label, value in STRINGS + _extras(f.name, full):
            yield Mutation(f"{full}[{key!r}]", label, _map_setter(steps, f.name, {key: value}))


# --- calling and observing ---------------------------------------------------------------------

class CrashLog(logging.Handler):
    """Every ERROR record the server logs (an INTERNAL is logged with its traceback), by the
    x-request-id of the call it belongs to (the interceptor's call context)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: dict[str, list[logging.LogRecord]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        context = call_context.get() or {}
        self.records.setdefault(context.get("request_id", ""), []).append(record)

    def take(self, call_id: str) -> str:
        found = []
        for record in self.records.pop(call_id, []):
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                frames = [fr for fr in traceback.extract_tb(exc.__traceback__)
                          if fr.filename.startswith(_CHECKOUT) and "/.venv/" not in fr.filename]
                where = (f"{frames[-1].filename.removeprefix(_CHECKOUT)}:{frames[-1].lineno}"
                         f" ({frames[-1].name})" if frames else "?")
                text = " ".join(str(exc).split())[:160]
                found.append(f"{type(exc).__name__}: {text} at {where}")
            else:
                found.append(f"{record.name}: {record.getMessage()[:200]}")
        return "; ".join(found)


@dataclass
class Outcome:
    code: str
    details: str = ""
    reason: str | None = None
    has_info: bool = False
    crash: str = ""

    def signature(self) -> str:
        """What a group of problems with one root cause shares."""
        if self.crash:
            first = self.crash.split("; ")[0]
            return f"{self.code}: {first.split(':')[0]} at {first.rsplit(' at ', 1)[-1]}"
        if self.code == "RESOURCE_EXHAUSTED" and not self.has_info:
            return ("RESOURCE_EXHAUSTED (client side): the error's trailers exceed gRPC's "
                    "metadata size limit")
        return f"{self.code}: {self.details[:80]!r}"

    def problem(self) -> str | None:
        if self.code == "OK":
            return None
        if self.code in BAD_CODES:
            return f"{self.code} {self.details[:160]!r} [{self.crash or 'no server traceback'}]"
        if not self.has_info:
            return f"{self.code} without ErrorInfo: {self.details[:160]!r}"
        if self.code == "INVALID_ARGUMENT" and not self.details.strip():
            return "INVALID_ARGUMENT with an empty message"
        return None


Request = Message | list[Message]


@dataclass
class World:
    api: Api
    pool: asyncpg.Pool
    clock: FixedClock
    settings: Settings
    crashes: CrashLog
    counter: int = 0
    facts: dict[str, Any] = field(default_factory=dict)

    def n(self) -> int:
        self.counter += 1
        return self.counter

    async def call(self, rpc_name: str, request: Request, role: str = "admin") -> Outcome:
        outcome, response = await self.call_for(rpc_name, request, role)
        self.facts["last_response"] = response
        return outcome

    async def call_for(self, rpc_name: str, request: Request,
                       role: str = "admin") -> tuple[Outcome, Any]:
        rpc = RPCS[rpc_name]
        call_id = f"fuzz-{uuid.uuid4().hex}"
        metadata = (*Api.key(role), ("x-request-id", call_id))
        try:
            if rpc.client_streaming:
                assert isinstance(request, list)
                stream = self.api.channel.stream_unary(
                    rpc.path, request_serializer=rpc.request_type.SerializeToString,
                    response_deserializer=rpc.response_type.FromString)

                async def messages() -> AsyncIterator[Message]:
                    for message in request:
                        yield message

                response = await stream(messages(), metadata=metadata, timeout=CALL_TIMEOUT)
            else:
                unary = self.api.channel.unary_unary(
                    rpc.path, request_serializer=rpc.request_type.SerializeToString,
                    response_deserializer=rpc.response_type.FromString)
                response = await unary(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            try:
                info = error_info_of(exc)  # type: ignore[arg-type]
            except Exception:  # an undecodable status detail
                info = None
            await asyncio.sleep(0)  # the server's log line is written before its status is sent
            return Outcome(exc.code().name, exc.details() or "",  # type: ignore[union-attr]
                           info.reason if info else None, info is not None,
                           self.crashes.take(call_id)), None
        self.crashes.take(call_id)
        return Outcome("OK"), response

    async def ok(self, rpc_name: str, request: Request, role: str = "admin") -> Any:
        outcome = await self.call(rpc_name, request, role)
        assert outcome.code == "OK", f"set-up {rpc_name}: {outcome}"
        return self.facts["last_response"]


def rid(n: int | str) -> str:
    return f"fz-{n}-{uuid.uuid4().hex[:8]}"


# --- the world every service's requests are built in -------------------------------------------

def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def build_world(w: World) -> None:
    now = w.clock.now()
    for name, category, low, high in (("cashback", 1, "", ""), ("spins", 2, "", ""),
                                      ("credit", 1, "", ""), ("percent_off", 1, "", ""),
                                      ("rt-upd", 1, "1", "1000")):
        await w.ok("RewardTypeService/CreateRewardType", rtpb.CreateRewardTypeRequest(
            request_id=rid(name), reward_type=rtpb.RewardType(
                name=name, display_name=name.title(), category=category, min_value=low,
                max_value=high)))
    props = {"tier": custpb.PropertyValue(string_value="Gold"),
             "level": custpb.PropertyValue(decimal_value="3"),
             "vip": custpb.PropertyValue(bool_value=True)}
    await w.ok("CustomerService/UpsertCustomers", custpb.UpsertCustomersRequest(
        request_id=rid("cust"), customers=[custpb.Customer(
            customer_id=c, currency="EUR", time_zone="Europe/Berlin", properties=props)
            for c in ("c1", "c2", "c3", "z1")]))
    await w.ok("CustomerService/RecordEvents", custpb.RecordEventsRequest(
        request_id=rid("ev"), events=[
            custpb.Event(external_id=f"e{i}", customer_id="c1", kind=kind, amount=amount,
                         currency="EUR", occurred_at=ts(now - timedelta(hours=i + 1)),
                         attributes={"game": "slots"})
            for i, (kind, amount) in enumerate((("deposit", "100"), ("bet", "20"),
                                                ("deposit", "50")))]))
    await create_promotion(w, vip_promotion("VIP25"), activate=True)
    await create_promotion(w, calc_promotion("CALC"), activate=True)
    await create_promotion(w, vip_promotion("DRAFTP"), activate=False)
    await create_promotion(w, flash_promotion("FLASH"), activate=True)
    await w.ok("CodePoolService/UploadCodes", [codepb.UploadCodesRequest(
        promotion_code="FLASH", request_id=rid("up"), data=codes_file("FLASH", 50))])
    await w.ok("CampaignService/CreateCampaign", campaign_request("camp-1", w))
    # Listeners: a webhook for bonus events and one for campaigns (deliveries are made for it).
    registered = await w.ok("ListenerService/RegisterListener", lpb.RegisterListenerRequest(
        request_id=rid("l1"), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_BONUS_ISSUED, url="https://hooks.example.com/a",
            description="ops")))
    w.facts["listener"] = registered.listener.listener_id
    await w.ok("ListenerService/RegisterListener", lpb.RegisterListenerRequest(
        request_id=rid("l2"), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url="https://hooks.example.com/c")))
    w.facts["delivery"] = await failed_delivery(w)
    w.facts["email_listener"] = (await w.ok("ListenerService/RegisterListener",
                                            email_listener_request("e0"))).listener.listener_id
    # Product promotions.
    await w.ok("ProductPromotionService/CreatePersonalizedPromotion",
               personalized_request("coffee"))
    await w.ok("ProductPromotionService/AssignProductLists", prodpb.AssignProductListsRequest(
        request_id=rid("as"), personalized_promotion_id="coffee", customer_ids=["c1", "c2"],
        product_ids=["espresso", "latte"], default_product_id="latte"))
    await w.ok("ProductPromotionService/CreateProductSetDiscount",
               discount_request("breakfast"))
    # Bonuses: definitions, a rule, a schedule, and results waiting for approval.
    await w.ok("BonusService/CreateBonusDefinition", definition_request("bets-10"))
    await w.ok("BonusService/CreateBonusDefinition", bpb.CreateBonusDefinitionRequest(
        request_id=rid("m"), definition=bonus_api.definition(
            "manual-10", "sum(deposit.amount) * 10%", approval_mode=bpb.APPROVAL_MODE_MANUAL)))
    await w.ok("BonusService/CreateBonusRule", rule_request("each-bet"))
    await w.ok("BonusService/CreateBonusSchedule", schedule_request("daily"))
    manual = [f"m{i}" for i in range(260)]
    await w.ok("CustomerService/UpsertCustomers", custpb.UpsertCustomersRequest(
        request_id=rid("mc"), customers=[custpb.Customer(customer_id=c, currency="EUR",
                                                         time_zone="UTC") for c in manual]))
    await w.ok("CustomerService/RecordEvents", custpb.RecordEventsRequest(
        request_id=rid("me"), events=[custpb.Event(
            external_id=f"me-{c}", customer_id=c, kind="deposit", amount="250", currency="EUR",
            occurred_at=ts(now - timedelta(hours=2))) for c in manual]))
    await w.ok("BonusService/RequestBonusCalculation", bpb.RequestBonusCalculationRequest(
        request_id=rid("mr"), definition_id="manual-10", customer_ids=manual))
    await w.ok("BonusService/CreateBonusDefinition", bpb.CreateBonusDefinitionRequest(
        request_id=rid("r"), definition=bonus_api.definition(
            "recalc-10", "sum(deposit.amount) * 5%", approval_mode=bpb.APPROVAL_MODE_MANUAL)))
    await w.ok("BonusService/RequestBonusCalculation", bpb.RequestBonusCalculationRequest(
        request_id=rid("rr"), definition_id="recalc-10", customer_ids=manual[:2]))
    w.clock.advance(timedelta(minutes=5))
    assert await bonus_api.run_due_batches(w.pool, w.settings, w.clock) >= 1
    results = await w.ok("BonusService/ListBonusResults", bpb.ListBonusResultsRequest(
        definition_id="manual-10", page_size=1000))
    w.facts["bonus_ids"] = [r.bonus_id for r in results.results
                            if r.status == bpb.BONUS_STATUS_CALCULATED]
    assert len(w.facts["bonus_ids"]) >= 250
    w.facts["bonus_id"] = w.facts["bonus_ids"].pop()
    w.facts["grant_id"] = (await get_reward(w, "VIP25", "c1")).grant.grant_id
    w.facts["job_id"] = await dead_job(w)


async def create_promotion(w: World, promotion: ppb.Promotion, *, activate: bool) -> None:
    await w.ok("PromotionService/CreatePromotion", ppb.CreatePromotionRequest(
        request_id=rid(promotion.promotion_code), promotion=promotion, activate=activate))


def vip_promotion(code: str) -> ppb.Promotion:
    return ppb.Promotion(
        promotion_code=code, name=f"Promotion {code}", description="for VIPs",
        properties={"channel": "app", "segment": "vip"}, time_zone="Europe/Berlin",
        rewards=[ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE,
                                     value="15", min_value="1", max_value="100"),
                 ppb.PromotionReward(reward_type="credit", kind=ppb.REWARD_KIND_EXTERNAL)],
        customer_cap=100000, budget_caps=[
            ppb.BudgetCap(reward_type="cashback", period=ppb.CAP_PERIOD_DAILY, limit="1000000"),
            ppb.BudgetCap(reward_type="cashback", period=ppb.CAP_PERIOD_LIFETIME,
                          limit="10000000")])


def calc_promotion(code: str) -> ppb.Promotion:
    last = "last(deposit.amount)"
    return ppb.Promotion(
        promotion_code=code, name=f"Calculated {code}", time_zone="UTC",
        rewards=[ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
                                     formula=f"{last} * 10%", rounding=ppb.ROUNDING_MODE_MROUND,
                                     decimals=2, rounding_factor="0.05", lookback_days=7,
                                     min_value="0.5", max_value="500"),
                 ppb.PromotionReward(reward_type="spins", kind=ppb.REWARD_KIND_TIERED, tiers=[
                     ppb.Tier(condition='customer.tier == "Gold"', value="5"),
                     ppb.Tier(condition=f"{last} > 10", value="sum(bet.amount) / 2")],
                     rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=0)],
        budget_caps=[ppb.BudgetCap(reward_type="spins", period=ppb.CAP_PERIOD_WEEKLY,
                                   limit="100000")])


def flash_promotion(code: str) -> ppb.Promotion:
    return ppb.Promotion(
        promotion_code=code, name=f"Flash {code}",
        rewards=[ppb.PromotionReward(reward_type="percent_off", kind=ppb.REWARD_KIND_EXTERNAL)],
        code_type=ppb.CODE_TYPE_PERSONALIZED, fallback_code="FALLBACK-1",
        code_alerts=[ppb.CodeAlertThreshold(remaining_codes=10),
                     ppb.CodeAlertThreshold(remaining_percent="5.5")])


def campaign_request(campaign_id: str, w: World) -> campb.CreateCampaignRequest:
    return campb.CreateCampaignRequest(
        request_id=rid(campaign_id), customer_ids=["c1", "c2"], campaign=campb.Campaign(
            campaign_id=campaign_id, name=f"Campaign {campaign_id}",
            execute_at=ts(w.clock.now() + timedelta(days=1)), conditional_execution=True,
            promotion_codes=["VIP25", "CALC"]))


def email_listener_request(n: int | str) -> lpb.RegisterListenerRequest:
    return lpb.RegisterListenerRequest(request_id=rid(n), listener=lpb.Listener(
        event_type=lpb.EVENT_TYPE_CAMPAIGN_EXECUTED, channel=lpb.LISTENER_CHANNEL_EMAIL,
        email_recipients=["ops@example.com", "finance@example.com"],
        description="mail", active=True))


def personalized_request(backend_id: str) -> prodpb.CreatePersonalizedPromotionRequest:
    return prodpb.CreatePersonalizedPromotionRequest(
        request_id=rid(backend_id), personalized_promotion=prodpb.PersonalizedPromotion(
            backend_id=backend_id, name="Your coffee", description="Pick your coffee",
            max_distinct_products=3, lock_after_first_apply=False))


def discount_request(discount_id: str) -> prodpb.CreateProductSetDiscountRequest:
    return prodpb.CreateProductSetDiscountRequest(
        request_id=rid(discount_id), product_set_discount=prodpb.ProductSetDiscount(
            discount_id=discount_id, name="Breakfast deal",
            discount_type=prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="50",
            min_basket_total="1.00", product_sets=[
                prodpb.ProductSet(name="Breakfast basics", product_ids=["bread", "butter"],
                                  required_quantity=2),
                prodpb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                                  required_quantity=1, gets_discount=True,
                                  discounted_quantity=1)]))


def definition_request(definition_id: str) -> bpb.CreateBonusDefinitionRequest:
    definition = bonus_api.definition(
        definition_id, "last(deposit.amount) * rate", rounding=ppb.ROUNDING_MODE_ROUND_DOWN,
        decimals=2, cap_amount="200", min_allowed="5", rounding_factor="",
        batch_window_seconds=60, skipped_message="Skipped {{ event.reason }}",
        calculated_message="Calculated {{event.bonus_amount}}",
        issued_message="Your bonus of {{event.bonus_amount}} {{ event.currency }} is here",
        variables=[fpb.FormulaVariable(name="rate", per_currency={"USD": "0.6", "EUR": "0.5"}),
                   fpb.FormulaVariable(name="bonus", value="5")])
    return bpb.CreateBonusDefinitionRequest(request_id=rid(definition_id), definition=definition)


def rule_request(rule_id: str) -> bpb.CreateBonusRuleRequest:
    return bpb.CreateBonusRuleRequest(request_id=rid(rule_id), rule=bpb.BonusRule(
        rule_id=rule_id, definition_id="bets-10", event_kind="bet",
        filter='game == "slots"', every=2, qualification_kind="deposit",
        qualification_min_amount="10", qualification_currency="EUR",
        qualification_filter="amount > 5", max_executions=3,
        period_mode=bpb.RULE_PERIOD_MODE_QUALIFICATION_TO_FIXED_END,
        period_end=ts(datetime(2027, 1, 1, tzinfo=UTC)), active=True))


def schedule_request(schedule_id: str) -> bpb.CreateBonusScheduleRequest:
    return bpb.CreateBonusScheduleRequest(request_id=rid(schedule_id), schedule=bpb.BonusSchedule(
        schedule_id=schedule_id, definition_id="bets-10", customer_ids=["z1", "c1"], weekday=3,
        local_time="06:00", time_zone="Europe/Berlin", active=True))


async def get_reward(w: World, code: str, customer: str, **kw: Any) -> rpb.GetRewardResponse:
    return await w.ok("RewardService/GetReward", rpb.GetRewardRequest(
        request_id=rid("gr"), promotion_code=code, customer_id=customer, **kw), "runtime")


async def failed_delivery(w: World) -> int:
    """A FAILED delivery of the campaign listener, as the worker leaves one."""
    async with w.pool.acquire() as conn, conn.transaction():
        await webhooks_repo.emit_event(conn, event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN,
                                       now=w.clock.now(), payload={"campaign_id": f"x{w.n()}"})
        row = await conn.fetchrow("SELECT id FROM webhook_deliveries ORDER BY id DESC LIMIT 1")
        await conn.execute("UPDATE webhook_deliveries SET status = 'FAILED', last_error = "
                           "'HTTP 500', attempts = 1 WHERE id = $1", row["id"])
        await conn.execute("UPDATE outbox_jobs SET status = 'done' WHERE status = 'pending' "
                           "AND kind LIKE 'webhook%'")
        return int(row["id"])


async def dead_job(w: World) -> str:
    async with w.pool.acquire() as conn:
        job_id = await outbox_repo.add_job(conn, kind="campaign.notify",
                                           payload={"campaign": 999999})
        await conn.execute("UPDATE outbox_jobs SET status = 'dead', finished_at = $1, "
                           "last_error = 'interrupted 8 times' WHERE id = $2", w.clock.now(),
                           job_id)
    return str(job_id)


# --- a valid request per RPC -------------------------------------------------------------------

Build = Callable[[World, int], Awaitable[Request]]


@dataclass(frozen=True)
class Target:
    rpc: str
    build: Build
    role: str = "admin"
    fresh: bool = False  # build again for every mutation (it creates or consumes something)
    label: str = ""


def _static(make: Callable[[World], Request]) -> Build:
    async def build(w: World, n: int) -> Request:
        return make(w)
    return build


async def _b_update_promotion(w: World, n: int) -> Request:
    promotion = vip_promotion("DRAFTP")
    promotion.rewards.append(calc_promotion("x").rewards[1])
    return ppb.UpdatePromotionRequest(request_id=rid(n), promotion=promotion, update_mask=mask(
        "name", "description", "properties", "time_zone", "rewards", "customer_cap",
        "budget_caps"))


async def _b_update_promotion_codes(w: World, n: int) -> Request:
    if "draft-flash" not in w.facts:
        await create_promotion(w, flash_promotion("DRAFTFLASH"), activate=False)
        w.facts["draft-flash"] = True
    return ppb.UpdatePromotionRequest(request_id=rid(n), promotion=flash_promotion("DRAFTFLASH"),
                                      update_mask=mask("code_type", "fallback_code",
                                                       "code_alerts", "rewards"))


async def _b_activate(w: World, n: int) -> Request:
    await create_promotion(w, vip_promotion(f"ACT{n}"), activate=False)
    return ppb.ActivatePromotionRequest(request_id=rid(n), promotion_code=f"ACT{n}")


async def _b_deactivate(w: World, n: int) -> Request:
    await create_promotion(w, vip_promotion(f"DEA{n}"), activate=True)
    return ppb.DeactivatePromotionRequest(request_id=rid(n), promotion_code=f"DEA{n}")


async def _b_revoke(w: World, n: int) -> Request:
    grant = await get_reward(w, "VIP25", f"rv{n}")
    return rpb.RevokeGrantRequest(request_id=rid(n), grant_id=grant.grant.grant_id,
                                  reason="credit failed")


def _reward_request(code: str, **kw: Any) -> Build:
    async def build(w: World, n: int) -> Request:
        return rpb.GetRewardRequest(request_id=rid(n), promotion_code=code, customer_id=f"g{n}",
                                    **kw)
    return build


async def _b_upload(w: World, n: int) -> Request:
    data = codes_file(f"U{n}", 4)
    return [codepb.UploadCodesRequest(promotion_code="FLASH", request_id=rid(n), data=data[:20]),
            codepb.UploadCodesRequest(data=data[20:])]


async def _b_cancel_campaign(w: World, n: int) -> Request:
    await w.ok("CampaignService/CreateCampaign", campaign_request(f"cc-{n}", w))
    return campb.CancelCampaignRequest(request_id=rid(n), campaign_id=f"cc-{n}")


async def _b_unregister(w: World, n: int) -> Request:
    created = await w.ok("ListenerService/RegisterListener", lpb.RegisterListenerRequest(
        request_id=rid(n), listener=lpb.Listener(event_type=lpb.EVENT_TYPE_BONUS_SKIPPED,
                                                 url=f"https://hooks.example.com/u{n}")))
    return lpb.UnregisterListenerRequest(request_id=rid(n),
                                         listener_id=created.listener.listener_id)


async def _b_redeliver(w: World, n: int) -> Request:
    return lpb.RedeliverEventRequest(request_id=rid(n), delivery_id=await failed_delivery(w))


async def _b_delete_personalized(w: World, n: int) -> Request:
    await w.ok("ProductPromotionService/CreatePersonalizedPromotion",
               personalized_request(f"del-{n}"))
    return prodpb.DeletePersonalizedPromotionRequest(request_id=rid(n), backend_id=f"del-{n}")


async def _b_delete_discount(w: World, n: int) -> Request:
    await w.ok("ProductPromotionService/CreateProductSetDiscount", discount_request(f"dd-{n}"))
    return prodpb.DeleteProductSetDiscountRequest(request_id=rid(n), discount_id=f"dd-{n}")


def _next_bonus(w: World) -> str:
    ids = w.facts["bonus_ids"]
    return ids.pop() if len(ids) > 1 else ids[0]


async def _b_approve(w: World, n: int) -> Request:
    return bpb.ApproveBonusResultsRequest(request_id=rid(n), bonus_ids=[_next_bonus(w)])


async def _b_reject(w: World, n: int) -> Request:
    return bpb.RejectBonusResultsRequest(request_id=rid(n), bonus_ids=[_next_bonus(w)],
                                         reason="bonus abuse")


async def _b_retry_job(w: World, n: int) -> Request:
    return jpb.RetryJobRequest(request_id=rid(n), job_id=await dead_job(w))


def _fixed_period() -> fpb.TransactionPeriod:
    return fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
        start=ts(datetime(2026, 11, 20, tzinfo=UTC)), end=ts(datetime(2026, 11, 22, tzinfo=UTC)),
        time_zone="Europe/Berlin"))


def _definition_update(definition: bpb.BonusDefinition) -> bpb.UpdateBonusDefinitionRequest:
    return bpb.UpdateBonusDefinitionRequest(request_id=rid("u"), definition=definition,
                                            update_mask=mask(
        "display_name", "formula", "result_type", "min_allowed", "cap_amount", "rounding",
        "decimals", "rounding_factor", "period", "approval_mode", "batch_window_seconds",
        "skipped_message", "calculated_message", "issued_message", "variables"))


def _rid_fresh(make: Callable[[World, int], Request]) -> Build:
    async def build(w: World, n: int) -> Request:
        return make(w, n)
    return build


def _upd_definition(period: fpb.TransactionPeriod) -> Build:
    async def build(w: World, n: int) -> Request:
        definition = definition_request("bets-10").definition
        definition.period.CopyFrom(period)
        return _definition_update(definition)
    return build


TARGETS: list[Target] = [
    # RewardTypeService
    Target("RewardTypeService/CreateRewardType", _rid_fresh(
        lambda w, n: rtpb.CreateRewardTypeRequest(request_id=rid(n), reward_type=rtpb.RewardType(
            name=f"rt{n}", display_name="Spins", description="free spins",
            image_url="https://img.example.com/a.png", category=rtpb.REWARD_CATEGORY_UNITS,
            min_value="1", max_value="100"))), fresh=True),
    Target("RewardTypeService/GetRewardType", _static(lambda w: rtpb.GetRewardTypeRequest(
        name="cashback"))),
    Target("RewardTypeService/ListRewardTypes", _static(lambda w: rtpb.ListRewardTypesRequest(
        page_size=2))),
    Target("RewardTypeService/UpdateRewardType", _rid_fresh(
        lambda w, n: rtpb.UpdateRewardTypeRequest(request_id=rid(n), reward_type=rtpb.RewardType(
            name="rt-upd", display_name="Updated", description="d",
            image_url="https://img.example.com/b.png", category=rtpb.REWARD_CATEGORY_AMOUNT,
            min_value="2", max_value="900"), update_mask=mask(
            "display_name", "description", "image_url", "category", "min_value", "max_value")))),
    # PromotionService
    Target("PromotionService/CreatePromotion", _rid_fresh(lambda w, n: ppb.CreatePromotionRequest(
        request_id=rid(n), promotion=vip_promotion(f"NEW{n}"), activate=True)), fresh=True,
        label="single"),
    Target("PromotionService/CreatePromotion", _rid_fresh(lambda w, n: ppb.CreatePromotionRequest(
        request_id=rid(n), promotion=calc_promotion(f"NEWC{n}"), activate=True)), fresh=True,
        label="calculated"),
    Target("PromotionService/CreatePromotion", _rid_fresh(lambda w, n: ppb.CreatePromotionRequest(
        request_id=rid(n), promotion=flash_promotion(f"NEWF{n}"))), fresh=True,
        label="codes"),
    Target("PromotionService/GetPromotion", _static(lambda w: ppb.GetPromotionRequest(
        promotion_code="CALC"))),
    Target("PromotionService/ListPromotions", _static(lambda w: ppb.ListPromotionsRequest(
        page_size=2, search="VIP", statuses=[ppb.PROMOTION_STATUS_ACTIVE],
        reward_kinds=[ppb.REWARD_KIND_SINGLE]))),
    Target("PromotionService/UpdatePromotion", _b_update_promotion, label="rewards"),
    Target("PromotionService/UpdatePromotion", _b_update_promotion_codes, label="codes"),
    Target("PromotionService/ActivatePromotion", _b_activate, fresh=True),
    Target("PromotionService/DeactivatePromotion", _b_deactivate, fresh=True),
    Target("PromotionService/GetPromotionReconciliation", _static(
        lambda w: ppb.GetPromotionReconciliationRequest(promotion_code="VIP25"))),
    # RewardService
    Target("RewardService/GetReward", _reward_request(
        "VIP25", external_values={"credit": "5"}, context={"channel": "app"}), "runtime",
        fresh=True, label="single"),
    Target("RewardService/GetReward", _reward_request("CALC", campaign_id="camp-1"), "runtime",
           fresh=True, label="calculated+campaign"),
    Target("RewardService/GetReward", _reward_request(
        "FLASH", external_values={"percent_off": "10"}), "runtime", fresh=True, label="codes"),
    Target("RewardService/RevokeGrant", _b_revoke, "runtime", fresh=True),
    # CodePoolService
    Target("CodePoolService/UploadCodes", _b_upload, fresh=True),
    Target("CodePoolService/GetCodeInventory", _static(lambda w: codepb.GetCodeInventoryRequest(
        promotion_code="FLASH"))),
    # CustomerService
    Target("CustomerService/UpsertCustomers", _rid_fresh(lambda w, n: custpb.UpsertCustomersRequest(
        request_id=rid(n), customers=[custpb.Customer(
            customer_id=f"u{n}", currency="EUR", time_zone="Europe/Berlin", properties={
                "tier": custpb.PropertyValue(string_value="Gold"),
                "level": custpb.PropertyValue(decimal_value="3.5"),
                "vip": custpb.PropertyValue(bool_value=True)})])), "runtime", fresh=True),
    Target("CustomerService/GetCustomer", _static(lambda w: custpb.GetCustomerRequest(
        customer_id="c1"))),
    Target("CustomerService/ListCustomers", _static(lambda w: custpb.ListCustomersRequest(
        page_size=2))),
    Target("CustomerService/RecordEvents", _rid_fresh(lambda w, n: custpb.RecordEventsRequest(
        request_id=rid(n), create_missing_customers=True, events=[custpb.Event(
            external_id=f"x{n}", customer_id="c1", kind="deposit", amount="10.50",
            currency="EUR", occurred_at=ts(w.clock.now() - timedelta(hours=1)),
            attributes={"game": "slots", "method": "card"})])), "runtime", fresh=True),
    Target("CustomerService/ListCustomerEvents", _static(lambda w: custpb.ListCustomerEventsRequest(
        customer_id="c1", kinds=["deposit", "bet"], page_size=1))),
    # CampaignService / ClearanceService
    Target("CampaignService/CreateCampaign", _rid_fresh(lambda w, n: campaign_request(
        f"camp-n{n}", w)), fresh=True),
    Target("CampaignService/AddCampaignTargets", _rid_fresh(
        lambda w, n: campb.AddCampaignTargetsRequest(request_id=rid(n), campaign_id="camp-1",
                                                     customer_ids=[f"t{n}", "c3"]))),
    Target("CampaignService/GetCampaign", _static(lambda w: campb.GetCampaignRequest(
        campaign_id="camp-1"))),
    Target("CampaignService/ListCampaigns", _static(lambda w: campb.ListCampaignsRequest(
        page_size=2, statuses=[campb.CAMPAIGN_STATUS_SCHEDULED]))),
    Target("CampaignService/CancelCampaign", _b_cancel_campaign, fresh=True),
    Target("CampaignService/GetCampaignReconciliation", _static(
        lambda w: campb.GetCampaignReconciliationRequest(campaign_id="camp-1"))),
    Target("ClearanceService/GetProcessedCampaignCustomers", _static(
        lambda w: campb.GetProcessedCampaignCustomersRequest(campaign_id="camp-1", page_size=1)),
        "listener"),
    Target("ClearanceService/UpdateCustomerPromotionStatus", _rid_fresh(
        lambda w, n: campb.UpdateCustomerPromotionStatusRequest(
            request_id=rid(n), campaign_id="camp-1", statuses=[
                campb.CustomerPromotionStatus(customer_id="c1", approved=True),
                campb.CustomerPromotionStatus(customer_id="c2", approved=False)])), "listener"),
    Target("ClearanceService/ForecastCampaign", _static(lambda w: campb.ForecastCampaignRequest(
        campaign_id="camp-1", customer_ids=["c1"]))),
    # ListenerService
    Target("ListenerService/RegisterListener", _rid_fresh(
        lambda w, n: lpb.RegisterListenerRequest(request_id=rid(n), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_BONUS_CALCULATED, url=f"https://hooks.example.com/r{n}",
            active=True, description="ops", channel=lpb.LISTENER_CHANNEL_WEBHOOK))), fresh=True),
    Target("ListenerService/RegisterListener", _rid_fresh(
        lambda w, n: email_listener_request(n)), fresh=True, label="email"),
    Target("ListenerService/UpdateListener", _rid_fresh(lambda w, n: lpb.UpdateListenerRequest(
        request_id=rid(n), listener=lpb.Listener(
            listener_id=w.facts["email_listener"], active=True, description="mail 2",
            email_recipients=["ops@example.com", "new@example.com"]),
        update_mask=mask("active", "description", "email_recipients"))), label="email"),
    Target("ListenerService/GetListener", _static(lambda w: lpb.GetListenerRequest(
        listener_id=w.facts["listener"]))),
    Target("ListenerService/ListListeners", _static(lambda w: lpb.ListListenersRequest(
        page_size=1, event_type=lpb.EVENT_TYPE_BONUS_ISSUED))),
    Target("ListenerService/UpdateListener", _rid_fresh(lambda w, n: lpb.UpdateListenerRequest(
        request_id=rid(n), listener=lpb.Listener(
            listener_id=w.facts["listener"], url="https://hooks.example.com/z", active=True,
            description="ops 2"), update_mask=mask("url", "active", "description", "secret")))),
    Target("ListenerService/UnregisterListener", _b_unregister, fresh=True),
    Target("ListenerService/ListDeliveries", _static(lambda w: lpb.ListDeliveriesRequest(
        page_size=1, statuses=[lpb.DELIVERY_STATUS_FAILED],
        event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN))),
    Target("ListenerService/GetDelivery", _static(lambda w: lpb.GetDeliveryRequest(
        delivery_id=w.facts["delivery"]))),
    Target("ListenerService/RedeliverEvent", _b_redeliver, fresh=True),
    # FormulaService
    Target("FormulaService/ValidateFormula", _static(lambda w: fpb.ValidateFormulaRequest(
        source="x = last(deposit.amount) * rate + bonus\nif x > 10 then x else skip",
        variables=[fpb.FormulaVariable(name="rate", per_currency={"USD": "0.6"}),
                   fpb.FormulaVariable(name="bonus", value="5")]))),
    Target("FormulaService/DryRunFormula", _static(lambda w: fpb.DryRunFormulaRequest(
        source='last(deposit.amount) * rate + customer["level"]', customer_id="c1",
        variables=[fpb.FormulaVariable(name="rate", per_currency={"USD": "0.6", "EUR": "0.5"})],
        period=_fixed_period(), rounding=ppb.ROUNDING_MODE_MROUND, decimals=2,
        rounding_factor="0.05", cap_amount="100", min_allowed="1")), label="fixed"),
    Target("FormulaService/DryRunFormula", _static(lambda w: fpb.DryRunFormulaRequest(
        source="sum(deposit.amount)", customer_id="c1", period=fpb.TransactionPeriod(
            relative=fpb.TransactionPeriod.Relative(kind=fpb.RELATIVE_KIND_LAST_FULL_WEEK,
                                                    time_zone="America/New_York")))),
        label="relative"),
    Target("FormulaService/DryRunFormula", _static(lambda w: fpb.DryRunFormulaRequest(
        source="sum(deposit.amount)", customer_id="c1", period=fpb.TransactionPeriod(
            time_back=fpb.TransactionPeriod.TimeBack(amount=3, unit=fpb.TIME_UNIT_HOURS)))),
        label="time_back"),
    # ProductPromotionService
    Target("ProductPromotionService/CreatePersonalizedPromotion", _rid_fresh(
        lambda w, n: personalized_request(f"pp-{n}")), fresh=True),
    Target("ProductPromotionService/GetPersonalizedPromotion", _static(
        lambda w: prodpb.GetPersonalizedPromotionRequest(backend_id="coffee"))),
    Target("ProductPromotionService/ListPersonalizedPromotions", _static(
        lambda w: prodpb.ListPersonalizedPromotionsRequest(page_size=1, search="coffee",
                                                           lock_after_first_apply=False))),
    Target("ProductPromotionService/UpdatePersonalizedPromotion", _rid_fresh(
        lambda w, n: prodpb.UpdatePersonalizedPromotionRequest(
            request_id=rid(n), personalized_promotion=prodpb.PersonalizedPromotion(
                backend_id="coffee", name="Our coffee", description="d",
                max_distinct_products=5, lock_after_first_apply=False),
            update_mask=mask("name", "description", "max_distinct_products",
                             "lock_after_first_apply")))),
    Target("ProductPromotionService/DeletePersonalizedPromotion", _b_delete_personalized,
           fresh=True),
    Target("ProductPromotionService/AssignProductLists", _rid_fresh(
        lambda w, n: prodpb.AssignProductListsRequest(
            request_id=rid(n), personalized_promotion_id="coffee", customer_ids=["c3"],
            product_ids=["espresso", "latte", "mocha"], default_product_id="mocha"))),
    Target("ProductPromotionService/RemoveProductLists", _rid_fresh(
        lambda w, n: prodpb.RemoveProductListsRequest(
            request_id=rid(n), personalized_promotion_id="coffee", customer_ids=["c3"]))),
    Target("ProductPromotionService/ListProductLists", _static(
        lambda w: prodpb.ListProductListsRequest(personalized_promotion_id="coffee",
                                                 page_size=1))),
    Target("ProductPromotionService/CreateProductSetDiscount", _rid_fresh(
        lambda w, n: discount_request(f"disc-{n}")), fresh=True),
    Target("ProductPromotionService/GetProductSetDiscount", _static(
        lambda w: prodpb.GetProductSetDiscountRequest(discount_id="breakfast"))),
    Target("ProductPromotionService/ListProductSetDiscounts", _static(
        lambda w: prodpb.ListProductSetDiscountsRequest(page_size=1,
                                                        personalized_promotion_id="coffee"))),
    Target("ProductPromotionService/UpdateProductSetDiscount", _rid_fresh(
        lambda w, n: prodpb.UpdateProductSetDiscountRequest(
            request_id=rid(n), product_set_discount=discount_request("breakfast")
            .product_set_discount, update_mask=mask(
                "name", "discount_type", "value", "product_sets", "min_basket_total")))),
    Target("ProductPromotionService/DeleteProductSetDiscount", _b_delete_discount, fresh=True),
    Target("ProductPromotionService/GetCustomerProductPromotions", _static(
        lambda w: prodpb.GetCustomerProductPromotionsRequest(customer_id="c1")), "runtime"),
    Target("ProductPromotionService/SelectProducts", _rid_fresh(
        lambda w, n: prodpb.SelectProductsRequest(
            request_id=rid(n), customer_id="c1", personalized_promotion_id="coffee",
            product_ids=["espresso"])), "runtime"),
    Target("ProductPromotionService/EvaluateBasket", _static(
        lambda w: prodpb.EvaluateBasketRequest(customer_id="c1", lines=[
            prodpb.BasketLine(product_id="bread", quantity=1, unit_price="2.50"),
            prodpb.BasketLine(product_id="butter", quantity=1, unit_price="3.20"),
            prodpb.BasketLine(product_id="espresso", quantity=2, unit_price="7.99")])),
        "runtime"),
    Target("ProductPromotionService/ApplyBasket", _rid_fresh(
        lambda w, n: prodpb.ApplyBasketRequest(request_id=rid(n), customer_id="c2", lines=[
            prodpb.BasketLine(product_id="bread", quantity=1, unit_price="2.50"),
            prodpb.BasketLine(product_id="butter", quantity=1, unit_price="3.20"),
            prodpb.BasketLine(product_id="latte", quantity=2, unit_price="7.99")])),
        "runtime"),
    # BonusService
    Target("BonusService/CreateBonusDefinition", _rid_fresh(
        lambda w, n: definition_request(f"def-{n}")), fresh=True, label="time_back"),
    Target("BonusService/CreateBonusDefinition", _rid_fresh(
        lambda w, n: bpb.CreateBonusDefinitionRequest(
            request_id=rid(n), definition=bonus_api.definition(
                f"deff-{n}", "sum(deposit.amount) * 10%", period=_fixed_period(),
                result_type=bpb.BONUS_RESULT_TYPE_POINTS,
                points_target=bpb.POINTS_TARGET_LEADERBOARD))), fresh=True, label="fixed"),
    Target("BonusService/GetBonusDefinition", _static(
        lambda w: bpb.GetBonusDefinitionRequest(definition_id="bets-10"))),
    Target("BonusService/ListBonusDefinitions", _static(
        lambda w: bpb.ListBonusDefinitionsRequest(page_size=1))),
    Target("BonusService/UpdateBonusDefinition", _upd_definition(
        fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_FULL_MONTH, time_zone="Europe/Berlin")))),
    Target("BonusService/RequestBonusCalculation", _rid_fresh(
        lambda w, n: bpb.RequestBonusCalculationRequest(
            request_id=rid(n), definition_id="bets-10", customer_ids=["c1", "c2"])), "runtime",
        label="default period"),
    Target("BonusService/RequestBonusCalculation", _rid_fresh(
        lambda w, n: bpb.RequestBonusCalculationRequest(
            request_id=rid(n), definition_id="bets-10", customer_ids=["c1"],
            period_start=ts(w.clock.now() - timedelta(hours=5)),
            period_end=ts(w.clock.now() - timedelta(hours=1)))), "runtime",
        label="explicit period"),
    Target("BonusService/ListBonusResults", _static(lambda w: bpb.ListBonusResultsRequest(
        page_size=2, definition_id="manual-10", statuses=[bpb.BONUS_STATUS_CALCULATED],
        customer_id="m1", calculated_after=ts(w.clock.now() - timedelta(days=1)),
        calculated_before=ts(w.clock.now() + timedelta(days=1))))),
    Target("BonusService/GetBonusResult", _static(lambda w: bpb.GetBonusResultRequest(
        bonus_id=w.facts["bonus_id"]))),
    Target("BonusService/ApproveBonusResults", _b_approve, fresh=True),
    Target("BonusService/RejectBonusResults", _b_reject, fresh=True),
    Target("BonusService/RecalculateBonusResults", _rid_fresh(
        lambda w, n: bpb.RecalculateBonusResultsRequest(request_id=rid(n),
                                                        definition_id="recalc-10"))),
    Target("BonusService/ListBonusBatches", _static(lambda w: bpb.ListBonusBatchesRequest(
        page_size=1, definition_id="manual-10"))),
    Target("BonusService/ListCustomerBonusLedger", _static(
        lambda w: bpb.ListCustomerBonusLedgerRequest(customer_id="m1", page_size=1))),
    Target("BonusService/CreateBonusRule", _rid_fresh(lambda w, n: rule_request(f"rule-{n}")),
           fresh=True),
    Target("BonusService/GetBonusRule", _static(lambda w: bpb.GetBonusRuleRequest(
        rule_id="each-bet"))),
    Target("BonusService/ListBonusRules", _static(lambda w: bpb.ListBonusRulesRequest(
        page_size=1))),
    Target("BonusService/GetBonusSchedule", _static(lambda w: bpb.GetBonusScheduleRequest(
        schedule_id="daily"))),
    Target("BonusService/UpdateBonusRule", _rid_fresh(lambda w, n: bpb.UpdateBonusRuleRequest(
        request_id=rid(n), rule=rule_request("each-bet").rule, update_mask=mask(
            "event_kind", "filter", "every", "qualification_kind", "qualification_min_amount",
            "qualification_filter", "max_executions", "period_mode", "period_end", "active",
            "qualification_currency")))),
    Target("BonusService/CreateBonusSchedule", _rid_fresh(
        lambda w, n: schedule_request(f"sched-{n}")), fresh=True),
    Target("BonusService/CreateBonusSchedule", _rid_fresh(
        lambda w, n: bpb.CreateBonusScheduleRequest(request_id=rid(n), schedule=bpb.BonusSchedule(
            schedule_id=f"csched-{n}", definition_id="bets-10", campaign_id="camp-1",
            since_campaign_entrance=True, weekday=7, local_time="23:30",
            time_zone="Pacific/Kiritimati"))), fresh=True, label="campaign"),
    Target("BonusService/ListBonusSchedules", _static(lambda w: bpb.ListBonusSchedulesRequest(
        page_size=1))),
    Target("BonusService/UpdateBonusSchedule", _rid_fresh(
        lambda w, n: bpb.UpdateBonusScheduleRequest(
            request_id=rid(n), schedule=schedule_request("daily").schedule, update_mask=mask(
                "customer_ids", "weekday", "local_time", "time_zone", "active")))),
    # JobService
    Target("JobService/ListJobs", _static(lambda w: jpb.ListJobsRequest(
        page_size=1, status=jpb.JOB_STATUS_DEAD, kind="campaign.notify"))),
    Target("JobService/RetryJob", _b_retry_job, fresh=True),
]


def test_every_rpc_of_the_descriptors_has_a_valid_request() -> None:
    assert len(RPCS) >= 77
    assert sorted({t.rpc for t in TARGETS}) == sorted(RPCS)


def _stream_mutations() -> Iterator[tuple[str, str, Callable[[list[Message]], list[Message]]]]:
    """UploadCodes is a client stream: besides its messages' fields, the stream's shape."""
    def empty(ms: list[Message]) -> list[Message]:
        return []

    def first_without_code(ms: list[Message]) -> list[Message]:
        return [codepb.UploadCodesRequest(data=ms[0].data), *ms[1:]]

    def code_in_second(ms: list[Message]) -> list[Message]:
        second = codepb.UploadCodesRequest(promotion_code="OTHER", request_id="other",
                                           data=ms[1].data)
        return [ms[0], second]

    def nul_in_second(ms: list[Message]) -> list[Message]:
        return [ms[0], codepb.UploadCodesRequest(promotion_code="\x00", data=ms[1].data)]

    def many_small(ms: list[Message]) -> list[Message]:
        return [ms[0], *[codepb.UploadCodesRequest(data=b"S%05d\n" % i) for i in range(3000)]]

    def many_empty(ms: list[Message]) -> list[Message]:
        return [ms[0], *[codepb.UploadCodesRequest() for _ in range(3000)]]

    def split_utf8(ms: list[Message]) -> list[Message]:
        text = "\u00e9\u00e9-1\n".encode()
        return [codepb.UploadCodesRequest(promotion_code="FLASH", request_id=ms[0].request_id,
                                          data=text[:1]),
                codepb.UploadCodesRequest(data=text[1:])]

    def over_limit(ms: list[Message]) -> list[Message]:
        chunk = b"B" * (4 * 1024 * 1024 - 100)
        return [ms[0], *[codepb.UploadCodesRequest(data=chunk) for _ in range(3)]]

    def huge_chunk(ms: list[Message]) -> list[Message]:
        return [ms[0], codepb.UploadCodesRequest(data=b"H" * (12 * 1024 * 1024))]

    for label, fn in (("empty stream", empty), ("first without promotion_code",
                                                 first_without_code),
                      ("promotion_code in second", code_in_second),
                      ("NUL code in second", nul_in_second), ("3000 small messages",
                                                              many_small),
                      ("3000 empty messages", many_empty), ("UTF-8 split across messages",
                                                             split_utf8),
                      ("12 MB over messages", over_limit), ("12 MB in one message",
                                                             huge_chunk)):
        yield "stream", label, fn


def _with_request_id(request: Request, n: int) -> None:
    first = request[0] if isinstance(request, list) else request
    if "request_id" in first.DESCRIPTOR.fields_by_name:
        first.request_id = f"fz-call-{n}"  # type: ignore[attr-defined]


def _clone(request: Request) -> Request:
    if isinstance(request, list):
        return [_clone(m) for m in request]  # type: ignore[misc]
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


Problems = list[tuple[str, str]]  # (signature, one line)


def stray_errors(w: World) -> Problems:
    """ERROR lines the server logged that no call of ours took (a background task's)."""
    return [(f"server error logged outside a call: {text.split(':')[0]}",
             f"request id {key!r}: {text}") for key in list(w.crashes.records)
            if (text := w.crashes.take(key))]


def report(problems: Problems, calls: int) -> str:
    groups: dict[str, list[str]] = {}
    for signature, line in problems:
        groups.setdefault(signature, []).append(line)
    out = [f"{len(problems)} problems in {calls} calls, {len(groups)} distinct causes:"]
    for signature, lines in sorted(groups.items(), key=lambda g: -len(g[1])):
        out.append(f"* {signature} -- {len(lines)} calls, e.g.:")
        out += [f"    {line[:400]}" for line in lines[:6]]
        if len(lines) > 6:
            out.append(f"    ... and {len(lines) - 6} more")
    return "\n".join(out)


async def fuzz_target(w: World, target: Target, problems: Problems) -> int:
    """Every mutation of the target's valid request; returns the number of calls."""
    name = f"{target.rpc}{f' ({target.label})' if target.label else ''}"
    n = w.n()
    base = await target.build(w, n)
    _with_request_id(base, n)
    outcome = await w.call(target.rpc, base, target.role)
    if outcome.code != "OK":
        problems.append(("the valid request failed", f"{name}: {outcome.code} {outcome.details!r}"))
    messages = base if isinstance(base, list) else [base]
    plans: list[tuple[str, str, Callable[[Request], Request]]] = []
    for index, message in enumerate(messages):
        where = f"message[{index}]." if isinstance(base, list) else ""
        for mutation in mutations(message):
            def plan(request: Request, i: int = index, m: Mutation = mutation) -> Request:
                target_message = request[i] if isinstance(request, list) else request
                m.apply(target_message)
                return request
            plans.append((f"{where}{mutation.path}", mutation.label, plan))
    if isinstance(base, list):
        for path, label, fn in _stream_mutations():
            plans.append((path, label, lambda r, f=fn: f(r)))  # type: ignore[misc]
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(path: str, label: str, plan: Callable[[Request], Request]) -> None:
        async with slots:
            n = w.n()
            request = await target.build(w, n) if target.fresh else _clone(base)
            _with_request_id(request, n)
            outcome, _ = await w.call_for(target.rpc, plan(request), target.role)
        if (problem := outcome.problem()) is not None:
            problems.append((outcome.signature(), f"{name}: {path} = {label}: {problem}"))

    await asyncio.gather(*(one(*p) for p in plans))
    return 1 + len(plans)


# gRPC clients refuse trailers over 16 KiB, and those between 8 and 16 KiB at random (the
# "soft" limit, 8 KiB by default); both limits at 8 KiB make that refusal deterministic.
METADATA_LIMIT_OPTIONS = [("grpc.max_metadata_size", 8192),
                          ("grpc.absolute_max_metadata_size", 8192)]


@contextlib.asynccontextmanager
async def strict_channel(api: Api) -> AsyncIterator[Api]:
    channel = aio.insecure_channel(api.address, options=METADATA_LIMIT_OPTIONS)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        yield Api(channel=channel, address=api.address)
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def world(settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> AsyncIterator[World]:
    """A real server (e-mail listeners enabled: nothing is sent, no worker runs) with the world
    built, and the server's crash log captured."""
    crashes = CrashLog()
    logging.getLogger().addHandler(crashes)
    email = settings.model_copy(update={"smtp_host": "127.0.0.1",
                                        "smtp_from": "promo@example.com"})
    try:
        async with serving_api(email, pool, clock) as served, strict_channel(served) as api:
            w = World(api=api, pool=pool, clock=clock, settings=email, crashes=crashes)
            await build_world(w)
            yield w
    finally:
        logging.getLogger().removeHandler(crashes)


@pytest.mark.parametrize("service", SERVICES)
async def test_no_hostile_request_is_internal(service: str, pool: asyncpg.Pool,
                                              clock: FixedClock, settings: Settings) -> None:
    problems: Problems = []
    calls = 0
    async with world(settings, pool, clock) as w:
        for target in TARGETS:
            if RPCS[target.rpc].service == service:
                calls += await fuzz_target(w, target, problems)
        problems += stray_errors(w)
    assert not problems, report(problems, calls)


# --- forged page tokens ------------------------------------------------------------------------

FORGED_KEYS: list[list[Any]] = [
    [2**63 - 1], [-2**63], [0], [-1], [2**63], [True], [None], [1.5], [[]], [{}], [],
    ["a", "b", "c"], ["\x7f"], ["\u00e9" * 1000], ["i" * 1001], ["\ud800"], ["NaN"],
    ["0001-01-01T00:00:00+14:00"], ["9999-12-31T23:59:59-14:00"], ["0001-01-01T00:00:00"],
    ["0001-01-01T00:00:00+14:00", 1], ["9999-12-31T23:59:59.999999-14:00", 2**63 - 1],
    ["0001-01-01T00:00:00+00:00", 1], ["2026-01-01T00:00:00+00:00", -2**63],
    ["2026-01-01T00:00:00+00:00", "1"], ["2026-13-45T00:00:00+00:00", 1],
]


def forge(token: str, after: list[Any], scope: str) -> str:
    """A token with this list's scope and filters and a correct checksum, but another key: what
    a client that read core/pagination.py can build (the checksum is no signature)."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    payload = json.dumps({"a": after, "f": data["f"], "c": _checksum(after, data["f"], scope)})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


async def _more_list_rows(w: World) -> None:
    """A second row for every list, so that page_size 1 gives a next_page_token."""
    await w.ok("CampaignService/CreateCampaign", campaign_request("camp-2", w))
    await w.ok("ProductPromotionService/CreatePersonalizedPromotion", personalized_request("tea"))
    await w.ok("ProductPromotionService/CreateProductSetDiscount", discount_request("brunch"))
    await w.ok("BonusService/CreateBonusRule", rule_request("each-bet-2"))
    await w.ok("BonusService/CreateBonusSchedule", schedule_request("weekly"))
    await failed_delivery(w)
    results = await w.ok("BonusService/ListBonusResults", bpb.ListBonusResultsRequest(
        customer_id="m1", statuses=[bpb.BONUS_STATUS_CALCULATED]))
    ids = [r.bonus_id for r in results.results]
    await w.ok("BonusService/ApproveBonusResults", bpb.ApproveBonusResultsRequest(
        request_id=rid("ledger"), bonus_ids=ids))


async def test_forged_page_tokens_are_never_internal(pool: asyncpg.Pool, clock: FixedClock,
                                                     settings: Settings) -> None:
    problems: Problems = []
    uncovered = []
    calls = 0
    async with world(settings, pool, clock) as w:
        await _more_list_rows(w)
        lists = [t for t in TARGETS
                 if "page_token" in RPCS[t.rpc].request_type.DESCRIPTOR.fields_by_name]
        assert len({t.rpc for t in lists}) >= 18
        for target in lists:
            rpc = RPCS[target.rpc]
            base = rpc.request_type()
            sample = await target.build(w, 0)
            for name in ("customer_id", "campaign_id", "personalized_promotion_id"):
                if name in base.DESCRIPTOR.fields_by_name:
                    setattr(base, name, getattr(sample, name))
            base.page_size = 1
            await w.ok(target.rpc, base, target.role)
            token = w.facts["last_response"].next_page_token
            if not token:
                uncovered.append(target.rpc)
                continue
            for after in FORGED_KEYS:
                request = _clone(base)
                request.page_token = forge(token, after, rpc.path)
                outcome = await w.call(target.rpc, request, target.role)
                calls += 1
                if (problem := outcome.problem()) is not None:
                    problems.append((outcome.signature(),
                                     f"{target.rpc}: page_token key {str(after)[:60]}: {problem}"))
    assert uncovered == [], f"lists without a second page: {uncovered}"
    assert not problems, report(problems, calls)


# --- Timestamps at the edges of their range, stored and read back ------------------------------

# The first and last instants the service stores: the exact ends of Timestamp's range
# (datetime.min / datetime.max, which asyncpg stores as -infinity / infinity and reads back
# without a zone) are refused as INVALID_TIME (server.convert.timestamp_problem).

MIN_TIME = (-62_135_596_800, 1_000)  # 0001-01-01T00:00:00.000001Z
MAX_TIME = (253_402_300_799, 999_998_999)  # 9999-12-31T23:59:59.999998999Z


def _stamp(value: tuple[int, int]) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=value[0], nanos=value[1])


async def test_timestamps_at_the_edges_of_their_range_are_never_internal(
        pool: asyncpg.Pool, clock: FixedClock, settings: Settings) -> None:
    """The first and last instants read_timestamp accepts. Stored and read back they must
    still work: each step is a separate client call, and none may be INTERNAL (found: the exact
    ends of the range were accepted and then crashed later calls; they are refused now)."""
    problems: Problems = []
    steps = 0
    async with world(settings, pool, clock) as w:
        async def step(what: str, rpc: str, request: Message, role: str = "admin") -> None:
            nonlocal steps
            steps += 1
            outcome = await w.call(rpc, request, role)
            if (problem := outcome.problem()) is not None:
                problems.append((outcome.signature(), f"{what}: {rpc}: {problem}"))

        def bet(external_id: str, customer: str, kind: str = "bet",
                when: timestamp_pb2.Timestamp | None = None) -> custpb.RecordEventsRequest:
            return custpb.RecordEventsRequest(request_id=rid(external_id), events=[custpb.Event(
                external_id=external_id, customer_id=customer, kind=kind, amount="5",
                currency="EUR", attributes={"game": "slots"},
                occurred_at=when or ts(w.clock.now() - timedelta(minutes=1)))])

        # An event at 0001-01-01T00:00:00.000001Z while a rule reads its kind.
        await step("event at 0001-01-01T00:00:00.000001Z", "CustomerService/RecordEvents",
                   bet("min-bet", "c2", when=_stamp(MIN_TIME)), "runtime")
        # Events of a kind no rule reads at that time, then paging through them.
        await w.ok("CustomerService/RecordEvents", custpb.RecordEventsRequest(
            request_id=rid("spins"), events=[custpb.Event(
                external_id=f"spin-{i}", customer_id="c3", kind="spin", amount="5",
                currency="EUR", occurred_at=_stamp(MIN_TIME)) for i in range(2)]), "runtime")
        first = await w.ok("CustomerService/ListCustomerEvents", custpb.ListCustomerEventsRequest(
            customer_id="c3", page_size=1))
        await step("the next page of events at 0001-01-01 (the server's own token)",
                   "CustomerService/ListCustomerEvents", custpb.ListCustomerEventsRequest(
                       customer_id="c3", page_size=1, page_token=first.next_page_token))
        # A rule whose fixed end is 9999-12-31T23:59:59.999998Z, then an ordinary bet.
        rule = rule_request("max-end")
        rule.rule.period_end.CopyFrom(_stamp(MAX_TIME))
        await step("rule ending 9999-12-31T23:59:59.999998Z", "BonusService/CreateBonusRule", rule)
        await step("an ordinary bet after that rule", "CustomerService/RecordEvents",
                   bet("after-max-rule", "c2"), "runtime")
        await step("an ordinary deposit after that rule", "CustomerService/RecordEvents",
                   bet("after-max-rule-d", "c2", "deposit"), "runtime")
        # A campaign executing at 9999-12-31T23:59:59.999998Z, then everything about it.
        campaign = campaign_request("camp-max", w)
        campaign.campaign.execute_at.CopyFrom(_stamp(MAX_TIME))
        await step("campaign at 9999-12-31T23:59:59.999998Z", "CampaignService/CreateCampaign",
                   campaign)
        for rpc, request, role in (
                ("CampaignService/GetCampaign", campb.GetCampaignRequest(campaign_id="camp-max"),
                 "admin"),
                ("CampaignService/ListCampaigns", campb.ListCampaignsRequest(), "admin"),
                ("ClearanceService/ForecastCampaign", campb.ForecastCampaignRequest(
                    campaign_id="camp-max"), "admin"),
                ("ClearanceService/GetProcessedCampaignCustomers",
                 campb.GetProcessedCampaignCustomersRequest(campaign_id="camp-max"), "listener"),
                ("ClearanceService/UpdateCustomerPromotionStatus",
                 campb.UpdateCustomerPromotionStatusRequest(
                     request_id=rid("cmax"), campaign_id="camp-max", statuses=[
                         campb.CustomerPromotionStatus(customer_id="c1", approved=True)]),
                 "listener"),
                ("CampaignService/AddCampaignTargets", campb.AddCampaignTargetsRequest(
                    request_id=rid("cmax"), campaign_id="camp-max", customer_ids=["c3"]),
                 "admin"),
                ("CampaignService/GetCampaignReconciliation",
                 campb.GetCampaignReconciliationRequest(campaign_id="camp-max"), "admin"),
                ("RewardService/GetReward", rpb.GetRewardRequest(
                    request_id=rid("cmax"), promotion_code="VIP25", customer_id="c1",
                    campaign_id="camp-max"), "runtime"),
                ("CampaignService/CancelCampaign", campb.CancelCampaignRequest(
                    request_id=rid("cmax"), campaign_id="camp-max"), "admin")):
            await step("after the campaign at 9999-12-31", rpc, request, role)
        # Fixed periods at the edges (UTC, so the zone does not push them out of range).
        for label, start, end in (("at 0001-01-01", MIN_TIME, (MIN_TIME[0] + 86_400, 0)),
                                  ("ending 9999-12-31", (MAX_TIME[0] - 86_400, 0), MAX_TIME)):
            period = fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
                start=_stamp(start), end=_stamp(end), time_zone="UTC"))
            await step(f"dry run {label}", "FormulaService/DryRunFormula",
                       fpb.DryRunFormulaRequest(source="sum(deposit.amount)", customer_id="c1",
                                                period=period))
            definition = definition_request(f"edge-{start[0]}")
            definition.definition.period.CopyFrom(period)
            await step(f"definition {label}", "BonusService/CreateBonusDefinition", definition)
            await step(f"calculation {label}", "BonusService/RequestBonusCalculation",
                       bpb.RequestBonusCalculationRequest(
                           request_id=rid("edge"), definition_id=f"edge-{start[0]}",
                           customer_ids=["c1"]), "runtime")
        request = bpb.RequestBonusCalculationRequest(
            request_id=rid("edge-q"), definition_id="bets-10", customer_ids=["c3"],
            period_start=_stamp(MIN_TIME), period_end=_stamp((MIN_TIME[0] + 3600, 0)))
        await step("calculation period at 0001-01-01", "BonusService/RequestBonusCalculation",
                   request, "runtime")
        await step("results filtered by both edges", "BonusService/ListBonusResults",
                   bpb.ListBonusResultsRequest(calculated_after=_stamp(MIN_TIME),
                                               calculated_before=_stamp(MAX_TIME)))
    assert not problems, report(problems, steps)


# --- formulas that compile, run for a customer --------------------------------------------------

async def test_formulas_that_compile_are_never_internal_when_granted(
        pool: asyncpg.Pool, clock: FixedClock, settings: Settings) -> None:
    """Every formula of FORMULAS as a CALCULATED reward and as a tier's condition: the ones the
    server accepts are then granted (GetReward) to a customer with data, one at the decimal
    limits, and one with nothing, and reconciled."""
    problems: Problems = []
    calls = 0
    async with world(settings, pool, clock) as w:
        await w.ok("CustomerService/UpsertCustomers", custpb.UpsertCustomersRequest(
            request_id=rid("rich"), customers=[custpb.Customer(
                customer_id="rich", currency="EUR", properties={
                    "level": custpb.PropertyValue(decimal_value="99999999999999.999999"),
                    "tier": custpb.PropertyValue(string_value="Gold")})]))
        await w.ok("CustomerService/RecordEvents", custpb.RecordEventsRequest(
            request_id=rid("rich"), events=[custpb.Event(
                external_id=f"rich-{i}", customer_id="rich", kind="deposit",
                amount="99999999999999.999999", currency="EUR",
                occurred_at=ts(w.clock.now() - timedelta(hours=1, minutes=i)))
                for i in range(5)]), "runtime")
        extra = [("limits cubed", 'customer["level"] * customer["level"] * customer["level"]'),
                 ("sum times 1e14", "sum(deposit.amount) * 99999999999999"),
                 ("divide by a millionth", "last(deposit.amount) / 0.000001")]
        for index, (label, formula) in enumerate(FORMULAS + extra):
            for how, reward in (
                    ("calculated", ppb.PromotionReward(
                        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED, formula=formula,
                        rounding=ppb.ROUNDING_MODE_ROUND_UP, decimals=6)),
                    ("tier condition", ppb.PromotionReward(
                        reward_type="cashback", kind=ppb.REWARD_KIND_TIERED,
                        tiers=[ppb.Tier(condition=formula, value="last(deposit.amount)")]))):
                code = f"FX{index}{how[0]}"
                steps: list[tuple[str, str, Message, str]] = [
                    ("create", "PromotionService/CreatePromotion", ppb.CreatePromotionRequest(
                        request_id=rid(code), activate=True, promotion=ppb.Promotion(
                            promotion_code=code, name=label, rewards=[reward])), "admin")]
                steps += [(f"grant to {c}", "RewardService/GetReward", rpb.GetRewardRequest(
                    request_id=rid(code), promotion_code=code, customer_id=c), "runtime")
                    for c in ("c1", "rich", "nobody")]
                steps.append(("reconcile", "PromotionService/GetPromotionReconciliation",
                              ppb.GetPromotionReconciliationRequest(promotion_code=code),
                              "admin"))
                for what, rpc, request, role in steps:
                    outcome = await w.call(rpc, request, role)
                    calls += 1
                    if (problem := outcome.problem()) is not None:
                        problems.append((outcome.signature(),
                                         f"{how} formula {label!r}: {what}: {problem}"))
                    if what == "create" and outcome.code != "OK":
                        break
    assert not problems, report(problems, calls)


# --- errors that echo a long non-ASCII value -------------------------------------------------

@pytest.mark.parametrize("value", ["\U0001f600" * 2000, "\u00e9" * 1353],
                         ids=["2000 emoji", "1353 e-acute"])
async def test_an_error_echoing_a_non_ascii_value_reaches_the_client(api: Api,
                                                                    value: str) -> None:
    """server/errors.py cuts messages to 2,000 characters so the trailers stay under gRPC's
    limits; but the message is sent percent-encoded (grpc-message: up to 12 bytes for one
    character) and again in grpc-status-details-bin. The client must still get NOT_FOUND with
    its ErrorInfo, not RESOURCE_EXHAUSTED "received metadata size exceeds ... limit" (over
    16 KiB always; over the 8 KiB soft limit at random, which strict_channel makes certain)."""
    request = rtpb.GetRewardTypeRequest(name=value)
    async with strict_channel(api) as strict:
        with pytest.raises(grpc.RpcError) as caught:
            await strict.channel.unary_unary(
                RPCS["RewardTypeService/GetRewardType"].path,
                request_serializer=rtpb.GetRewardTypeRequest.SerializeToString,
                response_deserializer=rtpb.GetRewardTypeResponse.FromString)(
                    request, metadata=api.key(), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "REWARD_TYPE_NOT_FOUND"


# --- hostile call metadata --------------------------------------------------------------------

METADATA: list[tuple[str, tuple[tuple[str, str | bytes], ...]]] = [
    ("no key", ()), ("empty x-api-key", (("x-api-key", ""),)),
    ("spaces x-api-key", (("x-api-key", "   "),)), ("bearer only", (("authorization", "Bearer"),)),
    ("bearer space", (("authorization", "Bearer "),)), ("basic auth", (("authorization",
                                                                     "Basic YTpi"),)),
    ("huge key", (("x-api-key", "k" * 7000),)),
    ("two keys", (("x-api-key", "wrong"), ("x-api-key", "test-admin-key-0123456789"))),
    ("huge request id", (("x-api-key", "test-admin-key-0123456789"),
                         ("x-request-id", "r" * 7000))),
    ("binary request id", (("x-api-key", "test-admin-key-0123456789"),
                           ("x-request-id-bin", b"\xff\x00\xfe"))),
    ("binary api key", (("x-api-key-bin", b"\xff\xfe"),)),
    ("spaces in request id", (("x-api-key", "test-admin-key-0123456789"),
                              ("x-request-id", "a b c"))),
    ("binary trace header first", (("x-client-trace-bin", b"\x00\x9f\xff"),
                                   ("x-api-key", "test-admin-key-0123456789"))),
]


@pytest.mark.parametrize(("label", "metadata"), METADATA, ids=[m[0] for m in METADATA])
async def test_hostile_metadata_is_never_internal(api: Api, label: str,
                                                  metadata: tuple[tuple[str, Any], ...]) -> None:
    call = api.channel.unary_unary(
        RPCS["RewardTypeService/ListRewardTypes"].path,
        request_serializer=rtpb.ListRewardTypesRequest.SerializeToString,
        response_deserializer=rtpb.ListRewardTypesResponse.FromString)
    try:
        await call(rtpb.ListRewardTypesRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        assert exc.code().name not in BAD_CODES, (exc.code(), exc.details())
        assert error_info_of(exc) is not None, (exc.code(), exc.details())
