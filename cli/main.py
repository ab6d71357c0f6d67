"""The `promo` command: run the service, its workers, migrations, or everything at once."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.text import Text

from cli.settings_loader import load_settings_or_exit
from config.settings import MIN_API_KEY_LENGTH, ApiKeyConfig, Settings
from core.secret_box import generate_key, parse_keys

app = typer.Typer(help="Promotions and rewards engine.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True)
log = logging.getLogger("promo.cli")
T = TypeVar("T")
ADMIN_KEY_FILE = "admin-api-key"
SECRET_KEY_FILE = "secret-key"


def _settings() -> Settings:
    """Every command that reads the settings goes through here (or, for `promo secrets`,
    through the same cli.settings_loader): a bad setting is one line each, never a value."""
    return load_settings_or_exit(console)


def _fail(message: str) -> typer.Exit:
    """Print one plain-text line (paths may hold '[') and give the exit to raise (status 2)."""
    console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True, highlight=False)
    return typer.Exit(2)


def _warn_if_secrets_in_clear(settings: Settings) -> None:
    """Once per process start: without a key, listener secrets are stored readable."""
    if settings.secret_encryption_keys is None:
        log.warning("PROMO_SECRET_ENCRYPTION_KEYS is not set: webhook listener secrets are "
                    "stored in clear, so a database dump can forge our webhooks; see "
                    "docs/webhooks.md, \"Secrets at rest\"")


def _run_or_fail(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main); a start that cannot go on (cli.runtime.StartupError: an unreachable
    database or Redis, a port in use) is one line naming the setting, exit status 1."""
    from cli.runtime import StartupError
    try:
        return asyncio.run(main)
    except StartupError as exc:
        console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True,
                      highlight=False)
        raise typer.Exit(1) from None


@app.command()
def serve() -> None:
    """Run the gRPC server against PROMO_DATABASE_URL."""
    from cli.runtime import run_server
    settings = _settings()
    _require(settings, "serve", "database_url")
    _warn_if_secrets_in_clear(settings)
    _run_or_fail(run_server(settings))


@app.command()
def worker() -> None:
    """Run an arq worker (outbox jobs, sweeper) against PROMO_DATABASE_URL and PROMO_REDIS_URL."""
    from cli.runtime import run_worker
    settings = _settings()
    _require(settings, "worker", "database_url", "redis_url")
    _warn_if_secrets_in_clear(settings)
    _run_or_fail(run_worker(settings))


