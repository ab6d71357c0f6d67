"""server.errors' safety nets: the path of a NUL character in a request (so a database
refusal becomes INVALID_ARGUMENT naming the field) and statuses cut to a size every client
accepts (a 10,000-character id echoed in a message used to exceed gRPC's 16 KiB trailers)."""

from __future__ import annotations

import grpc
import pytest
from asyncpg.exceptions import CharacterNotInRepertoireError, UntranslatableCharacterError
from google.rpc import error_details_pb2, status_pb2

from promo.v1 import customers_pb2 as cpb
from promo.v1 import listeners_pb2 as lpb
from server.errors import (
    MAX_MESSAGE_COST,
    MAX_METADATA_VALUE_COST,
    nul_field,
    stored_text_error,
    to_status,
)


def test_the_path_of_a_nul_character_in_nested_repeated_and_map_fields() -> None:
    assert nul_field(lpb.RegisterListenerRequest(
        request_id="r", listener=lpb.Listener(url="https://x/\x00"))) == "listener.url"
    assert nul_field(cpb.UpsertCustomersRequest(request_id="r", customers=[
        cpb.Customer(customer_id="a"), cpb.Customer(customer_id="b\x00")])) == (
        "customers[1].customer_id")
    assert nul_field(cpb.UpsertCustomersRequest(request_id="r", customers=[cpb.Customer(
        customer_id="a", properties={"tier": cpb.PropertyValue(string_value="x\x00")})])) == (
        "customers[0].properties['tier'].string_value")
    assert nul_field(cpb.UpsertCustomersRequest(request_id="r", customers=[cpb.Customer(
        customer_id="a", properties={"t\x00": cpb.PropertyValue(bool_value=True)})])) == (
        "customers[0].properties['t\\x00']")
    assert nul_field(cpb.UpsertCustomersRequest(request_id="r")) is None


def test_a_database_refusal_of_nul_is_the_callers_invalid_argument() -> None:
    refused = CharacterNotInRepertoireError("invalid byte sequence for encoding \"UTF8\": 0x00")
    error = stored_text_error(refused, lpb.GetListenerRequest())
    assert error is None  # no NUL in the request: not the caller's, stays INTERNAL
    error = stored_text_error(refused, cpb.GetCustomerRequest(customer_id="a\x00"))
    assert error is not None
    assert (error.reason, error.metadata, error.message) == (
        "INVALID_TEXT", {"field": "customer_id"},
        "customer_id must not contain the NUL character (U+0000): it cannot be stored")
    assert stored_text_error(ValueError("x"), cpb.GetCustomerRequest(customer_id="\x00")) is None


def test_a_jsonb_refusal_of_nul_is_the_callers_invalid_argument_too() -> None:
    """Properties and stored formulas are jsonb, which refuses NUL with another error."""
    refused = UntranslatableCharacterError("\\u0000 cannot be converted to text.")
    error = stored_text_error(refused, cpb.GetCustomerRequest(customer_id="a\x00"))
    assert error is not None and error.metadata == {"field": "customer_id"}


def _grpc_message_length(text: str) -> int:
    """grpc-message's length: printable ASCII as is, every other byte as %XX."""
    return sum(1 if 0x20 <= b <= 0x7E else 3 for b in text.encode())


@pytest.mark.parametrize("char", ["a", "é", "€", "\U0001F600", "\n"])
def test_statuses_are_cut_to_a_size_every_client_accepts(char: str) -> None:
    """Cut by encoded size, not characters: 2,000 emoji were 24 KB of grpc-message and the
    client dropped the call as RESOURCE_EXHAUSTED (its hard limit is 16 KiB, and past 8 KiB it
    may refuse at random)."""
    long_id = char * 10_000
    status = to_status(grpc.StatusCode.NOT_FOUND, f"no promotion {long_id!r}", "NOT_FOUND",
                       {"promotion_code": long_id, "other": long_id})
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    proto = status_pb2.Status.FromString(details)
    assert proto.message.endswith("... (shortened)") and proto.message == status.details
    assert MAX_MESSAGE_COST - 15 <= _grpc_message_length(proto.message) <= MAX_MESSAGE_COST
    info = error_details_pb2.ErrorInfo()
    proto.details[0].Unpack(info)
    for value in info.metadata.values():
        assert value.endswith("... (shortened)")
        assert _grpc_message_length(value) <= MAX_METADATA_VALUE_COST
    # Both copies together (details base64-encoded on the wire) stay under 8 KiB.
    assert _grpc_message_length(status.details) + len(details) * 4 / 3 < 8_000
    short = to_status(grpc.StatusCode.NOT_FOUND, "no promotion 'X'", "NOT_FOUND", {"c": "X"})
    assert short.details == "no promotion 'X'"


def test_ascii_messages_keep_their_2000_characters() -> None:
    status = to_status(grpc.StatusCode.INVALID_ARGUMENT, "x" * 2000, "R")
    assert status.details == "x" * 2000
    cut = to_status(grpc.StatusCode.INVALID_ARGUMENT, "x" * 2001, "R")
    assert len(cut.details) == 2000 and cut.details.endswith("... (shortened)")
