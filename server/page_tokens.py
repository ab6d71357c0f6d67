"""Page tokens scoped to the List RPC being served: core.pagination's, with the method name
(from the call context the interceptor sets) as the token's scope, so a token of
ListRewardTypes sent to ListCustomers is INVALID_PAGE_TOKEN rather than a listing that silently
starts after an unrelated key. The servicers call these instead of core.pagination's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core import pagination
from core.pagination import KeyKind, PageCursor
from server.logs import call_context


def _scope() -> str:
    context = call_context.get()
    return context.get("method", "") if context else ""


def encode_page_token(after: list[Any], filters: dict[str, Any]) -> str:
    return pagination.encode_page_token(after, filters, scope=_scope())


def decode_page_token(token: str, filters: dict[str, Any], *,
                      key: Sequence[KeyKind]) -> PageCursor | None:
    return pagination.decode_page_token(token, filters, key=key, scope=_scope())
