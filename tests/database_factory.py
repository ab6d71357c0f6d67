"""Each test's own database, cloned from the migrated template a few tests ahead, on a thread.

Why: ``CREATE DATABASE ... TEMPLATE`` costs 0.3-0.6 s here, nearly all of it waiting for the
disk (PostgreSQL writes and syncs every one of the template's few hundred relation files), and
every test needs one: made on demand, it was a third of the suite's time. Made ahead on a thread
of its own, that wait overlaps the tests running meanwhile, which need the CPU, not the disk.
Every test still gets a fresh clone nobody else has touched; the clones of a test that ends are
dropped on the same thread (``WITH (FORCE)``, as before: a connection a test leaked does not
hold the drop up).

The thread runs its own event loop with two asyncpg connections to the maintenance database.
An error there (PostgreSQL down, disk full) is handed to every later test that asks, which
fails with it; the thread makes no more databases but still drops the ones given back, and a
name given back after the thread has finished is dropped by ``give_back`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid

import asyncpg

CLONES_AHEAD = 4
PARALLEL_CLONES = 2
_TAKE_TIMEOUT_SECONDS = 120.0


class DatabaseFactory:
    """Fresh clones of ``template`` (named ``prefix`` + random), CLONES_AHEAD of them ready."""

    def __init__(self, admin_url: str, template: str, *, ahead: int = CLONES_AHEAD,
                 prefix: str = "promo_t_") -> None:
        self._admin_url = admin_url
        self._prefix = prefix
        self._template = template
        self._ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=ahead)
        self._to_drop: queue.Queue[str] = queue.Queue()
        self._stopping = threading.Event()
        self._failed: BaseException | None = None
        self._making = 0  # clones being made (on the thread's loop)
        # Set (under the lock) once the thread has dropped its last database: a name given back
        # after that is dropped by give_back itself.
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="test-database-factory",
                                        daemon=True)
        self._thread.start()

    def take(self) -> str:
        """The name of a fresh clone, for one test only (give it back with ``give_back``)."""
        if self._failed is not None:
            raise RuntimeError("cloning a test database failed") from self._failed
        try:
            made = self._ready.get(timeout=_TAKE_TIMEOUT_SECONDS)
        except queue.Empty:
            raise RuntimeError(f"no test database was cloned in {_TAKE_TIMEOUT_SECONDS:.0f} s"
                               ) from self._failed
        if isinstance(made, BaseException):
            raise RuntimeError("cloning a test database failed") from made
        return made

    def give_back(self, name: str) -> None:
        """Drop ``name``: on the thread, soon; or at once once the thread has finished."""
        with self._lock:
            if not self._closed:
                self._to_drop.put(name)
                return
        # On a thread of its own: the caller may be running an event loop of its own.
        dropper = threading.Thread(target=asyncio.run, args=(self._drop_alone(name),))
        dropper.start()
        dropper.join(timeout=_TAKE_TIMEOUT_SECONDS)

    async def _drop_alone(self, name: str) -> None:
        admin = await asyncpg.connect(self._admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    def close(self) -> None:
        """Stop making clones, drop every clone made or given back, and wait for the thread."""
        self._stopping.set()
        self._thread.join(timeout=_TAKE_TIMEOUT_SECONDS)

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._work())

    async def _work(self) -> None:
        admins: list[asyncpg.Connection] = []
        try:
            # Clones made two at a time: the disk syncs of two overlap (0.63 s for one clone
            # alone here, 0.77 s for two at once).
            admins = [await asyncpg.connect(self._admin_url) for _ in range(PARALLEL_CLONES)]
            await asyncio.gather(*(self._make(admin) for admin in admins))
        except Exception as exc:
            self._failed = exc
            with contextlib.suppress(queue.Full):
                self._ready.put_nowait(exc)
        finally:
            if admins:
                await self._drop_everything_left(admins[0])
            with self._lock:
                self._closed = True
            if admins:  # given back between the last drop and closing
                await self._drop_given_back(admins[0])
            for admin in admins:
                await admin.close()

    async def _make(self, admin: asyncpg.Connection) -> None:
        # After a failed clone no more are made, but the thread stays until ``close`` to drop
        # the databases the tests running then give back.
        while not self._stopping.is_set():
            await self._drop_given_back(admin)
            if self._failed is not None or (
                    self._ready.qsize() + self._making >= self._ready.maxsize):
                await asyncio.sleep(0.005)
                continue
            self._making += 1
            try:
                made: str | BaseException = await self._clone(admin)
            except Exception as exc:  # handed to the test that asks next
                self._failed = made = exc
            finally:
                self._making -= 1
            self._ready.put_nowait(made)

    async def _clone(self, admin: asyncpg.Connection) -> str:
        name = f"{self._prefix}{uuid.uuid4().hex[:16]}"
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        return name

    async def _drop_given_back(self, admin: asyncpg.Connection) -> None:
        while True:
            try:
                name = self._to_drop.get_nowait()
            except queue.Empty:
                return
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _drop_everything_left(self, admin: asyncpg.Connection) -> None:
        while True:
            try:
                made = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(made, str):
                self._to_drop.put(made)
        await self._drop_given_back(admin)

