"""The operator CLI's connection to a running service: channel, API key, and clean errors.

Every command of the client sub-apps calls through :func:`call`, which sends the API key as
``x-api-key`` metadata and turns a failed call into one line on stderr (status code, the
server's message, and the ``google.rpc.ErrorInfo`` reason from ``grpc-status-details-bin``)
with exit code 1, so scripts and people see what the server said and never a traceback.

Where the connection comes from (flags of each sub-app, else the environment):
``--address`` / ``PROMO_ADDRESS`` (default ``127.0.0.1:50051``, what ``promo up`` listens on),
``--api-key`` / ``PROMO_API_KEY`` (else the local admin key ``promo up`` wrote into
``$PROMO_DATA_DIR/admin-api-key``), ``--ca-file`` / ``PROMO_CA_FILE`` or ``--tls`` for TLS, and
``--cert-file``/``--key-file`` for mutual TLS.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO, TypeVar

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from config.settings import load_settings

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADMIN_KEY_FILE = "admin-api-key"  # the file `promo up` writes (cli/main.py)
STATUS_DETAILS_KEY = "grpc-status-details-bin"

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

M = TypeVar("M", bound=Message)
R = TypeVar("R")


@dataclass
class Connection:
    """How to reach the service; the channel is opened on first use."""

    address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    ca_file: Path | None = None
    tls: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = 30.0
    _channel: grpc.Channel | None = field(default=None, repr=False)

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            if self.tls or self.ca_file or self.cert_file:
                root = self.ca_file.read_bytes() if self.ca_file else None
                chain = self.cert_file.read_bytes() if self.cert_file else None
                key = self.key_file.read_bytes() if self.key_file else None
                credentials = grpc.ssl_channel_credentials(root_certificates=root,
                                                           private_key=key,
                                                           certificate_chain=chain)
                self._channel = grpc.secure_channel(self.address, credentials)
            else:
                self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _data_dir() -> Path:
    """The data folder as `promo up` resolves it (PROMO_DATA_DIR, or data_dir in
    PROMO_CONFIG_FILE); settings that do not load (a client machine need not have the
    server's) fall back to the variable alone."""
    try:
        return load_settings().data_dir
    except Exception:
        return Path(os.environ.get("PROMO_DATA_DIR") or ".promo-data")


def local_admin_key() -> str | None:
    """The admin key `promo up` created in the data folder, when this machine has one."""
    path = _data_dir() / ADMIN_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def connection_callback(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(envvar="PROMO_ADDRESS",
                                         help="host:port of the gRPC server.")] = DEFAULT_ADDRESS,
    api_key: Annotated[str | None, typer.Option(
        envvar="PROMO_API_KEY", show_default=False,
        help="API key (default: the local admin key of `promo up`, if any).")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        envvar="PROMO_CA_FILE", exists=True, dir_okay=False,
        help="PEM CA bundle to verify the server with (implies TLS).")] = None,
    tls: Annotated[bool, typer.Option(
        envvar="PROMO_TLS", help="Use TLS with the system's trusted CAs.")] = False,
    cert_file: Annotated[Path | None, typer.Option(
        envvar="PROMO_CLIENT_CERT_FILE", exists=True, dir_okay=False,
        help="PEM client certificate chain, for mutual TLS.")] = None,
    key_file: Annotated[Path | None, typer.Option(
        envvar="PROMO_CLIENT_KEY_FILE", exists=True, dir_okay=False,
        help="PEM private key of the client certificate.")] = None,
    timeout: Annotated[float, typer.Option(
        envvar="PROMO_TIMEOUT", min=0.1, help="Deadline of each call, in seconds.")] = 30.0,
) -> None:
    """Connection options, shared by every client command group."""
    if (cert_file is None) != (key_file is None):
        fail("give both --cert-file and --key-file, or neither")
    conn = Connection(address=address, api_key=api_key or local_admin_key(), ca_file=ca_file,
                      tls=tls, cert_file=cert_file, key_file=key_file, timeout=timeout)
    ctx.obj = conn
    ctx.call_on_close(conn.close)


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def describe_error(exc: grpc.RpcError) -> str:
    """``CODE: message (REASON)``, from the call's status and its google.rpc ErrorInfo."""
    code = exc.code() if hasattr(exc, "code") else None
    message = exc.details() if hasattr(exc, "details") else str(exc)
    reason = None
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed detail must not hide the status itself
            break
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    text = " ".join(str(message or "").split())  # one line, whatever the server sent
    return f"{name}: {text}" + (f" ({reason})" if reason else "")


