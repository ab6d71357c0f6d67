"""`promo listeners`: webhook and e-mail listeners and the delivery log (ListenerService)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    fail,
    pages,
    print_json,
    request_id,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import console, show_message, show_rows
from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc

app = typer.Typer(help="Listeners: register, list, the delivery log, redeliver.",
                  no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.ListenerServiceStub
EVENT = "EVENT_TYPE_"
STATUS = "DELIVERY_STATUS_"
EVENT_HELP = ("scheduled_campaign, campaign_executed, code_pool_threshold, code_pool_depleted, "
              "fallback_code_active, bonus_skipped, bonus_calculated, bonus_issued")


def _event(name: str) -> int:
    return enum_value(pb.EventType, EVENT, name, "--event-type")


@app.command()
def register(
    ctx: typer.Context,
    event_type: Annotated[str, typer.Option(help=EVENT_HELP)],
    url: Annotated[str | None, typer.Option(help="Webhook URL (https, or http locally).")]
        = None,
    email: Annotated[list[str] | None, typer.Option(
        "--email", help="An e-mail recipient instead of a URL (repeat for several).")] = None,
    description: Annotated[str, typer.Option()] = "",
    secret: Annotated[str, typer.Option(
        help="Signing secret (default: the server generates one and prints it once).")] = "",
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a webhook (--url) or e-mail (--email) listener for one event type."""
    if (url is None) == (not email):
        fail("give either --url (webhook) or --email (e-mail listener)")
    listener = pb.Listener(event_type=_event(event_type), description=description,  # type: ignore[arg-type]
                           secret=secret)
    if url is not None:
        listener.url = url
        listener.channel = pb.LISTENER_CHANNEL_WEBHOOK
    else:
        listener.email_recipients.extend(email or [])
        listener.channel = pb.LISTENER_CHANNEL_EMAIL
    response = call(ctx, STUB, "RegisterListener", pb.RegisterListenerRequest(
        request_id=request_id(request), listener=listener))
    if as_json:
        print_json(response)
        return
    show_message(response.listener, title=f"listener {response.listener.listener_id}")
    if response.generated_secret:
        console().print(f"signing secret (shown once): {response.generated_secret}")


@app.command()
def get(ctx: typer.Context, listener_id: int, as_json: JsonOpt = False) -> None:
    """Show one listener."""
    listener = call(ctx, STUB, "GetListener",
                    pb.GetListenerRequest(listener_id=listener_id)).listener
    if as_json:
        print_json(listener)
    else:
        show_message(listener, title=f"listener {listener.listener_id}")


@app.command("list")
def list_(
    ctx: typer.Context,
    event_type: Annotated[str | None, typer.Option(help=EVENT_HELP)] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List listeners."""
    request = pb.ListListenersRequest(page_size=page_size, page_token=page_token,
                                      event_type=_event(event_type) if event_type else 0)  # type: ignore[arg-type]
    items: list[pb.Listener] = []
    token = ""
    for page in pages(ctx, STUB, "ListListeners", request, follow=all_pages):
        items.extend(page.listeners)
        token = page.next_page_token
    if as_json:
        print_json({"listeners": [to_dict(x) for x in items], "next_page_token": token})
        return
    show_rows("Listeners", ["id", "event type", "channel", "target", "active", "description"],
              ([x.listener_id, enum_name(pb.EventType, EVENT, x.event_type).lower(),
                enum_name(pb.ListenerChannel, "LISTENER_CHANNEL_", x.channel).lower(),
                x.url or ", ".join(x.email_recipients), x.active, x.description]
               for x in items), token)


@app.command()
def deliveries(
    ctx: typer.Context,
    listener_id: Annotated[int, typer.Option("--listener", help="Only this listener.")] = 0,
    event_id: Annotated[str, typer.Option(help="Only this event.")] = "",
    status: Annotated[list[str] | None, typer.Option(
        "--status", help="pending, delivered, failed, dead or cancelled (repeatable).")] = None,
    event_type: Annotated[str | None, typer.Option(help=EVENT_HELP)] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The delivery log: each event sent to each listener, newest first."""
    request = pb.ListDeliveriesRequest(
        page_size=page_size, page_token=page_token, listener_id=listener_id, event_id=event_id,
        statuses=[enum_value(pb.DeliveryStatus, STATUS, s, "--status") for s in status or []],
        event_type=_event(event_type) if event_type else 0)  # type: ignore[arg-type]
    items: list[pb.Delivery] = []
    token = ""
    for page in pages(ctx, STUB, "ListDeliveries", request, follow=all_pages):
        items.extend(page.deliveries)
        token = page.next_page_token
    if as_json:
        print_json({"deliveries": [to_dict(d) for d in items], "next_page_token": token})
        return
    show_rows("Deliveries", ["id", "event", "type", "listener", "status", "attempts",
                             "last code", "last error"],
              ([d.delivery_id, d.event_id, enum_name(pb.EventType, EVENT, d.event_type).lower(),
                d.listener_id, enum_name(pb.DeliveryStatus, STATUS, d.status).lower(),
                d.attempt_count, d.last_status_code or "", d.last_error] for d in items), token)


@app.command()
def delivery(ctx: typer.Context, delivery_id: int, as_json: JsonOpt = False) -> None:
    """One delivery with every attempt and the event body."""
    response = call(ctx, STUB, "GetDelivery", pb.GetDeliveryRequest(delivery_id=delivery_id))
    if as_json:
        print_json(response)
        return
    show_message(response.delivery, title=f"delivery {delivery_id}")
    show_rows("Attempts", ["attempt", "started", "status code", "ms", "error"],
              ([a.attempt, a.start_time.ToJsonString(), a.status_code or "",
                round(a.latency_ms, 1), a.error] for a in response.attempts))
    console().print(response.event_body)


@app.command()
def redeliver(ctx: typer.Context, delivery_id: int, request: RequestIdOpt = None,
              as_json: JsonOpt = False) -> None:
    """Send a delivery again (a fresh retry budget)."""
    response = call(ctx, STUB, "RedeliverEvent", pb.RedeliverEventRequest(
        request_id=request_id(request), delivery_id=delivery_id))
    if as_json:
        print_json(response)
    else:
        show_message(response.delivery, title=f"delivery {delivery_id}")
