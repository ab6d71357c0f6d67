"""The upload file's rules (seed 002): one column, no header, UTF-8, at most 10 MB; trimmed,
blank lines skipped, everything else rejects the whole file with line numbers."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.codes import (
    MAX_UPLOAD_BYTES,
    AlertThreshold,
    CodeFileRejected,
    CodeType,
    parse_code_file,
    validate_code_settings,
)
from core.errors import InvalidArgument


def test_codes_are_trimmed_and_blank_lines_skipped() -> None:
    parsed = parse_code_file(b"\xef\xbb\xbfFLASH-001\r\n  FLASH-002  \n\n \t \nFLASH-003")
    assert parsed.codes == ["FLASH-001", "FLASH-002", "FLASH-003"]
    assert parsed.line_numbers() == [1, 2, 5]


@pytest.mark.parametrize(("data", "line", "fragment"), [
    (b"A1\nB2,extra\nC3\n", 2, "more than one column"),
    (b"A1\n" + b"X" * 65 + b"\n", 2, "65 characters long, at most 64"),
    (b"A1\nB\xff2\nC3\n", 2, "not valid UTF-8"),
    (b"A1\nB2\nA1\n", 3, "already on line 1"),
    (b"A1\nhas space\n", 2, "spaces, quotes or control characters"),
    (b'A1\n"B2"\n', 2, "spaces, quotes or control characters"),
])
def test_a_bad_line_rejects_the_file_naming_it(data: bytes, line: int, fragment: str) -> None:
    with pytest.raises(CodeFileRejected) as caught:
        parse_code_file(data)
    assert [e.line for e in caught.value.errors] == [line]
    assert fragment in caught.value.message
    assert caught.value.reason == "CODE_FILE_REJECTED"
    assert caught.value.metadata == {"error_count": "1", "lines": str(line)}


def test_the_first_ten_problems_are_listed_and_the_rest_counted() -> None:
    data = b"\n".join(f"C{i},x".encode() for i in range(1, 26))
    with pytest.raises(CodeFileRejected) as caught:
        parse_code_file(data)
    # Only the reported ones are described (describing five million bad lines took 14 s).
    assert (len(caught.value.errors), caught.value.count) == (10, 25)
    assert caught.value.metadata["lines"] == ",".join(str(i) for i in range(1, 11))
    assert caught.value.message.startswith(
        "the code file was rejected, nothing was added: 25 problem lines: line 1:")
    assert caught.value.message.endswith("; and 15 more")


def test_undecodable_and_bad_lines_are_listed_in_line_order_and_all_counted() -> None:
    lines = [b"\xff%d" % i if i % 2 else b"C%d,x" % i for i in range(1, 31)]
    with pytest.raises(CodeFileRejected) as caught:
        parse_code_file(b"\n".join(lines))
    assert caught.value.count == 30
    assert caught.value.metadata["lines"] == ",".join(str(i) for i in range(1, 11))
    assert caught.value.message.endswith("; and 20 more")


def test_a_file_over_10_mb_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_code_file(b"A" * (MAX_UPLOAD_BYTES + 1))
    assert caught.value.reason == "CODE_FILE_TOO_LARGE"


def test_a_file_of_blank_lines_has_no_codes() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_code_file(b"\n  \n\r\n")
    assert caught.value.reason == "CODE_FILE_EMPTY"


@given(st.binary(max_size=2000))
def test_any_bytes_give_codes_or_a_clear_rejection(data: bytes) -> None:
    try:
        parsed = parse_code_file(data)
    except InvalidArgument as exc:
        assert exc.reason in ("CODE_FILE_REJECTED", "CODE_FILE_EMPTY")
        return
    assert len(set(parsed.codes)) == len(parsed.codes)
    assert all(c and c == c.strip() and "," not in c for c in parsed.codes)


def test_threshold_levels() -> None:
    assert AlertThreshold(remaining_codes=100).level(50_000) == 100
    assert AlertThreshold(remaining_percent=Decimal("10")).level(50_000) == 5_000
    assert AlertThreshold(remaining_percent=Decimal("12.5")).level(99) == 12  # floor


@pytest.mark.parametrize(("thresholds", "fragment"), [
    ((AlertThreshold(),), "exactly one of"),
    ((AlertThreshold(remaining_codes=0),), "at least 1"),
    ((AlertThreshold(remaining_percent=Decimal("100")),), "between 0 and 100"),
    ((AlertThreshold(remaining_percent=Decimal("1.005")),), "2 decimal places"),
    ((AlertThreshold(remaining_codes=5), AlertThreshold(remaining_codes=5)), "repeats"),
    # The same percentage written two ways is one threshold, not two alerts at one level.
    ((AlertThreshold(remaining_percent=Decimal("10")),
      AlertThreshold(remaining_percent=Decimal("10.0"))), "code_alerts[1] repeats"),
    ((AlertThreshold(remaining_percent=Decimal("2.50")),
      AlertThreshold(remaining_percent=Decimal("2.5"))), "code_alerts[1] repeats"),
])
def test_bad_thresholds(thresholds: tuple[AlertThreshold, ...], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_code_settings(CodeType.PERSONALIZED, "", thresholds)
    assert fragment in caught.value.message


def test_pool_settings_need_a_personalized_promotion() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_code_settings(CodeType.PROMOTION_CODE, "LOYALTY10", ())
    assert "code_type PERSONALIZED" in caught.value.message
    with pytest.raises(InvalidArgument):
        validate_code_settings(CodeType.PERSONALIZED, "LOYALTY 10", ())
