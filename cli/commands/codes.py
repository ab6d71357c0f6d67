"""`promo codes`: upload personalized promo codes (with a progress bar) and see a pool's
inventory. (CodePoolService.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cli.client import (
    Connection,
    call,
    connection_callback,
    derived_request_id,
    describe_error,
    fail,
    local_admin_key,
    print_json,
)
from cli.options import JsonOpt, RequestIdOpt
from cli.output import console, show_message
from promo.v1 import codes_pb2 as pb
from promo.v1 import codes_pb2_grpc as pb_grpc

app = typer.Typer(help="Personalized promo codes: upload a pool, see its inventory.",
                  no_args_is_help=True, callback=connection_callback)
MAX_FILE_BYTES = 10 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024


def _chunks(code: str, rid: str, data: bytes, progress: Progress | None
            ) -> Iterator[pb.UploadCodesRequest]:
    task = progress.add_task("upload", total=len(data)) if progress else None
    for offset in range(0, max(len(data), 1), CHUNK_BYTES):
        piece = data[offset:offset + CHUNK_BYTES]
        if offset == 0:
            yield pb.UploadCodesRequest(promotion_code=code, request_id=rid, data=piece)
        else:
            yield pb.UploadCodesRequest(data=piece)
        if progress is not None and task is not None:
            progress.update(task, advance=len(piece))


@app.command()
def upload(ctx: typer.Context, promotion_code: str,
           file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                                help="CSV: one code per line, no header.")],
           request: RequestIdOpt = None, json_out: JsonOpt = False) -> None:
    """Stream a CSV of codes into a PERSONALIZED promotion's pool (all or nothing)."""
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        fail(f"{file} is {size:,} bytes; a code file is at most {MAX_FILE_BYTES:,} bytes "
             "(10 MB): split it into several uploads")
    data = file.read_bytes()
    # The same file for the same promotion is the same request (README: uploads from a file
    # derive their id): running the command again after a lost answer changes nothing.
    rid = request or derived_request_id("codes", data, promotion=promotion_code)
    conn = ctx.find_object(Connection) or Connection(api_key=local_admin_key())
    stub = pb_grpc.CodePoolServiceStub(conn.channel())
    err = Console(stderr=True)
    progress = None if json_out or not err.is_terminal else Progress(  # bar on a terminal only
        TextColumn(f"[bold]{promotion_code}[/bold]"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), console=err, transient=True)
    try:
        if progress is None:
            response = stub.UploadCodes(_chunks(promotion_code, rid, data, None),
                                        metadata=conn.metadata(), timeout=conn.timeout)
        else:
            with progress:
                response = stub.UploadCodes(_chunks(promotion_code, rid, data, progress),
                                            metadata=conn.metadata(), timeout=conn.timeout)
    except grpc.RpcError as exc:
        fail(describe_error(exc))
    if json_out:
        print_json(response)
        return
    inventory = response.inventory
    console().print(f"uploaded {response.codes_added:,} codes to {promotion_code} (upload "
                    f"{response.upload_id}): {inventory.available:,} available, "
                    f"{inventory.used:,}/{inventory.total:,} used")


@app.command()
def inventory(ctx: typer.Context, promotion_code: str, json_out: JsonOpt = False) -> None:
    """A PERSONALIZED promotion's pool: total, used, available, fallback grants, uploads."""
    response = call(ctx, pb_grpc.CodePoolServiceStub, "GetCodeInventory",
                    pb.GetCodeInventoryRequest(promotion_code=promotion_code))
    if json_out:
        print_json(response)
        return
    show_message(response, title=f"{promotion_code} code pool")
