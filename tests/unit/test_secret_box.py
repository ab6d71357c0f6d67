"""core.secret_box: sealing round trips, rotation, the errors (naming key ids, never secrets or
keys), and the parse of PROMO_SECRET_ENCRYPTION_KEYS; plus the setting itself."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.settings import SecretKeysSettingError, Settings
from core.secret_box import (
    MalformedSecretError,
    NoSealingKeyError,
    SecretBox,
    SecretBoxError,
    TamperedSecretError,
    UnknownKeyError,
    generate_key,
    is_sealed,
    key_id,
    parse_keys,
    sealed_key_id,
)

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
PURPOSE = b"webhook_listeners.secret"
SECRET = "listener-secret-0123456789abcdef"


def _id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def test_key_id_is_the_first_8_hex_of_sha256() -> None:
    assert key_id(OLD) == _id(OLD) and len(key_id(OLD)) == 8
    assert key_id(OLD) != key_id(NEW)


def test_sealed_form_and_round_trip() -> None:
    box = SecretBox([NEW])
    sealed = box.seal(SECRET, purpose=PURPOSE)
    prefix, version, kid, payload = sealed.split(":")
    assert (prefix, version, kid) == ("enc", "v1", _id(NEW))
    assert SECRET not in sealed and "=" not in payload
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert len(raw) == 12 + len(SECRET.encode()) + 16  # nonce, ciphertext, GCM tag
    assert box.open(sealed, purpose=PURPOSE) == SECRET
    assert box.seal(SECRET, purpose=PURPOSE) != sealed  # a fresh nonce each time
    assert is_sealed(sealed) and sealed_key_id(sealed) == _id(NEW)
    assert sealed_key_id(SECRET) is None and not is_sealed(SECRET)


@given(plain=st.text(max_size=300), purpose=st.binary(min_size=1, max_size=40))
def test_any_text_round_trips(plain: str, purpose: bytes) -> None:
    box = SecretBox([OLD, NEW])
    sealed = box.seal(plain, purpose=purpose)
    assert sealed.startswith(f"enc:v1:{_id(OLD)}:")
    assert box.open(sealed, purpose=purpose) == plain
    assert SecretBox([NEW, OLD]).open(sealed, purpose=purpose) == plain


def test_rotation_new_key_seals_old_key_still_opens() -> None:
    old_box, rotated = SecretBox([OLD]), SecretBox([NEW, OLD])
    under_old = old_box.seal(SECRET, purpose=PURPOSE)
    assert rotated.current_key_id == _id(NEW) and rotated.key_ids == [_id(NEW), _id(OLD)]
    assert rotated.open(under_old, purpose=PURPOSE) == SECRET
    under_new = rotated.seal(SECRET, purpose=PURPOSE)
    assert sealed_key_id(under_new) == _id(NEW)
    assert not rotated.is_sealed_with_current_key(under_old)
    assert rotated.is_sealed_with_current_key(under_new)
    assert not rotated.is_sealed_with_current_key(SECRET)
    resealed = rotated.reseal(under_old, purpose=PURPOSE)
    assert sealed_key_id(resealed) == _id(NEW)
    assert rotated.reseal(resealed, purpose=PURPOSE) == resealed  # idempotent
    assert sealed_key_id(rotated.reseal(SECRET, purpose=PURPOSE)) == _id(NEW)  # clear: sealed
    with pytest.raises(UnknownKeyError) as err:
        old_box.open(under_new, purpose=PURPOSE)
    assert err.value.key_id == _id(NEW)


def test_unknown_key_id_is_named_and_nothing_secret_is() -> None:
    sealed = SecretBox([NEW]).seal(SECRET, purpose=PURPOSE)
    with pytest.raises(UnknownKeyError) as err:
        SecretBox([OLD]).open(sealed, purpose=PURPOSE)
    message = str(err.value)
    assert message == (f"secret sealed with key id {_id(NEW)}, which is not configured "
                       f"(PROMO_SECRET_ENCRYPTION_KEYS has key ids: {_id(OLD)})")
    assert SECRET not in message and sealed.split(":")[3] not in message
    with pytest.raises(UnknownKeyError, match=r"\(PROMO_SECRET_ENCRYPTION_KEYS is not set\)$"):
        SecretBox([]).open(sealed, purpose=PURPOSE)


@pytest.mark.parametrize("position", [20, 30, -1])
def test_tampering_is_detected(position: int) -> None:
    box = SecretBox([NEW])
    sealed = box.seal(SECRET, purpose=PURPOSE)
    head, payload = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raw[position] ^= 0x01  # a byte of the nonce (early), the ciphertext or the tag (last)
    altered = head + ":" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(TamperedSecretError) as err:
        box.open(altered, purpose=PURPOSE)
    assert str(err.value) == (f"secret sealed with key id {_id(NEW)} failed authentication: "
                              "the stored value was altered, or sealed for another purpose")


def test_a_value_sealed_for_another_purpose_does_not_open() -> None:
    box = SecretBox([NEW])
    sealed = box.seal(SECRET, purpose=b"smtp.password")
    with pytest.raises(TamperedSecretError):
        box.open(sealed, purpose=PURPOSE)
    with pytest.raises(ValueError, match="a purpose is required"):
        box.seal(SECRET, purpose=b"")


def test_clear_values_pass_through_with_or_without_keys() -> None:
    for box in (SecretBox([]), SecretBox([NEW])):
        assert box.open(SECRET, purpose=PURPOSE) == SECRET
        assert box.open("", purpose=PURPOSE) == ""


def test_a_box_without_keys_refuses_to_seal() -> None:
    box = SecretBox([])
    assert not box.sealing and box.current_key_id is None and box.key_ids == []
    with pytest.raises(NoSealingKeyError, match="no encryption key is configured"):
        box.seal(SECRET, purpose=PURPOSE)
    assert SecretBox.from_setting(None).key_ids == []
    assert SecretBox.from_setting("  ").key_ids == []


@pytest.mark.parametrize(("value", "problem"), [
    ("enc:v2:0123abcd:AAAA", "format 'v2', not 'v1'"),
    ("enc:v1:nothex!!:AAAA", "malformed key id"),
    ("enc:v1:0123abcd", "is not enc:v1:<key id>:<data>"),
    ("enc:v1:0123abcd:@@@@", "is not base64url"),
    ("enc:v1:0123abcd:AAAA", "is truncated"),
])
def test_malformed_sealed_values(value: str, problem: str) -> None:
    with pytest.raises(MalformedSecretError, match=problem):
        SecretBox([NEW]).open(value, purpose=PURPOSE)
    assert issubclass(MalformedSecretError, SecretBoxError)


@pytest.mark.parametrize("legacy", ["enc:", "enc:legacy-clear-secret-01", "enc:v:x", "enc:V1:x"])
def test_a_legacy_clear_secret_starting_with_enc_opens_as_itself(legacy: str) -> None:
    """The API accepted such secrets before encryption existed (it refuses them now): only
    enc:v<N>: marks a sealed value."""
    assert SecretBox([NEW]).open(legacy, purpose=PURPOSE) == legacy
    assert SecretBox.from_setting(None).open(legacy, purpose=PURPOSE) == legacy
    assert not is_sealed(legacy) and sealed_key_id(legacy) is None
    resealed = SecretBox([NEW]).reseal(legacy, purpose=PURPOSE)
    assert is_sealed(resealed) and SecretBox([NEW]).open(resealed, purpose=PURPOSE) == legacy


def test_parse_keys_standard_and_urlsafe_with_or_without_padding() -> None:
    tricky = bytes([0xFB, 0xFF] * 16)  # encodes with '+' and '/' (or '-' and '_')
    standard = base64.b64encode(tricky).decode()
    urlsafe = base64.urlsafe_b64encode(tricky).decode().rstrip("=")
    assert "+" in standard or "/" in standard
    assert parse_keys(standard) == [tricky]
    assert parse_keys(urlsafe) == [tricky]
    assert parse_keys(f" {base64.b64encode(NEW).decode()} , {standard}") == [NEW, tricky]
    generated = generate_key()
    [key] = parse_keys(generated)
    assert len(key) == 32 and base64.b64encode(key).decode() == generated


@pytest.mark.parametrize(("value", "message"), [
    ("AAAA", "key 1 of 1 decodes to 3 bytes; AES-256 needs 32 "
             "(make one with: openssl rand -base64 32)"),
    (f"{base64.b64encode(NEW).decode()},not base64!", "key 2 of 2 is not base64 "
                                                     "(standard or URL-safe)"),
    (f"{base64.b64encode(NEW).decode()},,x", "key 2 of 3 is empty (keys are separated by "
                                             "commas)"),
    (f"{base64.b64encode(NEW).decode()},{base64.b64encode(NEW).decode()}",
     f"key 2 of 2 repeats key 1 (key id {_id(NEW)})"),
])
def test_parse_keys_errors_name_the_position_not_the_value(value: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_keys(value)
    assert str(err.value) == message
    for part in value.split(","):
        if len(part) > 4:
            assert part not in str(err.value)


def test_box_rejects_wrong_key_lengths() -> None:
    with pytest.raises(ValueError, match="key 2 is 16 bytes; AES-256 needs 32"):
        SecretBox([NEW, bytes(16)])


# The setting.

def test_setting_parses_and_builds_the_box(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = f"{base64.b64encode(NEW).decode()},{base64.urlsafe_b64encode(OLD).decode()}"
    monkeypatch.setenv("PROMO_SECRET_ENCRYPTION_KEYS", keys)
    settings = Settings()
    assert settings.secret_encryption_keys is not None
    assert keys not in repr(settings) and keys not in str(settings.model_dump())
    assert settings.secret_box().key_ids == [_id(NEW), _id(OLD)]
    monkeypatch.setenv("PROMO_SECRET_ENCRYPTION_KEYS", " ")
    assert Settings().secret_encryption_keys is None
    assert not Settings().secret_box().sealing


def test_a_bad_key_setting_fails_at_load_without_echoing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    good = base64.b64encode(NEW).decode()
    bad = base64.b64encode(b"sixteen-byte-key").decode()
    monkeypatch.setenv("PROMO_SECRET_ENCRYPTION_KEYS", f"{good},{bad}")
    with pytest.raises(SecretKeysSettingError) as err:
        Settings()
    assert str(err.value) == ("PROMO_SECRET_ENCRYPTION_KEYS: key 2 of 2 decodes to 16 bytes; "
                              "AES-256 needs 32 (make one with: openssl rand -base64 32)")
    assert good not in str(err.value) and bad not in str(err.value)
