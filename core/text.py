"""Text the database can store: the one check every free-text input shares.

Why: protobuf strings are any valid UTF-8, NUL (U+0000) included, but PostgreSQL's text and
jsonb cannot hold NUL (text refuses the byte, jsonb the ``\\u0000`` escape). Unchecked, such a
value fails deep in the storage layer and the caller gets INTERNAL for what is bad input. Each
validator asks this module and reports the problem with its own reason and position, so the
caller learns which field to fix.

Only NUL is refused here: other control characters (tabs, line breaks) are storable and may be
meaningful in free text such as a description. Identifiers follow stricter rules of their own
(core.customers refuses every control character in a customer id).
"""

from __future__ import annotations

NUL = "\x00"


def storable(value: str) -> str:
    """``value`` with every NUL shown as U+FFFD, for text we record rather than receive: a
    peer's answer quoted in an error (a gzip-compressed error page starts with NUL bytes) must
    not make the recording of the attempt itself fail."""
    return value.replace(NUL, "\ufffd") if NUL in value else value


def nul_problem(value: str, what: str) -> str | None:
    """Why ``value`` cannot be stored, as "<what> must not contain ...", or None when it can."""
    if NUL in value:
        return f"{what} must not contain the NUL character (U+0000): it cannot be stored"
    return None
