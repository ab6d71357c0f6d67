"""Checks of the TLS files named by the settings, run when the settings load.

Why at load: gRPC reads the files only when the server binds, and then reports a missing file
as a traceback and a file that is not PEM as "Failed to bind to address". Checked here, every
problem is one line naming the setting (``promo`` exits with status 2, as for any bad setting).
The messages name the file and the problem, never the file's content.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TlsFileError(ValueError):
    """A TLS setting names a file that is missing, unreadable or not what it should hold."""


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsFileError(f"{setting}: {path} does not exist") from None
    except OSError as exc:
        raise TlsFileError(f"{setting}: {path} cannot be read ({exc.strerror})") from None


def load_certificates(path: Path, setting: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (at least one)."""
    data = _read(path, setting)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(f"{setting}: {path} holds no PEM certificate "
                           "(-----BEGIN CERTIFICATE----- ...)") from None


def load_private_key(path: Path, setting: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key in ``path`` (gRPC cannot use an encrypted one)."""
    data = _read(path, setting)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a password is needed
        raise TlsFileError(f"{setting}: {path} holds an encrypted private key; gRPC needs it "
                           "unencrypted (openssl pkey -in KEY -out PLAIN_KEY)") from None
    except Exception:  # ValueError, UnsupportedAlgorithm: neither says more that helps
        raise TlsFileError(f"{setting}: {path} holds no PEM private key "
                           "(-----BEGIN PRIVATE KEY----- ...)") from None


def check_server_files(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
    """Raise TlsFileError unless the certificate chain, its key and the client CA bundle (if
    any) load, and the key belongs to the chain's first certificate."""
    chain = load_certificates(cert_file, "PROMO_TLS_CERT_FILE")
    key = load_private_key(key_file, "PROMO_TLS_KEY_FILE")
    if client_ca_file is not None:
        load_certificates(client_ca_file, "PROMO_TLS_CLIENT_CA_FILE")
    if chain[0].public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise TlsFileError(f"PROMO_TLS_KEY_FILE: {key_file} is not the private key of the first "
                           f"certificate in PROMO_TLS_CERT_FILE ({cert_file})")
