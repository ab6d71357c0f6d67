"""Input the database cannot store, or that could never be used, is refused in the core with the
field's own reason: NUL in free text (core.text, shared by campaigns, listeners and ingestion),
control characters in campaign customer ids (the customers API's rules), "enc:" secrets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.campaigns import (
    CampaignSpec,
    check_campaign_id_lookup,
    check_execution_in_future,
    validate_campaign,
    validate_customer_ids,
)
from core.customers import CustomerInput, EventInput, validate_customers, validate_events
from core.errors import InvalidArgument, NotFound
from core.events import validate_description, validate_secret
from core.text import nul_problem

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
NUL_MESSAGE = "must not contain the NUL character (U+0000): it cannot be stored"


def spec(**kw: object) -> CampaignSpec:
    values: dict[str, object] = {"campaign_id": "spring", "name": "Spring",
                                 "execute_at": NOW + timedelta(hours=1), "conditional": True,
                                 "promotion_codes": ("VIP25",)}
    values.update(kw)
    return CampaignSpec(**values)  # type: ignore[arg-type]


def test_nul_problem_names_the_field_and_allows_other_control_characters() -> None:
    assert nul_problem("a\x00b", "name") == f"name {NUL_MESSAGE}"
    assert nul_problem("line\nbreak\ttab", "name") is None
    assert nul_problem("", "name") is None


def test_campaign_customer_ids_follow_the_customers_api() -> None:
    validate_customer_ids(["c1", "x" * 128, "é"], field="customer_ids", limit=10)
    for bad, problem in (("", "customer_id is required"),
                         ("x" * 129, "customer_id must be at most 128 characters, got 129"),
                         ("c\x00", "customer_id must not contain control characters"),
                         ("c\n", "customer_id must not contain control characters"),
                         ("c\x7f", "customer_id must not contain control characters")):
        with pytest.raises(InvalidArgument) as err:
            validate_customer_ids(["ok", bad], field="statuses", limit=10)
        assert (err.value.reason, err.value.message, err.value.metadata) == (
            "INVALID_CUSTOMER_ID", f"statuses[1]: {problem}", {"field": "statuses[1]"})


def test_a_campaign_name_with_nul_is_invalid_name() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_campaign(spec(name="Spring\x00sale"))
    assert (err.value.reason, err.value.message, err.value.metadata) == (
        "INVALID_NAME", f"name {NUL_MESSAGE}", {"field": "name"})


def test_a_promotion_code_no_promotion_can_have_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_campaign(spec(promotion_codes=("VIP25", "VIP\x0025")))
    assert (err.value.reason, err.value.metadata) == (
        "INVALID_PROMOTION_CODE", {"field": "promotion_codes[1]"})


def test_the_execution_time_is_checked_apart_from_the_shape() -> None:
    """validate_campaign does not look at the clock (a retry replays whatever the time)."""
    past = spec(execute_at=NOW - timedelta(seconds=1))
    assert validate_campaign(past) == past
    check_execution_in_future(NOW + timedelta(seconds=1), NOW)
    for when in (NOW, NOW - timedelta(seconds=1)):
        with pytest.raises(InvalidArgument) as err:
            check_execution_in_future(when, NOW)
        assert (err.value.reason, err.value.metadata) == (
            "EXECUTION_IN_PAST", {"field": "execute_at"})


def test_a_listener_description_with_nul_is_invalid_description() -> None:
    assert validate_description("line one\nline two") == "line one\nline two"
    with pytest.raises(InvalidArgument) as err:
        validate_description("team\x00", field="listener.description")
    assert (err.value.reason, err.value.message, err.value.metadata) == (
        "INVALID_DESCRIPTION", f"listener.description {NUL_MESSAGE}",
        {"field": "listener.description"})


@pytest.mark.parametrize("secret", ["enc:0123456789abcdef", "enc:v1:1a2b3c4d:AAAAAAAAAAAA"])
def test_a_secret_with_the_sealed_prefix_is_refused(secret: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_secret(secret, field="listener.secret")
    assert (err.value.reason, err.value.message) == (
        "INVALID_SECRET", "listener.secret must not start with 'enc:': that prefix marks an "
        "encrypted stored secret, so the worker could never sign with it")
    assert validate_secret("my-enc:secret-0123") == "my-enc:secret-0123"  # only as a prefix


def test_nul_in_property_and_attribute_values_is_a_problem_at_its_position() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_customers([CustomerInput("c1"), CustomerInput("c2", properties={
            "tier": "gold\x00", "note": "a\nb"})])
    assert err.value.message == ("1 problem in customers, nothing was written: customers[1]: "
                                 f"property 'tier' {NUL_MESSAGE}")
    events, problems = validate_events([EventInput(
        external_id="e1", customer_id="c1", kind="bet", amount="1", currency="EUR",
        occurred_at=NOW, attributes={"game": "slots\x00", "room": "a\tb"})], NOW)
    assert events == []
    assert [(p.index, p.message) for p in problems] == [(0, f"attribute 'game' {NUL_MESSAGE}")]


def test_a_campaign_id_no_campaign_can_have_is_not_found_before_any_query() -> None:
    check_campaign_id_lookup("spring-2026.v1")
    for bad in ("spring\x00", "", "-spring", "x" * 65):
        with pytest.raises(NotFound) as err:
            check_campaign_id_lookup(bad)
        assert (err.value.reason, err.value.message) == (
            "CAMPAIGN_NOT_FOUND", f"no campaign {bad!r}")
