"""TLS is a setting away: with a certificate and key the server speaks TLS only, and with a
client CA it requires client certificates (mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import grpc
import pytest
import trustme
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from config.settings import Settings
from promo.v1 import reward_types_pb2 as pb
from promo.v1 import reward_types_pb2_grpc as pb_grpc
from server.app import Dependencies, start_server
from tests.conftest import Api


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, root = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    root.write_bytes(ca.cert_pem.bytes())
    return chain, key, root


async def test_tls_server_accepts_tls_and_refuses_plaintext(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path, ca: trustme.CA) -> None:
    chain, key, root = _files(tmp_path, ca)
    tls = settings.model_copy(update={"tls_cert_file": chain, "tls_key_file": key})
    running = await start_server(tls, Dependencies(pool=pool))
    try:
        port = running.port
        credentials = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
        async with aio.secure_channel(f"localhost:{port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listed = await pb_grpc.RewardTypeServiceStub(channel).ListRewardTypes(
                pb.ListRewardTypesRequest(), metadata=Api.key(), timeout=5)
            assert list(listed.reward_types) == []
        async with aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.RpcError) as err:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_mutual_tls_requires_a_client_certificate(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path, ca: trustme.CA) -> None:
    chain, key, root = _files(tmp_path, ca)
    mtls = settings.model_copy(update={"tls_cert_file": chain, "tls_key_file": key,
                                       "tls_client_ca_file": root})
    running = await start_server(mtls, Dependencies(pool=pool))
    try:
        target = f"localhost:{running.port}"
        client = ca.issue_cert("promo-system")
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=root.read_bytes(), private_key=client.private_key_pem.bytes(),
            certificate_chain=b"".join(b.bytes() for b in client.cert_chain_pems))
        async with aio.secure_channel(target, with_cert) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        without = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
        async with aio.secure_channel(target, without) as channel:
            with pytest.raises(grpc.RpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)
