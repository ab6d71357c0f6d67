"""A call that names no resource (an empty id) is the caller's mistake: INVALID_ARGUMENT
MISSING_FIELD naming the field, the same for every service, not NOT_FOUND "no such ''" (no
resource can have an empty id). List filters are not covered: there an empty id means all."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import codes_pb2 as copb
from promo.v1 import codes_pb2_grpc as copb_grpc
from promo.v1 import products_pb2 as ppb
from promo.v1 import products_pb2_grpc as ppb_grpc
from promo.v1 import promotions_pb2 as prpb
from promo.v1 import promotions_pb2_grpc as prpb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from server.errors import error_info_of
from tests.conftest import Api

MASK = {"paths": ["display_name"]}
CALLS: list[tuple[Any, str, Message, str]] = [
    (bpb_grpc.BonusServiceStub, "GetBonusDefinition", bpb.GetBonusDefinitionRequest(),
     "definition_id"),
    (bpb_grpc.BonusServiceStub, "GetBonusResult", bpb.GetBonusResultRequest(), "bonus_id"),
    (bpb_grpc.BonusServiceStub, "GetBonusRule", bpb.GetBonusRuleRequest(), "rule_id"),
    (bpb_grpc.BonusServiceStub, "GetBonusSchedule", bpb.GetBonusScheduleRequest(),
     "schedule_id"),
    (cpb_grpc.CampaignServiceStub, "GetCampaign", cpb.GetCampaignRequest(), "campaign_id"),
    (cpb_grpc.CampaignServiceStub, "GetCampaignReconciliation",
     cpb.GetCampaignReconciliationRequest(), "campaign_id"),
    (cpb_grpc.ClearanceServiceStub, "ForecastCampaign", cpb.ForecastCampaignRequest(),
     "campaign_id"),
    (cpb_grpc.CampaignServiceStub, "CancelCampaign", cpb.CancelCampaignRequest(request_id="c"),
     "campaign_id"),
    (cpb_grpc.CampaignServiceStub, "AddCampaignTargets",
     cpb.AddCampaignTargetsRequest(request_id="t", customer_ids=["c1"]), "campaign_id"),
    (cpb_grpc.ClearanceServiceStub, "GetProcessedCampaignCustomers",
     cpb.GetProcessedCampaignCustomersRequest(), "campaign_id"),
    (cpb_grpc.ClearanceServiceStub, "UpdateCustomerPromotionStatus",
     cpb.UpdateCustomerPromotionStatusRequest(request_id="u", statuses=[
         cpb.CustomerPromotionStatus(customer_id="c1", approved=True)]), "campaign_id"),
    (copb_grpc.CodePoolServiceStub, "GetCodeInventory", copb.GetCodeInventoryRequest(),
     "promotion_code"),
    (ppb_grpc.ProductPromotionServiceStub, "GetPersonalizedPromotion",
     ppb.GetPersonalizedPromotionRequest(), "backend_id"),
    (ppb_grpc.ProductPromotionServiceStub, "DeletePersonalizedPromotion",
     ppb.DeletePersonalizedPromotionRequest(request_id="d"), "backend_id"),
    (ppb_grpc.ProductPromotionServiceStub, "UpdatePersonalizedPromotion",
     ppb.UpdatePersonalizedPromotionRequest(request_id="u", update_mask={"paths": ["name"]}),
     "personalized_promotion.backend_id"),
    (ppb_grpc.ProductPromotionServiceStub, "GetProductSetDiscount",
     ppb.GetProductSetDiscountRequest(), "discount_id"),
    (ppb_grpc.ProductPromotionServiceStub, "DeleteProductSetDiscount",
     ppb.DeleteProductSetDiscountRequest(request_id="d"), "discount_id"),
    (ppb_grpc.ProductPromotionServiceStub, "UpdateProductSetDiscount",
     ppb.UpdateProductSetDiscountRequest(request_id="u", update_mask={"paths": ["name"]}),
     "product_set_discount.discount_id"),
    (prpb_grpc.PromotionServiceStub, "GetPromotion", prpb.GetPromotionRequest(),
     "promotion_code"),
    (prpb_grpc.PromotionServiceStub, "GetPromotionReconciliation",
     prpb.GetPromotionReconciliationRequest(), "promotion_code"),
    (prpb_grpc.PromotionServiceStub, "ActivatePromotion",
     prpb.ActivatePromotionRequest(request_id="a"), "promotion_code"),
    (prpb_grpc.PromotionServiceStub, "DeactivatePromotion",
     prpb.DeactivatePromotionRequest(request_id="d"), "promotion_code"),
    (prpb_grpc.PromotionServiceStub, "UpdatePromotion",
     prpb.UpdatePromotionRequest(request_id="u", update_mask={"paths": ["description"]}),
     "promotion.promotion_code"),
    (rtpb_grpc.RewardTypeServiceStub, "GetRewardType", rtpb.GetRewardTypeRequest(), "name"),
    (rtpb_grpc.RewardTypeServiceStub, "UpdateRewardType",
     rtpb.UpdateRewardTypeRequest(request_id="u", update_mask=MASK), "reward_type.name"),
]


@pytest.mark.parametrize(("stub", "method", "request_message", "field"), CALLS,
                         ids=[c[1] for c in CALLS])
async def test_an_empty_id_is_a_missing_field(api: Api, stub: Any, method: str,
                                              request_message: Message, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await getattr(stub(api.channel), method)(request_message, metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"{field} is required"
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "MISSING_FIELD"
    assert dict(info.metadata) == {"field": field}
