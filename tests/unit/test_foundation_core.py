"""Pure pieces of the foundation: pagination tokens, decimals, reward-type rules, settings."""

from __future__ import annotations

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


@given(st.lists(st.one_of(st.text(max_size=20), st.integers()), min_size=1, max_size=3))
def test_page_token_round_trips(after: list[object]) -> None:
    cursor = decode_page_token(encode_page_token(after, {"status": "ACTIVE"}),
                               {"status": "ACTIVE"})
    assert cursor is not None and cursor.after == after


@given(st.text(max_size=60))
def test_any_garbage_token_is_a_clear_error(token: str) -> None:
    try:
        decode_page_token(token, {})
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_PAGE_TOKEN"


def test_page_token_with_other_filters_is_rejected() -> None:
    token = encode_page_token(["b"], {"status": "ACTIVE"})
    with pytest.raises(InvalidArgument, match="different filters"):
        decode_page_token(token, {"status": "DRAFT"})


@pytest.mark.parametrize(("text", "expected"), [("10.50", Decimal("10.50")), (" 7 ", Decimal(7)),
                                                ("0.000001", Decimal("0.000001"))])
def test_parse_decimal_accepts(text: str, expected: Decimal) -> None:
    assert parse_decimal(text, field="v") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("abc", "must be a decimal"), ("NaN", "finite"), ("Infinity", "finite"),
    ("-1", "must not be negative"), ("0.0000001", "6 decimal places"),
    ("123456789012345", "integer digits"), ("", "is required")])
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
