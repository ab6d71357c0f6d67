"""Personalized promo codes: the upload file's rules, the alert thresholds, the inventory.

A promotion's promo code is the promotion code itself, or PERSONALIZED: a pool of unique
one-time codes uploaded as CSV files (one column, no header, at most 10 MB, UTF-8), with an
optional fallback code handed out once the pool is empty. A file is accepted whole or not at
all: every problem line is found (the first few reported, and a count), and nothing is added.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from core.errors import InvalidArgument

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_CODE_LENGTH = 64
MAX_THRESHOLDS = 10
REPORTED_LINE_ERRORS = 10
# A code is printable and has no whitespace, comma (a second column) or quote inside it.
_CODE = re.compile(rf'[^\s,"\x00-\x1f\x7f]{{1,{MAX_CODE_LENGTH}}}')
_UTF8_BOM = "\ufeff"


class CodeType(enum.Enum):
    PROMOTION_CODE = "PROMOTION_CODE"
    PERSONALIZED = "PERSONALIZED"


@dataclass(frozen=True)
class AlertThreshold:
    """Alert when the remaining codes fall to ``remaining_codes``, or to ``remaining_percent``
    of the pool's total (exactly one is set)."""

    remaining_codes: int | None = None
    remaining_percent: Decimal | None = None

    @property
    def key(self) -> str:
        if self.remaining_codes is not None:
            return f"remaining:{self.remaining_codes}"
        return f"percent:{self.remaining_percent}"

    def level(self, total: int) -> int:
        """The remaining count at or below which this threshold is breached."""
        if self.remaining_codes is not None:
            return self.remaining_codes
        assert self.remaining_percent is not None
        return int((Decimal(total) * self.remaining_percent / 100).to_integral_value(ROUND_FLOOR))


def validate_thresholds(thresholds: tuple[AlertThreshold, ...]) -> tuple[AlertThreshold, ...]:
    if len(thresholds) > MAX_THRESHOLDS:
        raise _bad(f"at most {MAX_THRESHOLDS} code alert thresholds", "code_alerts")
    seen: set[str] = set()
    for index, threshold in enumerate(thresholds):
        where = f"code_alerts[{index}]"
        codes, percent = threshold.remaining_codes, threshold.remaining_percent
        if (codes is None) == (percent is None):
            raise _bad(f"{where}: set exactly one of remaining_codes or remaining_percent",
                       where)
        if codes is not None and codes < 1:
            raise _bad(f"{where}.remaining_codes must be at least 1 (an empty pool has its "
                       "own alert)", f"{where}.remaining_codes")
        if percent is not None and not (Decimal(0) < percent < Decimal(100)):
            raise _bad(f"{where}.remaining_percent must be between 0 and 100 (exclusive)",
                       f"{where}.remaining_percent")
        if percent is not None and percent != percent.quantize(Decimal("0.01")):
            raise _bad(f"{where}.remaining_percent has at most 2 decimal places",
                       f"{where}.remaining_percent")
        # "10" and "10.0" percent are one threshold (key keeps the text as stored: alert
        # state recorded under it stays valid).
        same = (threshold.key if percent is None
                else f"percent:{format(percent.normalize(), 'f')}")
        if same in seen:
            raise _bad(f"{where} repeats an earlier threshold", where)
        seen.add(same)
    return thresholds


def validate_code_settings(code_type: CodeType, fallback_code: str,
                           thresholds: tuple[AlertThreshold, ...]) -> None:
    """The promo-code part of a promotion."""
    if code_type is CodeType.PROMOTION_CODE:
        if fallback_code or thresholds:
            raise _bad("fallback_code and code_alerts need code_type PERSONALIZED",
                       "code_type")
        return
    if fallback_code and not valid_code(fallback_code):
        raise _bad(f"fallback_code must be 1-{MAX_CODE_LENGTH} printable characters without "
                   "spaces, commas or quotes", "fallback_code")
    validate_thresholds(thresholds)


def valid_code(code: str) -> bool:
    """1-64 printable characters, none of them whitespace, a comma or a quote."""
    return bool(_CODE.fullmatch(code)) and code.isprintable()


