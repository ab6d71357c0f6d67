"""Values the wire allows but the domain cannot hold are the caller's mistake, never INTERNAL.

A google.protobuf.Timestamp message can carry any int64 seconds and int32 nanos, but only
0001-01-01 .. 9999-12-31 (nanos 0 .. 999,999,999) is a time; a time_back amount can be any
int32, far more days than a timedelta holds; and a streamed upload has no single request
message for the interceptor's NUL safety net to inspect. Each of these once surfaced as
INTERNAL; each is now INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import codes_pb2 as copb
from promo.v1 import codes_pb2_grpc as copb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as cust_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e import promo_helpers
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e.campaign_helpers import create_campaign

GOOD = timestamp_pb2.Timestamp(seconds=1_795_000_000)
# Each: (what, an out-of-range Timestamp).
BAD_TIMES = [
    ("seconds past 9999", timestamp_pb2.Timestamp(seconds=253_402_300_800)),
    ("seconds before year 1", timestamp_pb2.Timestamp(seconds=-62_135_596_801)),
    ("int64 max seconds", timestamp_pb2.Timestamp(seconds=2**63 - 1)),
    ("negative nanos", timestamp_pb2.Timestamp(seconds=1_795_000_000, nanos=-1)),
    ("a whole second of nanos", timestamp_pb2.Timestamp(seconds=1_795_000_000,
                                                        nanos=1_000_000_000)),
    # The two ends: asyncpg would store them as -infinity / infinity, read back naive.
    ("exactly the year 1", timestamp_pb2.Timestamp(seconds=-62_135_596_800)),
    ("the last microsecond of 9999", timestamp_pb2.Timestamp(seconds=253_402_300_799,
                                                             nanos=999_999_999)),
]


def _fixed(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp,
           zone: str = "") -> fpb.TransactionPeriod:
    return fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(start=start, end=end,
                                                                  time_zone=zone))


def _calls(api: Api, bad: timestamp_pb2.Timestamp
           ) -> list[tuple[str, str, Callable[[], Awaitable[Any]]]]:
    """(call, field the error names, the call with ``bad`` in that field)."""
    bonuses = bonus_api.stub(api)
    formulas = fpb_grpc.FormulaServiceStub(api.channel)
    campaigns = cpb_grpc.CampaignServiceStub(api.channel)
    key = api.key()
    return [
        ("CreateBonusDefinition", "period.fixed.start", lambda: bonuses.CreateBonusDefinition(
            bpb.CreateBonusDefinitionRequest(request_id="d1", definition=bonus_api.definition(
                "fixed-start", "sum(bet.amount)", period=_fixed(bad, GOOD))), metadata=key)),
        ("UpdateBonusDefinition", "period.fixed.end", lambda: bonuses.UpdateBonusDefinition(
            bpb.UpdateBonusDefinitionRequest(
                request_id="d2", definition=bpb.BonusDefinition(
                    definition_id="anything", period=_fixed(GOOD, bad)),
                update_mask={"paths": ["period"]}), metadata=key)),
        ("DryRunFormula", "period.fixed.end", lambda: formulas.DryRunFormula(
            fpb.DryRunFormulaRequest(source="sum(bet.amount)", customer_id="p1",
                                     period=_fixed(GOOD, bad)), metadata=key)),
        ("CreateBonusRule", "period_end", lambda: bonuses.CreateBonusRule(
            bpb.CreateBonusRuleRequest(request_id="r1", rule=bpb.BonusRule(
                rule_id="r", definition_id="d", event_kind="bet", every=1,
                period_mode=bpb.RULE_PERIOD_MODE_FIRST_TO_FIXED_END, period_end=bad)),
            metadata=key)),
        ("RequestBonusCalculation", "period_start", lambda: bonuses.RequestBonusCalculation(
            bpb.RequestBonusCalculationRequest(request_id="q1", definition_id="d",
                                               customer_ids=["c1"], period_start=bad,
                                               period_end=GOOD), metadata=key)),
        ("ListBonusResults", "calculated_before", lambda: bonuses.ListBonusResults(
            bpb.ListBonusResultsRequest(calculated_before=bad), metadata=key)),
        ("CreateCampaign", "execute_at", lambda: campaigns.CreateCampaign(
            cpb.CreateCampaignRequest(request_id="c1", campaign=cpb.Campaign(
                campaign_id="camp", name="Camp", execute_at=bad,
                promotion_codes=["P"]), customer_ids=["c1"]), metadata=key)),
    ]


CALL_NAMES = ["CreateBonusDefinition", "UpdateBonusDefinition", "DryRunFormula",
              "CreateBonusRule", "RequestBonusCalculation", "ListBonusResults", "CreateCampaign"]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_TIMES], ids=[b[0] for b in BAD_TIMES])
@pytest.mark.parametrize("call_name", CALL_NAMES)
async def test_a_timestamp_out_of_range_is_invalid_time(api: Api, call_name: str,
                                                        bad: timestamp_pb2.Timestamp) -> None:
    await bonus_api.customers(api, ("p1", "EUR", "UTC"))  # DryRunFormula looks it up first
    calls = _calls(api, bad)
    assert [c[0] for c in calls] == CALL_NAMES
    name, field, call = next(c for c in calls if c[0] == call_name)
    with pytest.raises(grpc.RpcError) as caught:
        await call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name,
                                                                     caught.value.details())
    assert caught.value.details() == (
        f"{field}: seconds={bad.seconds}, nanos={bad.nanos} is not a valid timestamp; it must "
        "lie strictly between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "INVALID_TIME"
    assert dict(info.metadata) == {"field": field}


async def test_a_fixed_period_the_zone_pushes_out_of_range_is_invalid_period(api: Api) -> None:
    """0001-01-01T00:00:01Z is a valid Timestamp, but in New York it is the year 0."""
    first = timestamp_pb2.Timestamp(seconds=-62_135_596_799)
    await bonus_api.customers(api, ("p1", "EUR", "UTC"))
    with pytest.raises(grpc.RpcError) as caught:
        await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(fpb.DryRunFormulaRequest(
            source="sum(bet.amount)", customer_id="p1",
            period=_fixed(first, timestamp_pb2.Timestamp(seconds=first.seconds + 3600),
                          "America/New_York")), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == ("period.fixed falls outside the years 1..9999 in its "
                                      "time zone")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "INVALID_PERIOD"


@pytest.mark.parametrize("amount", [32, 1_000_000_000, 2_147_483_647])
async def test_a_huge_time_back_is_period_too_long(api: Api, amount: int) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await bonus_api.stub(api).CreateBonusDefinition(bpb.CreateBonusDefinitionRequest(
            request_id=f"huge-{amount}", definition=bonus_api.definition(
                "huge", "sum(bet.amount)", period=fpb.TransactionPeriod(
                    time_back=fpb.TransactionPeriod.TimeBack(
                        amount=amount, unit=fpb.TIME_UNIT_DAYS)))), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"the transaction period is {amount} days")
    assert caught.value.details().endswith("long; the limit is 31 days")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "PERIOD_TOO_LONG"


async def test_an_upload_naming_a_promotion_with_nul_is_invalid_text(api: Api) -> None:
    async def stream() -> Any:
        yield copb.UploadCodesRequest(promotion_code="SUMMER\x00", request_id="u1",
                                      data=b"AAA-111\n")

    with pytest.raises(grpc.RpcError) as caught:
        await copb_grpc.CodePoolServiceStub(api.channel).UploadCodes(stream(),
                                                                     metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == ("promotion_code must not contain the NUL character "
                                      "(U+0000): it cannot be stored")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "INVALID_TEXT"
    assert dict(info.metadata) == {"field": "promotion_code"}


@pytest.mark.parametrize("bad", [b[1] for b in BAD_TIMES[1:]], ids=[b[0] for b in BAD_TIMES[1:]])
async def test_an_event_time_out_of_range_is_named_at_its_position(
        api: Api, bad: timestamp_pb2.Timestamp) -> None:
    """Events are checked together (every problem named by position), so a bad occurred_at is
    one problem of INVALID_EVENTS, with the same explanation as read_timestamp's."""
    await bonus_api.customers(api, ("p1", "EUR", "UTC"))
    event = custpb.Event(external_id="e1", customer_id="p1", kind="bet", amount="1",
                      currency="EUR", occurred_at=bad)
    with pytest.raises(grpc.RpcError) as caught:
        await cust_grpc.CustomerServiceStub(api.channel).RecordEvents(
            custpb.RecordEventsRequest(request_id="r1", events=[event]), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        f"1 problem in events, nothing was written: events[0]: occurred_at is not a valid "
        f"time: seconds={bad.seconds}, nanos={bad.nanos} is not a valid timestamp; it must lie "
        "strictly between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z")


