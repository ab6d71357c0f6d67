"""`promo campaigns`: scheduled campaigns and their clearance state (CampaignService,
ClearanceService)."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    pages,
    print_json,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt
from cli.output import console, show_message, show_rows
from promo.v1 import campaigns_pb2 as pb
from promo.v1 import campaigns_pb2_grpc as pb_grpc

app = typer.Typer(help="Campaigns: list, show, clearance state, reconciliation.",
                  no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.CampaignServiceStub
CLEARANCE_STUB = pb_grpc.ClearanceServiceStub
STATUS = "CAMPAIGN_STATUS_"


def _time(value: Timestamp, present: bool) -> str:
    return value.ToJsonString() if present else ""


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[list[str] | None, typer.Option(
        "--status", help="scheduled, awaiting_clearance, executed or cancelled (repeatable).")]
        = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List campaigns with their status and approval counts."""
    request = pb.ListCampaignsRequest(
        page_size=page_size, page_token=page_token,
        statuses=[enum_value(pb.CampaignStatus, STATUS, s, "--status") for s in status or []])
    items: list[pb.Campaign] = []
    token = ""
    for page in pages(ctx, STUB, "ListCampaigns", request, follow=all_pages):
        items.extend(page.campaigns)
        token = page.next_page_token
    if as_json:
        print_json({"campaigns": [to_dict(c) for c in items], "next_page_token": token})
        return
    show_rows("Campaigns", ["id", "name", "status", "execute at", "conditional", "promotions",
                            "targets", "approved", "rejected"],
              ([c.campaign_id, c.name, enum_name(pb.CampaignStatus, STATUS, c.status).lower(),
                _time(c.execute_at, c.HasField("execute_at")), c.conditional_execution,
                ", ".join(c.promotion_codes), c.target_count, c.approved_count,
                c.rejected_count] for c in items), token)


@app.command()
def get(ctx: typer.Context, campaign_id: str, as_json: JsonOpt = False) -> None:
    """Show one campaign."""
    campaign = call(ctx, STUB, "GetCampaign",
                    pb.GetCampaignRequest(campaign_id=campaign_id)).campaign
    if as_json:
        print_json(campaign)
    else:
        show_message(campaign, title=f"campaign {campaign.campaign_id}")


@app.command()
def clearance(
    ctx: typer.Context,
    campaign_id: str,
    show_customers: Annotated[bool, typer.Option(
        "--customers", help="Also list every target and its answer.")] = False,
    page_size: Annotated[int, typer.Option(min=1, max=1000,
                                           help="Targets fetched per call.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """The clearance state: the deadline, and how many targets are approved, rejected or
    still pending (reads every page of the target group)."""
    campaign = call(ctx, STUB, "GetCampaign",
                    pb.GetCampaignRequest(campaign_id=campaign_id)).campaign
    request = pb.GetProcessedCampaignCustomersRequest(campaign_id=campaign_id,
                                                      page_size=page_size)
    customers: list[pb.CampaignCustomer] = []
    tally = {"approved": 0, "rejected": 0, "pending": 0}
    required_by = ""
    for page in pages(ctx, CLEARANCE_STUB, "GetProcessedCampaignCustomers", request,
                      follow=True):
        required_by = _time(page.clearance_required_by, page.HasField("clearance_required_by"))
        for customer in page.customers:
            tally[_answer(customer)] += 1
        if show_customers:
            customers.extend(page.customers)
    status = enum_name(pb.CampaignStatus, STATUS, campaign.status).lower()
    if as_json:
        data: dict[str, object] = {
            "campaign_id": campaign.campaign_id, "status": pb.CampaignStatus.Name(campaign.status),
            "conditional_execution": campaign.conditional_execution,
            "clearance_required_by": required_by, "target_count": sum(tally.values()), **tally}
        if show_customers:
            data["customers"] = [to_dict(c) for c in customers]
        print_json(data)
        return
    out = console()
    out.print(f"campaign {campaign.campaign_id} ({status}), clearance required by "
              f"{required_by or '-'}")
    out.print(f"{sum(tally.values())} targets: approved {tally['approved']}, rejected "
              f"{tally['rejected']}, pending {tally['pending']}")
    if show_customers:
        show_rows("Customers", ["customer", "promotions", "answer"],
                  ([c.customer_id, ", ".join(c.promotion_codes), _answer(c)]
                   for c in customers))


def _answer(customer: pb.CampaignCustomer) -> str:
    if not customer.HasField("approved"):
        return "pending"
    return "approved" if customer.approved else "rejected"


@app.command()
def reconciliation(ctx: typer.Context, campaign_id: str, as_json: JsonOpt = False) -> None:
    """Approved, granted and revoked per promotion of an executed campaign, and the value of the
    live grants per reward type."""
    response = call(ctx, STUB, "GetCampaignReconciliation",
                    pb.GetCampaignReconciliationRequest(campaign_id=campaign_id))
    if as_json:
        print_json(response)
        return
    show_rows(f"Reconciliation of {campaign_id}",
              ["promotion", "approved", "granted", "revoked", "live amounts"],
              ([p.promotion_code, p.approved, p.granted, p.revoked, _amounts(p)]
               for p in response.promotions))


def _amounts(row: pb.CampaignPromotionReconciliation) -> str:
    """Per reward type ("cashback 15, free_spins 10"): amounts of different reward types are
    never added up."""
    return ", ".join(f"{a.reward_type} {a.amount}" for a in row.amounts) or "-"
