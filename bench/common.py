"""Shared helpers for the benches: a throwaway database, server processes, a closed-loop gRPC
load client, CPU accounting, percentiles, and py-spy profiles.

Why a server process of its own: a Python load client eats most of a core, and on a 2-core
machine it would otherwise share the server's event loop and GIL. The client still shares the
machine, which every figure here has to be read with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ADMIN_KEY = "bench-admin-key-0123456789"
RUNTIME_KEY = "bench-runtime-key-0123456789"
ADMIN_METADATA = (("x-api-key", ADMIN_KEY),)
RUNTIME_METADATA = (("x-api-key", RUNTIME_KEY),)
# Calls in flight per client channel (each channel is its own HTTP/2 connection).
IN_FLIGHT_PER_CHANNEL = 16


def default_database_url() -> str:
    return os.environ.get("PROMO_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def drop_database(url: str, name: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_database(url: str, name: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one run, dropped afterwards (also on error or Ctrl-C)."""
    from storage.migrate import migrate

    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(url, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await asyncio.shield(drop_database(url, name))


def bench_settings(database_url: str, log_level: str = "WARNING") -> object:
    """Server settings as a deployment would have them, but with the bench's keys, a free
    port, no migration on start, and logging at WARNING (per-call INFO lines would dominate)."""
    from config.settings import ApiKeyConfig, Settings

    return Settings(
        database_url=database_url, grpc_host="127.0.0.1", grpc_port=0, migrate_on_start=False,
        log_level=log_level, shutdown_grace_seconds=1.0,
        api_keys=[ApiKeyConfig(name="bench-admin", key=ADMIN_KEY, roles=["admin"]),
                  ApiKeyConfig(name="bench-runtime", key=RUNTIME_KEY, roles=["runtime"])])


def serve(start: Callable[[], object]) -> None:
    """Child-process side of ``ServerProcess``: ``start`` is an async callable returning
    ``(port, stop)`` where ``stop`` is an async callable. Prints ``READY <port>`` once serving
    and stops on SIGTERM or SIGINT."""

    async def main() -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)
        port, stop = await start()  # type: ignore[operator]
        print(f"READY {port}", flush=True)
        try:
            await stop_event.wait()
        finally:
            await stop()

    asyncio.run(main())


@dataclass
class ServerProcess:
    """A server in a process of its own (``python -m <module> --serve ...``)."""

    proc: asyncio.subprocess.Process
    address: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, module: str, args: Sequence[str], *, ready_within: float = 30,
                    quiet: bool = False) -> ServerProcess:
        """``quiet``: send the server's stderr (its log) to /dev/null instead of ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, start_new_session=True,
            stderr=asyncio.subprocess.DEVNULL if quiet else None)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), ready_within)
            if not line.startswith(b"READY "):
                raise RuntimeError(f"server {module} did not start (said {line!r})"
                                   + ("" if quiet else "; its stderr is above"))
        except BaseException:
            await _terminate(proc)
            raise
        return cls(proc=proc, address=f"127.0.0.1:{int(line.split()[1])}")

    async def stop(self) -> None:
        await _terminate(self.proc)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --- load -------------------------------------------------------------------------------------


class Requests:
    """Pre-encoded request bodies, handed out in order; ``make(i)`` builds body number ``i``.
    Build enough before a timed run: running out builds more inside it (counted as a refill)."""

    def __init__(self, make: Callable[[int], bytes]) -> None:
        self._make = make
        self._next_built = 0
        self._bodies: list[bytes] = []
        self._taken = 0
        self.refills = 0

    def prebuild(self, count: int) -> None:
        self._bodies = self._bodies[self._taken:]
        self._taken = 0
        missing = count - len(self._bodies)
        if missing > 0:
            start = self._next_built
            self._bodies.extend(self._make(i) for i in range(start, start + missing))
            self._next_built += missing

    def take(self) -> bytes:
        if self._taken >= len(self._bodies):
            self.refills += 1
            self.prebuild(len(self._bodies) - self._taken + 1000)
        body = self._bodies[self._taken]
        self._taken += 1
        return body


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float]  # seconds, one per completed call (errors included)
    replies: list[bytes]  # the response bodies of the OK calls, for checking afterwards
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    server_sys_s: float | None = None  # of which in the kernel (syscalls: sockets, epoll)
    pg_cpu_s: float | None = None
    machine_busy: float | None = None  # share of all CPUs busy (anyone's work), 0..1

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000

    def cpu_ms_per_call(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.calls else seconds * 1000 / self.calls


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def open_channels(address: str, concurrency: int) -> list[aio.Channel]:
    """One channel (one connection: no shared subchannel pool) per IN_FLIGHT_PER_CHANNEL."""
    count = max(1, -(-concurrency // IN_FLIGHT_PER_CHANNEL))
    return [aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


async def close_channels(channels: Sequence[aio.Channel]) -> None:
    for channel in channels:
        await channel.close()


async def closed_loop(channels: Sequence[aio.Channel], method: str, requests: Requests, *,
                      concurrency: int, seconds: float | None = None, calls: int | None = None,
                      metadata: tuple[tuple[str, str], ...] = RUNTIME_METADATA,
                      server_pid: int | None = None, pg: PgCpu | None = None) -> LoadResult:
    """``concurrency`` workers, each sending its next call as soon as the last one answered,
    for ``seconds`` or until ``calls`` calls were sent. Bodies go out as they are (no
    serializer) and replies are kept as bytes, so the client's cost is the same per call
    whatever the method."""
    assert seconds is not None or calls is not None
    stubs = [channel.unary_unary(method) for channel in channels]
    latencies: list[float] = []
    replies: list[bytes] = []
    errors: Counter[str] = Counter()
    budget = itertools.count() if calls is None else iter(range(calls))
    clock = time.perf_counter

    async def worker(stub: aio.UnaryUnaryMultiCallable, deadline: float) -> None:
        for _ in budget:
            if clock() >= deadline:
                return
            body = requests.take()
            started = clock()
            try:
                reply = await stub(body, metadata=metadata)
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1  # type: ignore[attr-defined]
                latencies.append(clock() - started)
                continue
            latencies.append(clock() - started)
            replies.append(reply)

    server_before = process_cpu(server_pid)
    pg_before = pg.sample() if pg else None
    machine_before = machine_cpu()
    cpu_before = time.process_time()
    started = clock()
    deadline = started + seconds if seconds is not None else float("inf")
    await asyncio.gather(*(worker(stubs[i % len(stubs)], deadline) for i in range(concurrency)))
    elapsed = clock() - started
    result = LoadResult(concurrency=concurrency, seconds=elapsed, latencies=latencies,
                        replies=replies, errors=errors,
                        client_cpu_s=time.process_time() - cpu_before)
    server_after = process_cpu(server_pid)
    machine_after = machine_cpu()
    if machine_before is not None and machine_after is not None:
        total = machine_after[0] - machine_before[0]
        result.machine_busy = (machine_after[1] - machine_before[1]) / total if total else None
    if server_before is not None and server_after is not None:
        result.server_cpu_s = sum(server_after) - sum(server_before)
        result.server_sys_s = server_after[1] - server_before[1]
    if pg is not None and pg_before is not None:
        result.pg_cpu_s = pg.since(pg_before)
    return result


# --- CPU accounting ---------------------------------------------------------------------------


def process_cpu(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process (all its threads), or None if unreadable."""
    if pid is None:
        return None
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
    except Exception:
        return None
    return float(times.user), float(times.system)


