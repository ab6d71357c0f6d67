"""Pure pieces of the foundation: pagination tokens, decimals, reward-type rules, settings."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.settings import ApiKeyConfig, Settings, hash_api_key
from core.catalogue.reward_types import (
    RewardCategory,
    RewardType,
    apply_update,
    validate_reward_type,
)
from core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from core.money import format_decimal, parse_decimal
from core.pagination import decode_page_token, effective_page_size, encode_page_token
from server.auth import Authenticator


def test_page_size_defaults_and_limits() -> None:
    assert effective_page_size(0) == 50
    assert effective_page_size(7) == 7
    assert effective_page_size(5000) == 1000
    with pytest.raises(InvalidArgument) as err:
        effective_page_size(-1)
    assert err.value.reason == "INVALID_PAGE_SIZE"


_KEY_PARTS = st.one_of(
    st.tuples(st.just(str), st.text(st.characters(exclude_categories=("Cs",),
                                                  exclude_characters="\x00"), max_size=20)),
    st.tuples(st.just(int), st.integers(min_value=-(2**63), max_value=2**63 - 1)))


@given(st.lists(_KEY_PARTS, min_size=1, max_size=3))
def test_page_token_round_trips(parts: list[tuple[type, object]]) -> None:
    after = [value for _, value in parts]
    kinds = tuple(kind for kind, _ in parts)
    cursor = decode_page_token(encode_page_token(after, {"status": "ACTIVE"}),
                               {"status": "ACTIVE"}, key=kinds)
    assert cursor is not None and cursor.after == after


def test_a_datetime_key_part_comes_back_as_an_aware_datetime() -> None:
    moment = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    cursor = decode_page_token(encode_page_token([moment.isoformat(), 7], {}), {},
                               key=(datetime, int))
    assert cursor is not None and cursor.after == [moment, 7]


@given(st.text(max_size=60))
def test_any_garbage_token_is_a_clear_error(token: str) -> None:
    try:
        decode_page_token(token, {}, key=(str,))
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(("after", "kinds"), [
    ([], (str,)), (["a", "b"], (str,)), ([1], (str,)), (["x" * 1001], (str,)),
    (["a\x00b"], (str,)), (["\ud800"], (str,)), (["7"], (int,)), ([True], (int,)),
    ([2**63], (int,)), ([-(2**63) - 1], (int,)), ([1.5], (int,)), ([None], (int,)),
    (["2026-10-25T00:30:00"], (datetime,)), (["yesterday"], (datetime,)), ([5], (datetime,)),
])
def test_an_edited_key_is_an_invalid_page_token(after: list[object],
                                                 kinds: tuple[type, ...]) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_page_token(encode_page_token(after, {}), {}, key=kinds)
    assert err.value.reason == "INVALID_PAGE_TOKEN"
    assert err.value.message == "page_token is not a token this server issued"


def test_page_token_with_other_filters_is_rejected() -> None:
    token = encode_page_token(["b"], {"status": "ACTIVE"})
    with pytest.raises(InvalidArgument, match="different filters"):
        decode_page_token(token, {"status": "DRAFT"}, key=(str,))


@pytest.mark.parametrize(("text", "expected"), [("10.50", Decimal("10.50")), (" 7 ", Decimal(7)),
                                                ("0.000001", Decimal("0.000001")),
                                                ("1e13", Decimal(10) ** 13),
                                                ("123.45e2", Decimal(12345)),
                                                ("0e30", Decimal(0))])
def test_parse_decimal_accepts(text: str, expected: Decimal) -> None:
    assert parse_decimal(text, field="v") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("abc", "must be a decimal"), ("NaN", "finite"), ("Infinity", "finite"),
    ("-1", "must not be negative"), ("0.0000001", "6 decimal places"),
    ("123456789012345", "integer digits"), ("", "is required"),
    # An exponent counts: "1e20" is 21 integer digits (it reached numeric(20,6) and failed
    # there, INTERNAL); "1.2345678901234e14" is 15.
    ("1e20", "integer digits"), ("1E15", "integer digits"),
    ("1.2345678901234e14", "integer digits")])
def test_parse_decimal_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        parse_decimal(text, field="v")


def test_format_decimal_never_uses_exponents() -> None:
    assert format_decimal(Decimal("1E+3")) == "1000"
    assert format_decimal(Decimal("0.10")) == "0.10"
    assert format_decimal(None) == ""


def _rt(**kw: object) -> RewardType:
    base: dict[str, object] = {"name": "cash", "display_name": "Cash",
                               "category": RewardCategory.AMOUNT}
    base.update(kw)
    return RewardType(**base)  # type: ignore[arg-type]


def test_reward_type_validation_trims_and_checks() -> None:
    assert validate_reward_type(_rt(display_name="  Cash  ")).display_name == "Cash"
    with pytest.raises(InvalidArgument, match="http"):
        validate_reward_type(_rt(image_url="ftp://x/y.png"))
    with pytest.raises(InvalidArgument, match="above max_value"):
        validate_reward_type(_rt(min_value=Decimal(5), max_value=Decimal(1)))


def test_update_applies_only_masked_fields() -> None:
    current = _rt(description="old", min_value=Decimal(1))
    patch = _rt(description="new", min_value=Decimal(9), display_name="Other")
    updated = apply_update(current, patch, ["description"])
    assert (updated.description, updated.min_value, updated.display_name) == (
        "new", Decimal(1), "Cash")


def test_api_key_config_keeps_only_the_hash() -> None:
    config = ApiKeyConfig(name="ops", key="0123456789abcdef", roles=["admin"])
    assert config.key is None
    assert config.key_sha256 == hash_api_key("0123456789abcdef")
    assert "0123456789abcdef" not in repr(config)
    with pytest.raises(ValueError, match="unknown role"):
        ApiKeyConfig(name="x", key="0123456789abcdef", roles=["root"])
    with pytest.raises(ValueError, match="at least 16"):
        ApiKeyConfig(name="x", key="short", roles=["admin"])


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMO_GRPC_PORT", "6000")
    monkeypatch.setenv("PROMO_API_KEYS",
                       '[{"name": "rt", "key": "0123456789abcdef", "roles": ["runtime"]}]')
    settings = Settings()
    assert settings.grpc_port == 6000
    assert settings.api_keys[0].roles == ["runtime"]
    monkeypatch.setenv("PROMO_TLS_CERT_FILE", "/tmp/cert.pem")
    with pytest.raises(ValueError, match="PROMO_TLS_KEY_FILE"):
        Settings()


def test_settings_from_toml_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "promo.toml"
    path.write_text('grpc_port = 7000\nqueue_name = "from-file"\n')
    monkeypatch.setenv("PROMO_CONFIG_FILE", str(path))
    monkeypatch.setenv("PROMO_QUEUE_NAME", "from-env")
    settings = Settings()
    assert settings.grpc_port == 7000
    assert settings.queue_name == "from-env"  # the environment wins


def test_authenticator_roles() -> None:
    keys = [ApiKeyConfig(name="rt", key="runtime-key-0123456", roles=["runtime"]),
            ApiKeyConfig(name="boss", key="admin-key-01234567", roles=["admin"])]
    auth = Authenticator(keys, {"/s/GetReward": {"runtime"}, "/s/Create": {"admin"}})
    runtime = auth.authenticate("runtime-key-0123456")
    auth.authorize(runtime, "/s/GetReward")
    with pytest.raises(PermissionDenied):
        auth.authorize(runtime, "/s/Create")
    with pytest.raises(PermissionDenied):
        auth.authorize(runtime, "/s/Unlisted")  # unknown methods are denied by default
    auth.authorize(auth.authenticate("admin-key-01234567"), "/s/Unlisted")
    with pytest.raises(Unauthenticated):
        auth.authenticate(None)
    assert Authenticator.presented_key([("authorization", "Bearer abc")]) == "abc"
    assert Authenticator.is_public("/grpc.health.v1.Health/Check")


def test_an_altered_token_or_one_of_another_list_is_an_invalid_page_token() -> None:
    """The checksum covers the position, the filters and the List (``scope``): a client that
    moves the position, or sends ListRewardTypes' token to ListCustomers, is told so."""
    import base64
    import json

    token = encode_page_token(["b"], {}, scope="/promo.v1.RewardTypeService/ListRewardTypes")
    assert decode_page_token(token, {}, key=(str,),
                             scope="/promo.v1.RewardTypeService/ListRewardTypes") is not None
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    payload["a"] = ["z"]
    altered = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    for bad, scope in ((altered, "/promo.v1.RewardTypeService/ListRewardTypes"),
                       (token, "/promo.v1.CustomerService/ListCustomers")):
        with pytest.raises(InvalidArgument) as err:
            decode_page_token(bad, {}, key=(str,), scope=scope)
        assert err.value.reason == "INVALID_PAGE_TOKEN"
        assert err.value.message.startswith("page_token was altered or was issued by another")
    del payload["c"]  # a token of the previous format (no checksum) is not one of ours
    old = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    with pytest.raises(InvalidArgument, match="not a token this server issued"):
        decode_page_token(old, {}, key=(str,))