def _require(settings: Settings, command: str, *names: str) -> None:
    """A setting ``command`` cannot run without is a bad setting: one line each, status 2
    (as every other bad setting), not a traceback from inside the event loop."""
    missing = [name for name in names if not getattr(settings, name)]
    for name in missing:
        console.print(Text.assemble(
            ("invalid settings: ", "red"),
            f"PROMO_{name.upper()}: is not set; `promo {command}` needs it (or use `promo up`, "
            "which starts embedded PostgreSQL and Redis when none are configured)"),
            soft_wrap=True, highlight=False)
    if missing:
        raise typer.Exit(2)


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several processes at once)."""
    from cli.runtime import migrate_or_fail
    settings = _settings()
    if not settings.database_url:
        console.print("[red]PROMO_DATABASE_URL is not set[/red]")
        raise typer.Exit(2)
    applied = _run_or_fail(migrate_or_fail(settings.database_url))
    console.print(f"applied {len(applied)} migration(s): {applied}" if applied
                  else "database is up to date")


def _write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` all at once: a temporary file (mode 0600) in the same folder,
    flushed to disk, then renamed over ``path``. A crash or a full disk leaves either no file
    or the whole key, never an empty file that would stop every later start."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp creates the file with mode 0600
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _local_admin_key(data_dir: Path) -> str:
    """The admin key of this data folder: created once (mode 0600), reused after. Raises
    ValueError (never quoting the content) if the file holds something too short to be a key."""
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        if len(key) < MIN_API_KEY_LENGTH:
            raise ValueError(f"it holds {len(key)} characters, a key has at least "
                             f"{MIN_API_KEY_LENGTH}; delete the file and `promo up` creates a "
                             "new key")
        return key
    key = "pk_" + secrets.token_urlsafe(32)
    _write_key_file(path, key)
    return key


def _local_secret_key(data_dir: Path) -> str:
    """The listener-secret key of this data folder, for the embedded PostgreSQL beside it:
    created once (mode 0600), reused after. Raises ValueError if the file holds no valid key."""
    path = data_dir / SECRET_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        parse_keys(key)
        return key
    key = generate_key()
    _write_key_file(path, key)
    return key


@app.command()
def up() -> None:
    """Run server and worker together; start embedded PostgreSQL/Redis when none is configured."""
    from cli.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServiceError
    from cli.runtime import run_server
    from server.app import RunningServer

    settings = _settings()
    data_dir = settings.data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"PROMO_DATA_DIR: cannot use {data_dir} as the data folder "
                    f"({exc.strerror or exc})") from None
    overrides: dict[str, object] = {}
    postgres = redis = None
    admin_key: str | None = None
    try:
        if not settings.database_url:
            postgres = EmbeddedPostgres(data_dir, run_as_user=settings.embedded_pg_user)
            overrides["database_url"] = postgres.start()
        if not settings.redis_url:
            redis = EmbeddedRedis(data_dir)
            overrides["redis_url"] = redis.start()
        if not settings.api_keys:
            try:
                admin_key = _local_admin_key(data_dir)
            except ValueError as exc:
                raise _fail(f"{data_dir / ADMIN_KEY_FILE} holds no valid key: {exc}") from None
            overrides["api_keys"] = [ApiKeyConfig(name="local-admin", key=admin_key,
                                                  roles=["admin"])]
        local_secret_key = postgres is not None and settings.secret_encryption_keys is None
        if local_secret_key:  # the database lives in this folder: its key may live beside it
            try:
                overrides["secret_encryption_keys"] = SecretStr(_local_secret_key(data_dir))
            except ValueError as exc:
                raise _fail(f"{data_dir / SECRET_KEY_FILE} holds no valid key: {exc}") from None
        effective = settings.model_copy(update=overrides)
        _warn_if_secrets_in_clear(effective)

        def ready(running: RunningServer) -> None:
            lines = [f"promo is up: gRPC on {running.address}"
                     + (" (TLS)" if effective.tls_enabled else " (plaintext)")]
            if postgres is not None:
                lines.append(f"embedded PostgreSQL: {overrides['database_url']}")
            if redis is not None:
                lines.append(f"embedded Redis: {overrides['redis_url']}")
            if admin_key is not None:
                lines.append(f"admin API key: {admin_key}")
                lines.append(f"  (stored in {data_dir / ADMIN_KEY_FILE})")
            if local_secret_key:
                lines.append(f"listener secrets sealed with the key in "
                             f"{data_dir / SECRET_KEY_FILE}")
            lines.append("press Ctrl-C to stop")
            print("\n".join(lines), flush=True)

        _run_or_fail(run_server(effective, on_ready=ready, with_worker=True))
    except EmbeddedServiceError as exc:
        console.print(f"[red]cannot start the embedded services:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()


@app.command()
def demo(
    address: Annotated[str, typer.Option(envvar="PROMO_ADDRESS",
                                         help="host:port of the gRPC server.")] = "127.0.0.1:50051",
    api_key: Annotated[str | None, typer.Option(
        envvar="PROMO_API_KEY", show_default=False,
        help="Admin API key (default: the local admin key of `promo up`).")] = None,
    tls: Annotated[bool, typer.Option(envvar="PROMO_TLS",
                                      help="Use TLS with the system's CAs.")] = False,
    ca_file: Annotated[Path | None, typer.Option(
        envvar="PROMO_CA_FILE", exists=True, dir_okay=False,
        help="PEM CA bundle (implies TLS).")] = None,
    listen_host: Annotated[str, typer.Option(
        help="Where the demo's webhook listener listens (the service's worker must reach it)."
    )] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(envvar="PROMO_TIMEOUT", min=0.1,
                                           help="Deadline of each call, in seconds.")] = 30.0,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON summary on stdout at the end (the stories go to stderr)."
    )] = False,
) -> None:
    """Play the seeds' stories against a running service (default: the local `promo up`)."""
    from cli import demo as demo_module
    from cli.client import local_admin_key
    raise typer.Exit(demo_module.main(
        address, api_key or local_admin_key(), as_json=as_json, listen_host=listen_host,
        tls=tls, ca_file=ca_file.read_bytes() if ca_file else None, timeout=timeout))


def _add_client_commands() -> None:
    """The operator commands that call a running service over gRPC (cli/commands/)."""
    from cli.commands import (
        bonuses,
        campaigns,
        codes,
        customers,
        formulas,
        jobs,
        listeners,
        products,
        promotions,
        reward_types,
    )
    app.add_typer(reward_types.app, name="reward-types")
    app.add_typer(promotions.app, name="promotions")
    app.add_typer(codes.app, name="codes")
    app.add_typer(campaigns.app, name="campaigns")
    app.add_typer(listeners.app, name="listeners")
    app.add_typer(formulas.app, name="formulas")
    app.add_typer(customers.app, name="customers")
    app.add_typer(bonuses.app, name="bonuses")
    app.add_typer(products.app, name="products")
    app.add_typer(jobs.app, name="jobs")


def _add_database_commands() -> None:
    """Command groups that talk to the database directly, like `migrate`."""
    from cli.commands import secrets as secrets_commands
    app.add_typer(secrets_commands.app, name="secrets")


_add_client_commands()
_add_database_commands()


def main() -> None:
    app(prog_name="promo")


if __name__ == "__main__":
    sys.exit(main())
