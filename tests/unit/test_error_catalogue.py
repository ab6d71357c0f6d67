"""docs/errors.md is the generated catalogue of every ErrorInfo reason (scripts/error_catalogue.py):
it must match the sources, as the generated protobuf stubs must match the protos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_error_catalogue_is_current() -> None:
    done = subprocess.run([sys.executable, "scripts/error_catalogue.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_catalogue_lists_the_statuses_the_interceptors_make() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    for row in ("| `DATABASE_UNAVAILABLE` | UNAVAILABLE |", "| `DATABASE_TIMEOUT` | UNAVAILABLE |",
                "| `MISSING_FIELD` | INVALID_ARGUMENT |", "| `PROMOTION_NOT_FOUND` | NOT_FOUND |",
                "| `ROLE_REQUIRED` | PERMISSION_DENIED |"):
        assert row in text, row
