"""`promo customers`: upsert customers, record events from a CSV or JSON file, look them up
(CustomerService)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from cli.client import (
    batch_failure,
    call,
    connection_callback,
    derived_request_id,
    fail,
    load_json_file,
    pages,
    parse_message,
    parse_pairs,
    print_json,
    read_csv,
    request_id,
    send,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import console, show_message, show_rows
from promo.v1 import customers_pb2 as pb
from promo.v1 import customers_pb2_grpc as pb_grpc

app = typer.Typer(help="Customers and their events.", no_args_is_help=True,
                  callback=connection_callback)
STUB = pb_grpc.CustomerServiceStub
BATCH = 10_000  # the server's limit per call (core/customers.py MAX_BATCH)
EVENT_COLUMNS = ("external_id", "customer_id", "kind", "amount", "currency", "occurred_at")


def _customer_properties(strings: list[str] | None, decimals: list[str] | None,
                         flags: list[str] | None) -> dict[str, pb.PropertyValue]:
    props: dict[str, pb.PropertyValue] = {}
    for key, value in parse_pairs(strings, "--property").items():
        props[key] = pb.PropertyValue(string_value=value)
    for key, value in parse_pairs(decimals, "--decimal").items():
        props[key] = pb.PropertyValue(decimal_value=value)
    for key, value in parse_pairs(flags, "--bool").items():
        if value.lower() not in ("true", "false"):
            fail(f"--bool {key}: give true or false, got {value!r}")
        props[key] = pb.PropertyValue(bool_value=value.lower() == "true")
    return props


@app.command()
def upsert(
    ctx: typer.Context,
    customer_id: Annotated[str | None, typer.Argument(help="One customer's id.")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="A JSON list of customers (proto JSON) instead of one from flags.")] = None,
    time_zone: Annotated[str, typer.Option()] = "",
    currency: Annotated[str, typer.Option()] = "",
    prop: Annotated[list[str] | None, typer.Option("--property",
                                                   help="String KEY=VALUE.")] = None,
    decimal: Annotated[list[str] | None, typer.Option("--decimal",
                                                      help="Decimal KEY=VALUE.")] = None,
    flag: Annotated[list[str] | None, typer.Option("--bool", help="KEY=true|false.")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or update customers: one from flags, or many from a JSON file."""
    if (customer_id is None) == (file is None):
        fail("give a CUSTOMER_ID with flags, or --file")
    if file is not None:
        data = load_json_file(file)
        if not isinstance(data, list):
            fail(f"{file}: expected a JSON list of customers")
        customers = [parse_message(item, pb.Customer(), f"{file} item {i + 1}")
                     for i, item in enumerate(data)]
    else:
        customers = [pb.Customer(customer_id=customer_id or "", time_zone=time_zone,
                                 currency=currency,
                                 properties=_customer_properties(prop, decimal, flag))]
    response = call(ctx, STUB, "UpsertCustomers", pb.UpsertCustomersRequest(
        request_id=request_id(request), customers=customers))
    if as_json:
        print_json(response)
    else:
        console().print(f"created {response.created_count}, updated {response.updated_count}")


@app.command()
def get(ctx: typer.Context, customer_id: str, as_json: JsonOpt = False) -> None:
    """Show one customer."""
    customer = call(ctx, STUB, "GetCustomer",
                    pb.GetCustomerRequest(customer_id=customer_id)).customer
    if as_json:
        print_json(customer)
    else:
        show_message(customer, title=f"customer {customer.customer_id}")


@app.command("list")
def list_(ctx: typer.Context, page_size: PageSizeOpt = 50, page_token: PageTokenOpt = "",
          all_pages: AllOpt = False, as_json: JsonOpt = False) -> None:
    """List customers by id."""
    request = pb.ListCustomersRequest(page_size=page_size, page_token=page_token)
    items: list[pb.Customer] = []
    token = ""
    for page in pages(ctx, STUB, "ListCustomers", request, follow=all_pages):
        items.extend(page.customers)
        token = page.next_page_token
    if as_json:
        print_json({"customers": [to_dict(c) for c in items], "next_page_token": token})
        return
    show_rows("Customers", ["id", "time zone", "currency", "properties"],
              ([c.customer_id, c.time_zone, c.currency,
                {k: v for k, v in to_dict(c).get("properties", {}).items()}] for c in items),
              token)


