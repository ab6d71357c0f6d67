"""Builders for campaign tests."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from tests.conftest import Api


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def create_campaign(api: Api, campaign_id: str, execute_at: datetime, *,
                          customers: list[str], codes: list[str] | None = None,
                          conditional: bool = True) -> cpb.Campaign:
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    response = await stub.CreateCampaign(cpb.CreateCampaignRequest(
        request_id=f"create-{campaign_id}", customer_ids=customers, campaign=cpb.Campaign(
            campaign_id=campaign_id, name=f"Campaign {campaign_id}", execute_at=ts(execute_at),
            conditional_execution=conditional, promotion_codes=codes or ["VIP25"])),
        metadata=api.key())
    return response.campaign


async def set_statuses(api: Api, campaign_id: str, statuses: dict[str, bool],
                       request_id: str) -> cpb.UpdateCustomerPromotionStatusResponse:
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    return await stub.UpdateCustomerPromotionStatus(cpb.UpdateCustomerPromotionStatusRequest(
        campaign_id=campaign_id, request_id=request_id, statuses=[
            cpb.CustomerPromotionStatus(customer_id=c, approved=a) for c, a in statuses.items()]),
        metadata=api.key("listener"))


async def all_customers(api: Api, campaign_id: str,
                        page_size: int = 0) -> list[cpb.CampaignCustomer]:
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    customers: list[cpb.CampaignCustomer] = []
    token = ""
    while True:
        page = await stub.GetProcessedCampaignCustomers(cpb.GetProcessedCampaignCustomersRequest(
            campaign_id=campaign_id, page_size=page_size, page_token=token),
            metadata=api.key("listener"))
        customers += page.customers
        token = page.next_page_token
        if not token:
            return customers