async def test_a_campaign_more_than_ten_years_ahead_is_refused(api: Api, clock: Any) -> None:
    """A campaign at 9999-12-31 was accepted, then ForecastCampaign crashed computing its day's
    end (found by tests/e2e/test_fuzz_audit.py)."""
    await promo_helpers.reward_type(api)
    await promo_helpers.promotion(api)
    far = clock.now() + timedelta(days=3661)
    with pytest.raises(grpc.RpcError) as caught:
        await create_campaign(api, "far", far, customers=["c1"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        f"execute_at {far.isoformat()} is more than 3,660 days (about ten years) ahead; "
        "schedule the campaign closer to its date")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "EXECUTION_TOO_FAR"
    near = await create_campaign(api, "near", clock.now() + timedelta(days=3659),
                                 customers=["c1"])
    assert near.campaign_id == "near"


@pytest.mark.parametrize("url", ["http://[", "https://[zz]/", "https://a\uff03b.example.com/"])
async def test_an_image_url_urlparse_cannot_read_is_invalid_url(api: Api, url: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await rtpb_grpc.RewardTypeServiceStub(api.channel).CreateRewardType(
            rtpb.CreateRewardTypeRequest(request_id="rt", reward_type=rtpb.RewardType(
                name="spins", display_name="Spins", category=1, image_url=url)),
            metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"image_url must be an http(s) URL, got {url!r}"


async def test_binary_metadata_beside_the_key_is_ignored_and_an_undecodable_key_refused(
        api: Api) -> None:
    """Every value used to be decoded as text first: one binary header that is not UTF-8 (a
    tracing header, say) made every authenticated call INTERNAL."""
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    listed = await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(), metadata=(
        ("x-client-trace-bin", b"\x00\x9f\xff"), *api.key()))
    assert list(listed.reward_types) == []
    with pytest.raises(grpc.RpcError) as caught:
        await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(), metadata=(
            ("x-api-key-bin", b"\xff\xfe"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
