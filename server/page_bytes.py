"""List pages that a default gRPC client can read: items up to PAGE_BYTES per answer.

Why this exists: ``page_size`` counts items, but gRPC clients refuse answers over 4 MiB unless
configured otherwise, and items can be large within their documented limits (a customer with
100 properties of 1,000 characters is 100 KB; a clearance page of 10,000 customers of a
20-promotion campaign repeats 20 codes on each). A page that passes the client's limit cannot be
read at all, not even by asking for a smaller one first (the client does not know). So a page
also ends before the item that would take it past PAGE_BYTES, and its ``next_page_token``
continues from the last item sent: callers already page until the token is empty, and a page
with fewer items than ``page_size`` is allowed by the contract (AIP-158). One item is always
sent, however large, so a listing never stalls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

PAGE_BYTES = 3 * 1024 * 1024  # under gRPC's default 4 MiB, with room for the envelope

_Row = TypeVar("_Row")
_Pb = TypeVar("_Pb", bound=Message)

# A repeated message field's tag and length prefix: at most 1 + 5 bytes per item.
_PER_ITEM = 6


def fit_page(page: Sequence[_Row], more: bool, to_pb: Callable[[_Row], _Pb], *,
             budget: int = PAGE_BYTES) -> tuple[Sequence[_Row], list[_Pb], bool]:
    """The rows to send, their messages and whether more follow: ``page`` cut before the row
    that would take the answer past ``budget`` bytes (then more follow), at least one row."""
    messages: list[_Pb] = []
    total = 0
    for row in page:
        message = to_pb(row)
        size = message.ByteSize() + _PER_ITEM
        if messages and total + size > budget:
            return page[:len(messages)], messages, True
        total += size
        messages.append(message)
    return page, messages, more