def _bad(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_CODE_SETTINGS", metadata={"field": field})


@dataclass(frozen=True)
class LineError:
    line: int
    problem: str


@dataclass(frozen=True)
class CodeFile:
    """The codes of an accepted file, in file order, and the file's lines, trimmed."""

    codes: list[str]
    trimmed_lines: list[str]

    def line_numbers(self) -> list[int]:
        """The line each code came from (computed on demand: only errors need it)."""
        return [number for number, line in enumerate(self.trimmed_lines, start=1) if line]


class CodeFileRejected(InvalidArgument):
    """The whole file is rejected; ``errors`` lists the first problem lines (in line order, at
    least REPORTED_LINE_ERRORS of them when there are that many) and ``count`` how many there
    are in all."""

    def __init__(self, errors: list[LineError], count: int | None = None) -> None:
        count = len(errors) if count is None else count
        shown = errors[:REPORTED_LINE_ERRORS]
        more = count - len(shown)
        listed = "; ".join(f"line {e.line}: {e.problem}" for e in shown)
        tail = f"; and {more} more" if more else ""
        super().__init__(
            f"the code file was rejected, nothing was added: {count} problem "
            f"line{'s' if count != 1 else ''}: {listed}{tail}",
            reason="CODE_FILE_REJECTED",
            metadata={"error_count": str(count),
                      "lines": ",".join(str(e.line) for e in shown)})
        self.errors = errors
        self.count = count


def too_large(size: int) -> InvalidArgument:
    return InvalidArgument(
        f"the code file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB "
        f"({size:,} bytes so far); split it into several uploads",
        reason="CODE_FILE_TOO_LARGE", metadata={"max_bytes": str(MAX_UPLOAD_BYTES)})


def parse_code_file(data: bytes) -> CodeFile:
    """The codes of one upload: lines trimmed, blank lines skipped, every other problem (bytes
    that are not UTF-8, a second column, a bad or too long code, a code twice in the file)
    reported by line number. Raises CodeFileRejected, or InvalidArgument for an empty file."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise too_large(len(data))
    try:
        text = data.decode("utf-8")
        lines = text.split("\n")
        errors: list[LineError] = []
        undecodable = 0
    except UnicodeDecodeError:
        lines, errors, undecodable = _decode_lines(data)
    if lines and lines[0].startswith(_UTF8_BOM):
        lines[0] = lines[0][1:]
    if not errors:
        accepted = _all_valid(lines)
        if accepted is not None:
            return accepted
    codes: list[str] = []
    trimmed: list[str] = []
    first_line: dict[str, int] = {}
    # Only the first problems are described (the answer names REPORTED_LINE_ERRORS of them);
    # the rest are counted. Describing each of a 10 MiB file's five million bad lines took 14 s
    # and 870 MB. Both kinds of error come in line order, so the first of each are enough.
    count = undecodable
    for number, raw in enumerate(lines, start=1):
        code = raw.strip()
        trimmed.append(code)
        if not code:
            continue
        if not valid_code(code):
            count += 1
            if count - undecodable <= REPORTED_LINE_ERRORS:
                errors.append(LineError(number, _problem(code)))
            continue
        earlier = first_line.setdefault(code, number)
        if earlier != number:
            count += 1
            if count - undecodable <= REPORTED_LINE_ERRORS:
                errors.append(LineError(number, f"code {code!r} is already on line {earlier}"))
            continue
        if not count:
            codes.append(code)
    if count:
        errors.sort(key=lambda e: e.line)
        raise CodeFileRejected(errors, count)
    if not codes:
        raise InvalidArgument("the code file has no codes (every line is blank)",
                              reason="CODE_FILE_EMPTY")
    return CodeFile(codes, trimmed)


def _all_valid(lines: list[str]) -> CodeFile | None:
    """The fast path for a good file, a few passes in C over all the lines; None if anything
    is wrong, for the line-by-line pass to say what and where."""
    stripped = [line.strip() for line in lines]
    codes = [code for code in stripped if code]
    if not codes:
        raise InvalidArgument("the code file has no codes (every line is blank)",
                              reason="CODE_FILE_EMPTY")
    joined = "".join(codes)  # isprintable() is False for every whitespace but " "
    if (max(map(len, codes)) > MAX_CODE_LENGTH or not joined.isprintable() or " " in joined
            or "," in joined or '"' in joined or len(set(codes)) != len(codes)):
        return None
    return CodeFile(codes, stripped)


_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


def _decode_lines(data: bytes) -> tuple[list[str], list[LineError], int]:
    """For a file that is not valid UTF-8 as a whole: its lines, bad ones blanked (so that line
    numbers still count); the first REPORTED_LINE_ERRORS bad ones described, all counted. One
    decoding pass in C: a strict decode per line, and an error built for each, took 33 s and
    1.1 GB for a 10 MiB file of bad lines."""
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    errors: list[LineError] = []
    count = 0
    for index, line in enumerate(lines):
        if _ESCAPED.search(line) is None:
            continue
        count += 1
        if len(errors) < REPORTED_LINE_ERRORS:
            try:
                line.encode("utf-8", errors="surrogateescape").decode("utf-8")
                start = 0  # pragma: no cover - a line with an escaped byte never decodes
            except UnicodeDecodeError as exc:
                start = exc.start
            errors.append(LineError(index + 1, f"is not valid UTF-8 (byte {start + 1})"))
        lines[index] = ""
    return lines, errors, count


def _problem(code: str) -> str:
    if "," in code:
        return "has more than one column (a comma); the file must have one column"
    if len(code) > MAX_CODE_LENGTH:
        return f"code is {len(code)} characters long, at most {MAX_CODE_LENGTH} allowed"
    return "code has spaces, quotes or control characters inside it"


@dataclass(frozen=True)
class Inventory:
    """A pool's numbers as the lobby shows them ("43/100", "0 available")."""

    total: int
    used: int
    fallback_grants: int = 0

    @property
    def available(self) -> int:
        return self.total - self.used