def _read_events(path: Path) -> list[dict[str, Any]]:
    """Events as proto-JSON dicts: a JSON list, or CSV with a header row (columns other than
    the event's fields become attributes)."""
    if path.suffix.lower() == ".json":
        data = load_json_file(path)
        if not isinstance(data, list):
            fail(f"{path}: expected a JSON list of events")
        return data
    rows = read_csv(path, csv.DictReader)
    events = []
    for row in rows:
        event: dict[str, Any] = {k: v for k, v in row.items() if k in EVENT_COLUMNS and v}
        attributes = {k: v for k, v in row.items() if k and k not in EVENT_COLUMNS and v}
        if attributes:
            event["attributes"] = attributes
        events.append(event)
    return events


@app.command("record-events")
def record_events(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False,
        help="CSV (header: external_id,customer_id,kind,amount,currency,occurred_at, other "
             "columns are attributes) or a .json list of events.")],
    create_missing: Annotated[bool, typer.Option(
        "--create-missing", help="Create customers the server does not know.")] = False,
    request: Annotated[str | None, typer.Option(
        "--request-id", help="Idempotency key (default: derived from the file's content and "
                             "--create-missing, so sending the same file again changes "
                             "nothing).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Record events in batches of 10,000 (duplicates by external_id are counted, not added).

    When a batch is refused, the error names the file's positions (events[10000] is the
    10,001st event) and how many events earlier batches recorded; running the same command
    again continues (recorded events count as duplicates)."""
    raw = _read_events(file)
    if not raw:
        fail(f"{file} has no events")
    events = [parse_message(item, pb.Event(), f"{file} event {i + 1}")
              for i, item in enumerate(raw)]
    base = request or derived_request_id("events", file.read_bytes(),
                                         create_missing=create_missing)
    totals = {"inserted_count": 0, "duplicate_count": 0, "created_customer_count": 0}
    for number, start in enumerate(range(0, len(events), BATCH)):
        try:
            response = send(ctx, STUB, "RecordEvents", pb.RecordEventsRequest(
                request_id=f"{base}-{number}", events=events[start:start + BATCH],
                create_missing_customers=create_missing))
        except grpc.RpcError as exc:
            fail(batch_failure(
                exc, field="events", names=[f"events[{start + i}]" for i in range(BATCH)],
                written=None if number == 0 else (
                    f"events[0] to events[{start - 1}] went in {number} earlier call(s) and "
                    f"were recorded ({totals['inserted_count']:,} new, "
                    f"{totals['duplicate_count']:,} duplicates), events from events[{start}] on "
                    "were not; run the same command again to continue (recorded events count "
                    "as duplicates)")))
        totals["inserted_count"] += response.inserted_count
        totals["duplicate_count"] += response.duplicate_count
        totals["created_customer_count"] += response.created_customer_count
    if as_json:
        typer.echo(json.dumps(totals, indent=2))
    else:
        console().print(f"inserted {totals['inserted_count']}, duplicates "
                        f"{totals['duplicate_count']}, customers created "
                        f"{totals['created_customer_count']}")


@app.command()
def events(
    ctx: typer.Context,
    customer_id: str,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="Only this kind.")] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A customer's events."""
    request = pb.ListCustomerEventsRequest(customer_id=customer_id, kinds=kind or [],
                                           page_size=page_size, page_token=page_token)
    items: list[pb.Event] = []
    token = ""
    for page in pages(ctx, STUB, "ListCustomerEvents", request, follow=all_pages):
        items.extend(page.events)
        token = page.next_page_token
    if as_json:
        print_json({"events": [to_dict(e) for e in items], "next_page_token": token})
        return
    show_rows("Events", ["external id", "kind", "amount", "currency", "occurred at"],
              ([e.external_id, e.kind, e.amount, e.currency, e.occurred_at.ToJsonString()]
               for e in items), token)
