"""Human output of the operator CLI (rich tables); ``--json`` output lives in cli/client.py."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf.message import Message
from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.client import to_dict


def console() -> Console:
    """A console on the current stdout (tests swap it), never wrapping JSON-like cells."""
    return Console(highlight=False, soft_wrap=False)


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def show_message(message: Message, title: str | None = None,
                 skip: tuple[str, ...] = ()) -> None:
    """A message as a two-column table: field, value (nested values as compact JSON)."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in to_dict(message).items():
        if value in ("", [], {}, None) or key in skip:
            continue
        table.add_row(key, _cell(value))
    console().print(table)


def show_rows(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              next_page_token: str = "") -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    count = 0
    for row in rows:
        table.add_row(*(_cell(v) if not isinstance(v, Text | Group | Table) else v
                        for v in row))
        count += 1
    out = console()
    if count:
        out.print(table)
    else:
        out.print(f"no {title.lower()}")
    if next_page_token:
        out.print(f"more: --page-token {next_page_token}  (or --all)")


def usage_bar(label: str, used: str, limit: str, reached: bool) -> Table:
    """One cap: ``label used/limit`` over a bar as wide as its cell (a cap without a limit
    shows the amount only)."""
    try:
        total = Decimal(limit) if limit else Decimal(0)
        done = Decimal(used or "0")
    except InvalidOperation:
        total, done = Decimal(0), Decimal(0)
    grid = Table.grid(expand=True)
    grid.add_column()
    if total <= 0:
        grid.add_row(Text(f"{label} {used or '0'}"))
        return grid
    grid.add_row(Text(f"{label} {used}/{limit}" + (" (reached)" if reached else "")))
    grid.add_row(ProgressBar(total=float(total), completed=float(min(done, total)), width=None,
                             complete_style="red" if reached else "green",
                             finished_style="red"))
    return grid


def stack(items: list[Any]) -> Group | str:
    return Group(*items) if items else ""