def machine_cpu() -> tuple[float, float] | None:
    """(all CPU seconds, busy CPU seconds) of the whole machine since boot, or None."""
    try:
        import psutil

        times = psutil.cpu_times()
    except Exception:
        return None
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(times)
    return total, total - idle


class PgCpu:
    """CPU of the PostgreSQL backends connected to one database (not the cluster's shared
    background processes, which also work for every other database on the server). Only when
    PostgreSQL runs on this machine and its processes are readable; otherwise None."""

    def __init__(self, dsn: str, database: str) -> None:
        self._dsn = dsn
        self._database = database
        self._pids: list[int] = []

    async def pids(self) -> list[int]:
        conn = await asyncpg.connect(self._dsn)
        try:
            rows = await conn.fetch(
                """SELECT pid FROM pg_stat_activity
                    WHERE datname = $1 AND pid <> pg_backend_pid()""",
                self._database)
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    async def refresh(self) -> None:
        """Find the processes to watch now (call after the server's pool has connected)."""
        self._pids = await self.pids()

    def sample(self) -> dict[int, float] | None:
        return self._read(self._pids)

    def since(self, before: dict[int, float]) -> float | None:
        after = self._read(list(before))
        if after is None:
            return None
        return sum(after[pid] - before[pid] for pid in after if pid in before)

    @staticmethod
    def _read(pids: Sequence[int]) -> dict[int, float] | None:
        found: dict[int, float] = {}
        for pid in pids:
            cpu = process_cpu(pid)
            if cpu is not None:
                found[pid] = sum(cpu)
        return found or None


# --- profiling --------------------------------------------------------------------------------


def py_spy_path() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


PY_SPY_RATE = 250


async def py_spy_record(pid: int, seconds: float, out: Path, *,
                        rate: int = PY_SPY_RATE) -> asyncio.subprocess.Process:
    """Start ``py-spy record`` (collapsed stacks, CPU samples only) on ``pid``; await the
    returned process to have the file."""
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    args = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking"]
    return await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)


def inclusive_ms_per_call(path: Path, keys: Sequence[tuple[str, Sequence[str]]], *, calls: int,
                          rate: int) -> list[tuple[str, float]]:
    """CPU ms per call spent under each key (a sample counts for a key when any frame of its
    stack contains one of the key's substrings), from ``py-spy record --format raw`` output
    taken at ``rate`` samples/s while ``calls`` calls were served; first row: all samples."""
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if count_text.isdigit():
            stacks.append((stack.split(";"), int(count_text)))
    scale = 1000 / rate / max(calls, 1)
    rows = [("all sampled CPU", sum(n for _, n in stacks) * scale)]
    for label, needles in keys:
        hits = sum(n for frames, n in stacks
                   if any(needle in frame for frame in frames for needle in needles))
        rows.append((label, hits * scale))
    return rows


def top_frames(path: Path, limit: int = 15, *, leaf: bool = True) -> list[tuple[str, float]]:
    """The most frequent leaf (self time) or inclusive frames, as (frame, share of samples)."""
    total = 0
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        if leaf:
            counts[frames[-1]] += count
        else:
            for frame in set(frames):
                counts[frame] += count
    return [(frame, n / total) for frame, n in counts.most_common(limit)] if total else []


def dynamic_bench_parser(doc: str, *, repeats: str, quick_help: str) -> argparse.ArgumentParser:
    """The options of the dynamic-bonus benches: --quick, --dsn, sizes and ``--<repeats>``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dsn", default=default_database_url(),
                        help="a maintenance database of a server where the bench may create "
                             "a database (default: $PROMO_BENCH_DATABASE_URL or local)")
    parser.add_argument(f"--{repeats}", type=int, default=0)
    parser.add_argument("--customers", type=int, default=0)
    parser.add_argument("--events", type=int, default=0)
    return parser
