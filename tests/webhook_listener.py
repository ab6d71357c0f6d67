"""A real webhook listener for tests: HTTP/1.1 on 127.0.0.1, verifying every signature with
the documented helper (core.webhook_signature), de-duplicating by event id as a real listener
must, and answering from a script of statuses."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.webhook_signature import HEADER_EVENT_ID, SignatureError, verify

SECRET = "listener-secret-0123456789abcdef"

# A script step: an HTTP status, "hang" (wait for ``release``, then 200), or (seconds, status).
Step = int | str | tuple[float, int]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verify_error: SignatureError | None
    duplicate: bool

    @property
    def event_id(self) -> str:
        return self.headers[HEADER_EVENT_ID.lower()]


@dataclass
class WebhookListener:
    """A real HTTP/1.1 server on 127.0.0.1 that verifies signatures with the documented helper,
    de-duplicates by event id (as a real listener must), and answers from a script."""

    secrets: list[str] = field(default_factory=lambda: [SECRET])
    script: deque[Step] = field(default_factory=deque)
    default: int = 200
    # If set: the answer to the first request of each event id (repeats follow the script).
    first_answer: int | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0  # TCP connections accepted (keep-alive reuse shows as fewer)
    processed: dict[str, bytes] = field(default_factory=dict)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    # The listener's clock for the timestamp check (tests with a pinned clock pass theirs).
    now: Callable[[], int] = field(default=lambda: int(time.time()))
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/promo"

    def answer(self, *steps: Step) -> None:
        self.script.extend(steps)

    async def start(self, port: int | None = None) -> WebhookListener:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1",
                                                  port if port is not None else self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def close_idle_connections(self) -> None:
        """Close every open connection, as a server does with idle keep-alive connections."""
        for writer in list(self._writers):
            writer.close()
        await asyncio.sleep(0.05)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        request_line = await reader.readline()
        if not request_line:
            return False
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        error: SignatureError | None = None
        try:
            verify(self.secrets, headers, body, now=self.now())
        except SignatureError as exc:
            error = exc
        event_id = headers.get(HEADER_EVENT_ID.lower(), "")
        duplicate = event_id in self.processed
        first = not any(r.event_id == event_id for r in self.received if HEADER_EVENT_ID.lower()
                        in r.headers)
        if error is None and not duplicate:
            self.processed[event_id] = body  # "process" it once, whatever happens next
        self.received.append(Received(headers, body, error, duplicate))
        step: Step
        if first and self.first_answer is not None:
            step = self.first_answer
        else:
            step = self.script.popleft() if self.script else self.default
        if step == "hang":
            self.hung.set()
            await self.release.wait()
            status = 200
        elif isinstance(step, tuple):
            await asyncio.sleep(step[0])
            status = step[1]
        else:
            assert isinstance(step, int)
            status = step
        if error is not None:
            status = 401
        text = b"ok" if status < 300 else f"listener says {status}".encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(text)}\r\n\r\n".encode() + text)
        await writer.drain()
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
