"""Small wire-format helpers shared by the servicers (timestamps, decimals, enums)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from storage.idempotency import fingerprint


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def request_fingerprint(request: Message) -> bytes:
    """Hash of the request without its request_id: what must match on a retry."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")  # type: ignore[arg-type]
    return fingerprint(copy.SerializeToString(deterministic=True))
