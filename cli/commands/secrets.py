"""`promo secrets`: webhook listener secrets at rest (docs/webhooks.md, "Secrets at rest").

Unlike the other command groups this one talks to PostgreSQL directly (PROMO_DATABASE_URL),
like `promo migrate`: re-sealing needs the keys, which only the service's own settings hold,
and must reach every row whatever the API shows.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import asyncpg
import typer
from rich.console import Console

from cli.settings_loader import load_settings_or_exit
from config.settings import Settings
from core.secret_box import SecretBox
from storage.listener_secrets import DEFAULT_BATCH_SIZE, ResealResult, reseal_listener_secrets

app = typer.Typer(help="Webhook listener secrets at rest.", no_args_is_help=True)
console = Console(stderr=True)


def _settings() -> Settings:
    return load_settings_or_exit(console)  # one line per bad setting, never a value


async def _reseal(dsn: str, box: SecretBox, batch_size: int) -> ResealResult:
    conn = await asyncpg.connect(dsn)
    try:
        return await reseal_listener_secrets(conn, box, batch_size=batch_size)
    finally:
        await conn.close()


@app.command()
def reseal(
    batch_size: Annotated[int, typer.Option(
        min=1, max=10_000, help="Listeners per transaction (their rows are locked meanwhile).")
    ] = DEFAULT_BATCH_SIZE,
) -> None:
    """Re-seal every listener secret under the first key of PROMO_SECRET_ENCRYPTION_KEYS.

    Clear secrets get sealed too; rows already under that key are left alone (safe to rerun).
    Exits 1 if some secret opens with none of the keys.
    """
    settings = _settings()
    if not settings.database_url:
        console.print("[red]PROMO_DATABASE_URL is not set[/red]")
        raise typer.Exit(2)
    box = settings.secret_box()
    if not box.sealing:
        console.print("[red]PROMO_SECRET_ENCRYPTION_KEYS is not set:[/red] there is no key to "
                      "seal with (see docs/webhooks.md, \"Secrets at rest\")")
        raise typer.Exit(2)
    result = asyncio.run(_reseal(settings.database_url, box, batch_size))
    print(f"resealed {result.changed} listener(s) under key id {box.current_key_id}; "
          f"{result.unchanged} already were", flush=True)
    for bad in result.unreadable:
        console.print(f"[red]listener {bad.listener_id}:[/red] {bad.column} left as it is: "
                      f"{bad.error}")
    if result.unreadable:
        console.print(f"{len(result.unreadable)} listener(s) could not be re-sealed: configure "
                      "the key id named above, or give those listeners a new secret "
                      "(UpdateListener)")
        raise typer.Exit(1)
