"""Secrets at rest: seal a value (AES-256-GCM) before it is stored, open it when it is used.

Why: the webhook signing secrets must be readable by the sender (it signs with them), so they
cannot be hashed; in clear, anyone holding a database dump could forge our webhooks. Sealed,
a dump is useless without the keys, which live only in the processes' settings.

Stored form: ``enc:v1:<key id>:<base64url(nonce || ciphertext)>`` (no padding), where the key id
is the first 8 hex characters of sha256(key): it says which key opens the value without
revealing the key. The associated data binds a *purpose* (e.g. ``b"webhook_listeners.secret"``),
so a sealed value copied into a column of another use does not open there.

Rotation: ``SecretBox(keys)`` seals with the first key and opens with any of them. Prepend a new
key, re-seal the stored values (``promo secrets reseal``), then drop the old key.

A value without the ``enc:v<N>:`` prefix opens as itself: rows written before encryption was
turned on, or while no key was configured. (The API refuses new clear secrets starting with
``enc:``, but it accepted them before encryption existed: such a legacy ``enc:...`` secret that
is not ``enc:v<N>:...`` is clear text, not a damaged sealed value.) A box with no keys
(encryption off) still opens those; it refuses to seal, and names the key id of any sealed
value it meets. Errors never contain the secret or a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:"
VERSION = "v1"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per seal (2^32 seals per key stay far below
# the birthday bound for 96-bit nonces)
KEY_ID_CHARS = 8
# Mixed into the associated data with the purpose, so a later format cannot be confused with v1.
_AAD_PREFIX = b"promo-secret-box/v1\x00"


class SecretBoxError(Exception):
    """A sealed value cannot be opened (or a value cannot be sealed); the message names the key
    id involved, never the secret."""


class UnknownKeyError(SecretBoxError):
    """The value was sealed with a key that is not configured (dropped too early, or another
    deployment's)."""

    def __init__(self, key_id: str, configured: Sequence[str]) -> None:
        known = (f"PROMO_SECRET_ENCRYPTION_KEYS has key ids: {', '.join(configured)}"
                 if configured else "PROMO_SECRET_ENCRYPTION_KEYS is not set")
        super().__init__(f"secret sealed with key id {key_id}, which is not configured ({known})")
        self.key_id = key_id


class TamperedSecretError(SecretBoxError):
    """The value does not authenticate under its key: altered, or sealed for another purpose."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"secret sealed with key id {key_id} failed authentication: the stored value was "
            "altered, or sealed for another purpose")
        self.key_id = key_id


class MalformedSecretError(SecretBoxError):
    """The value starts with ``enc:`` but is not in a format this version reads."""


class NoSealingKeyError(SecretBoxError):
    """Sealing was asked of a box with no keys."""


def key_id(key: bytes) -> str:
    """The public name of a key: the first 8 hex characters of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:KEY_ID_CHARS]


