"""server/page_bytes.fit_page: a List page ends before the item that would pass the byte budget,
always holds one item, and says that more follow when it was cut."""

from __future__ import annotations

from promo.v1 import customers_pb2 as pb
from server.page_bytes import PAGE_BYTES, fit_page


def customer(i: int, size: int) -> pb.Customer:
    return pb.Customer(customer_id=f"c{i:03d}",
                       properties={"p": pb.PropertyValue(string_value="v" * size)})


def test_a_small_page_is_sent_whole_and_keeps_its_more_flag() -> None:
    rows = list(range(5))
    for more in (False, True):
        page, messages, still_more = fit_page(rows, more, lambda i: customer(i, 10))
        assert list(page) == rows and len(messages) == 5 and still_more is more


def test_a_page_is_cut_before_the_item_that_passes_the_budget() -> None:
    one = customer(0, 1_000).ByteSize() + 6
    page, messages, more = fit_page(list(range(10)), False, lambda i: customer(i, 1_000),
                                    budget=3 * one)
    assert list(page) == [0, 1, 2] and [m.customer_id for m in messages] == [
        "c000", "c001", "c002"]
    assert more is True  # the rest follows on the next page
    page, _, more = fit_page(list(range(3)), False, lambda i: customer(i, 1_000), budget=3 * one)
    assert list(page) == [0, 1, 2] and more is False  # exactly at the budget: not cut


def test_one_item_is_always_sent_however_large() -> None:
    page, messages, more = fit_page([0, 1], False, lambda i: customer(i, 5_000), budget=100)
    assert list(page) == [0] and len(messages) == 1 and more is True


def test_the_default_budget_keeps_a_page_under_a_default_clients_4_mib() -> None:
    rows = list(range(60))
    page, messages, more = fit_page(rows, False, lambda i: customer(i, 100_000))
    response = pb.ListCustomersResponse(customers=messages, next_page_token="x" * 200)
    assert response.ByteSize() <= PAGE_BYTES + 1_000 < 4 * 1024 * 1024
    assert 0 < len(page) < 60 and more is True