def send(ctx: typer.Context, stub_class: Callable[[grpc.Channel], Any], method: str,
         request: Message) -> Any:
    """Call ``stub_class(channel).method(request)``; a failure raises the ``grpc.RpcError``
    (for a caller that must say more than the server could, see :func:`batch_failure`)."""
    conn = ctx.find_object(Connection)
    if conn is None:  # a command invoked without its group's callback (not via the CLI)
        conn = Connection(api_key=local_admin_key())
    stub = stub_class(conn.channel())
    return getattr(stub, method)(request, metadata=conn.metadata(), timeout=conn.timeout)


def call(ctx: typer.Context, stub_class: Callable[[grpc.Channel], Any], method: str,
         request: Message) -> Any:
    """Call ``stub_class(channel).method(request)``; a failure exits 1 with one clean line."""
    try:
        return send(ctx, stub_class, method, request)
    except grpc.RpcError as exc:
        fail(describe_error(exc))


def batch_failure(exc: grpc.RpcError, *, field: str, names: Sequence[str],
                  written: str | None) -> str:
    """The line for a failed call of an upload sent in several calls.

    The server numbers items within the call (``events[3]``) and says "nothing was written",
    true of that call only. ``names[i]`` is how the operator finds the call's item ``i`` in
    the file (``events[10003]``, a file line); ``written`` (None for the first call) says what
    earlier calls wrote and replaces the server's claim."""

    def rename(match: re.Match[str]) -> str:
        index = int(match[1])
        return names[index] if index < len(names) else match[0]

    text = re.sub(rf"\b{re.escape(field)}\[(\d+)\]", rename, describe_error(exc))
    if written is None:
        return text
    return text.replace(", nothing was written:", ":") + f"; {written}"


def pages(ctx: typer.Context, stub_class: Callable[[grpc.Channel], Any], method: str,
          request: Message, *, follow: bool) -> Iterator[Any]:
    """The response of each page of a List call: one page, or every page when ``follow``."""
    while True:
        response = call(ctx, stub_class, method, request)
        yield response
        token = response.next_page_token
        if not follow or not token:
            return
        request.page_token = token  # type: ignore[attr-defined]


def request_id(given: str | None) -> str:
    """The request id of a mutating call: the operator's (to retry safely), else a fresh one."""
    return given or f"cli-{uuid.uuid4().hex}"


def derived_request_id(prefix: str, content: bytes, **options: object) -> str:
    """The request id of an upload from a file: a digest of the file's bytes and of every
    option that changes the requests (the promotion, a default, a flag). The same command on
    the same file is the same request (a re-run after a failure continues where it stopped);
    another promotion or option is another request, not REQUEST_ID_REUSED."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(b"\0")
    digest.update(content)
    return f"{prefix}-{digest.hexdigest()[:32]}"


def int32(value: int, option: str) -> int:
    """``value`` for an int32 field of a request, or exit 1 naming ``option`` (protobuf would
    raise ValueError while the message is built)."""
    if not INT32_MIN <= value <= INT32_MAX:
        fail(f"{option}: {value} is out of range (at most {INT32_MAX})")
    return value


def read_csv(path: Path, read: Callable[[TextIO], Iterable[R]]) -> list[R]:
    """Every row of a CSV file, read by ``read`` (``csv.reader`` or ``csv.DictReader``); exit 1
    when it cannot be read. utf-8-sig: spreadsheets save "CSV UTF-8" with a byte order mark,
    which would otherwise become part of the first header or value."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return list(read(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(value: Message | dict[str, Any] | list[Any]) -> None:
    data = to_dict(value) if isinstance(value, Message) else value
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` options into a dict (exit 1 with the option's name when malformed)."""
    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def enum_value(enum: Any, prefix: str, name: str, option: str) -> int:
    """A proto enum value from its short name (``daily`` -> ``CAP_PERIOD_DAILY``)."""
    full = name.upper() if name.upper().startswith(prefix) else f"{prefix}{name.upper()}"
    try:
        return int(enum.Value(full))
    except ValueError:
        choices = ", ".join(v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values
                            if not v.name.endswith("_UNSPECIFIED"))
        fail(f"{option}: {name!r} is not one of {choices}")


def enum_name(enum: Any, prefix: str, value: int) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def load_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is not JSON
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {exc}")
    except RecursionError:
        fail(f"cannot read {path}: the JSON is nested too deeply")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (a byte order mark is dropped), or exit 1 with one line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        fail(f"cannot read {path}: not UTF-8 text (byte {exc.start + 1})")
    except OSError as exc:
        fail(f"cannot read {path}: {exc}")


def parse_message(data: Any, message: M, what: str) -> M:
    """``data`` (proto JSON, snake_case or camelCase names) into ``message``; one line naming
    ``what`` when it does not fit (protobuf's own message spans lines)."""
    if not isinstance(data, dict):
        fail(f"{what}: expected a JSON object, got {type(data).__name__}")
    try:
        return json_format.ParseDict(data, message)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        fail(f"{what}: {' '.join(str(exc).split())}")