def generate_key() -> str:
    """A new random key in the setting's format (standard base64 of 32 bytes)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=KEY_BYTES * 8)).decode()


def parse_keys(value: str) -> list[bytes]:
    """The keys of the setting: comma-separated base64 (standard or URL-safe, padding optional)
    of 32 bytes each, newest first. Raises ValueError naming the position of a bad key (1-based),
    never the value."""
    parts = value.split(",")
    keys: list[bytes] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(parts, start=1):
        where = f"key {position} of {len(parts)}"
        text = raw.strip()
        if not text:
            raise ValueError(f"{where} is empty (keys are separated by commas)")
        standard = text.replace("-", "+").replace("_", "/")
        standard += "=" * (-len(standard) % 4)
        try:
            key = base64.b64decode(standard, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where} is not base64 (standard or URL-safe)") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"{where} decodes to {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                             "(make one with: openssl rand -base64 32)")
        kid = key_id(key)
        if kid in seen:
            raise ValueError(f"{where} repeats key {seen[kid]} (key id {kid})")
        seen[kid] = position
        keys.append(key)
    return keys


# What every sealed value starts with, of this format or a later one (``enc:v2:`` is refused as
# written by a newer version, not read as clear text).
_SEALED = re.compile(r"enc:v[0-9]+:")


def sealed_key_id(value: str) -> str | None:
    """The key id a stored value was sealed with, or None for a clear value."""
    if not is_sealed(value):
        return None
    return _parse(value)[0]


def is_sealed(value: str) -> bool:
    return _SEALED.match(value) is not None


def _parse(value: str) -> tuple[str, bytes]:
    """(key id, nonce || ciphertext) of a sealed value."""
    parts = value.split(":", 3)
    if len(parts) > 1 and parts[1] and parts[1] != VERSION:
        raise MalformedSecretError(
            f"stored secret has the 'enc:' prefix but format {parts[1][:10]!r}, not "
            f"'{VERSION}' (written by a newer version, or damaged)")
    if len(parts) != 4:
        raise MalformedSecretError(
            f"stored secret has the 'enc:' prefix but is not enc:{VERSION}:<key id>:<data>")
    kid, payload = parts[2], parts[3]
    if len(kid) != KEY_ID_CHARS or any(c not in "0123456789abcdef" for c in kid):
        raise MalformedSecretError("stored secret has a malformed key id")
    try:
        blob = base64.b64decode(payload.replace("-", "+").replace("_", "/")
                                + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedSecretError(f"stored secret sealed with key id {kid} is not "
                                   "base64url") from None
    if len(blob) < NONCE_BYTES + 16:  # a nonce and GCM's 16-byte tag at least
        raise MalformedSecretError(f"stored secret sealed with key id {kid} is truncated")
    return kid, blob


class SecretBox:
    """Seals with the first key, opens with any. ``SecretBox([])`` is encryption turned off:
    clear values pass through, sealing raises NoSealingKeyError."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._ciphers: dict[str, AESGCM] = {}
        for position, key in enumerate(keys, start=1):
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {position} is {len(key)} bytes; AES-256 needs "
                                 f"{KEY_BYTES}")
            kid = key_id(key)
            if kid in self._ciphers:
                raise ValueError(f"key {position} repeats an earlier key (key id {kid})")
            self._ciphers[kid] = AESGCM(key)
        self._current = next(iter(self._ciphers), None)

    @classmethod
    def from_setting(cls, value: str | None) -> SecretBox:
        """The box for PROMO_SECRET_ENCRYPTION_KEYS (None or blank: no keys)."""
        return cls(parse_keys(value) if value and value.strip() else [])

    @property
    def sealing(self) -> bool:
        """True when a key is configured: new values are stored sealed."""
        return self._current is not None

    @property
    def current_key_id(self) -> str | None:
        return self._current

    @property
    def key_ids(self) -> list[str]:
        """Every configured key id, the sealing one first."""
        return list(self._ciphers)

    def seal(self, plain: str, *, purpose: bytes) -> str:
        """``plain`` sealed with the first key for ``purpose``."""
        if self._current is None:
            raise NoSealingKeyError("no encryption key is configured "
                                    "(PROMO_SECRET_ENCRYPTION_KEYS): cannot seal a secret")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._current].encrypt(nonce, plain.encode(), _aad(purpose))
        payload = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
        return f"{PREFIX}{VERSION}:{self._current}:{payload}"

    def open(self, value: str, *, purpose: bytes) -> str:
        """The clear text of a stored value: a clear value as is, a sealed one decrypted with
        the key its id names. Raises UnknownKeyError, TamperedSecretError or
        MalformedSecretError (all SecretBoxError)."""
        if not is_sealed(value):
            return value
        kid, blob = _parse(value)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise UnknownKeyError(kid, self.key_ids)
        try:
            plain = cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(purpose))
        except InvalidTag:
            raise TamperedSecretError(kid) from None
        try:
            return plain.decode()
        except UnicodeDecodeError:  # authenticated, so only a sealer's bug gets here
            raise TamperedSecretError(kid) from None

    def is_sealed_with_current_key(self, value: str) -> bool:
        """True when ``value`` needs no re-seal: sealed, and with the first key. (Whether it
        also opens is not checked here: the tag is checked when it is opened.)"""
        return (self._current is not None
                and value.startswith(f"{PREFIX}{VERSION}:{self._current}:"))

    def reseal(self, value: str, *, purpose: bytes) -> str:
        """``value`` (clear, or sealed with any configured key) sealed with the first key; the
        same string when it already is."""
        if self.is_sealed_with_current_key(value):
            return value
        return self.seal(self.open(value, purpose=purpose), purpose=purpose)


def _aad(purpose: bytes) -> bytes:
    if not purpose:
        raise ValueError("a purpose is required (it binds a sealed value to its use)")
    return _AAD_PREFIX + purpose
