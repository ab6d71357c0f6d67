"""The part of a GetReward request's ``context`` map that goes into the log.

Why bounded: the map is free-form caller data on the hot path; an unbounded map would let one
caller write megabytes of log per call. Why redacted: callers sometimes pass tokens or keys
along with campaign attributes, and a secret must never reach a log line. The rules are the
ones rewards.proto states for GetRewardRequest.context.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_ENTRIES = 20
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 256
REDACTED = "[redacted]"
# A key that names a credential: its value is never logged.
# Searched anywhere in the key: "pwd" (db_pwd), "bearer", "jwt", "access_key", "signature",
# "otp", "pin" as a word of its own (user_pin, PIN) besides the longer names.
_SECRET_KEY = re.compile(r"pass(word|wd)?|pwd|secret|token|api[-_ ]?key|auth|credential|"
                         r"session|cookie|private[-_ ]?key|access[-_ ]?key|bearer|jwt|"
                         r"signature|(^|[-_ .])(otp|pin|cvv|cvc)($|[-_ .])", re.IGNORECASE)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def loggable_context(context: Mapping[str, str]) -> dict[str, str]:
    """At most MAX_ENTRIES entries (the first keys in sorted order), keys and values cut to
    their maximum length, values of keys that name a credential replaced by REDACTED; a map
    with more entries says how many were left out under the key "…"."""
    keys = sorted(context)
    shown: dict[str, str] = {}
    for key in keys[:MAX_ENTRIES]:
        value = REDACTED if _SECRET_KEY.search(key) else _cut(context[key], MAX_VALUE_LENGTH)
        shown[_cut(key, MAX_KEY_LENGTH)] = value
    if len(keys) > MAX_ENTRIES:
        shown["…"] = f"{len(keys) - MAX_ENTRIES} more entries not logged"
    return shown
