"""Option types shared by the operator CLI's command groups."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
RequestIdOpt = Annotated[str | None, typer.Option(
    "--request-id",
    help="Idempotency key: retrying with the same id changes nothing (default: a fresh one).")]
PageSizeOpt = Annotated[int, typer.Option(min=0, max=1000, help="Items per page.")]
PageTokenOpt = Annotated[str, typer.Option(help="Continue after a previous page.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Follow every page.")]
