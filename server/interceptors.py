"""One server interceptor for what every RPC needs: a request id, authentication and roles,
admission control (server/admission.py), one log line per call, and the mapping of domain
errors to statuses.

It wraps the method handler (rather than the servicer) so that errors raised anywhere in a
handler, including before it yields its first streamed message, get the same treatment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from core.errors import DomainError, InvalidArgument
from server.admission import Admission
from server.auth import ANONYMOUS, Authenticator, Principal, current_principal
from server.errors import (
    DATABASE_TIMEOUT_MESSAGE,
    DATABASE_UNAVAILABLE_MESSAGE,
    INTERNAL_MESSAGE,
    database_timed_out,
    database_unreachable,
    domain_status,
    stored_text_error,
    to_status,
)
from server.logs import call_context

log = logging.getLogger("promo.rpc")

DEFAULT_MAX_CALLS_IN_FLIGHT = 500  # Settings.max_calls_in_flight's default

Behavior = Callable[..., Any]


class CallObserver:
    """Hook for metrics; the default does nothing."""

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        return None


def _request_id(metadata: tuple[tuple[str, Any], ...]) -> str:
    for name, value in metadata:
        if name == "x-request-id":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if 0 < len(text) <= 200:
                return text
    return uuid.uuid4().hex


class ServiceInterceptor(aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator,
                 observer: CallObserver | None = None,
                 admission: Admission | None = None) -> None:
        self._auth = authenticator
        self._observer = observer or CallObserver()
        self._admission = admission or Admission(DEFAULT_MAX_CALLS_IN_FLIGHT)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if self._auth.is_public(method):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        return _wrap(handler, method, metadata, self)

    async def _begin(self, method: str, metadata: tuple[tuple[str, Any], ...],
                     request_id: str,
                     context: aio.ServicerContext) -> tuple[Principal, dict[str, str]]:
        ctx = {"request_id": request_id, "method": method, "principal": ANONYMOUS.name}
        call_context.set(ctx)
        context.set_trailing_metadata((("x-request-id", request_id),))
        principal = self._auth.authenticate(self._auth.presented_key(metadata))
        ctx["principal"] = principal.name
        self._auth.authorize(principal, method)
        self._admission.admit()  # last: a call that returns from here holds a place
        return principal, ctx

    async def _fail(self, exc: BaseException, method: str, request_id: str,
                    context: aio.ServicerContext, started: float,
                    request: object = None) -> None:
        """Log the failure and end the call with its status. The status's trailers
        (grpc-status-details-bin, the google.rpc details) replace the call's trailers, so the
        x-request-id is added to them: a failed call is the one an operator looks up. A NUL
        character the database refused is the request's bad input (server.errors)."""
        exc = stored_text_error(exc, request) or exc
        if isinstance(exc, DomainError):
            status = domain_status(exc)
            log.info("rpc failed", extra={"code": status.code.name, "reason": exc.reason,
                                          "ms": _ms(started)})
        elif database_unreachable(exc):
            status = to_status(grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE,
                               "DATABASE_UNAVAILABLE")
            log.error("rpc failed: database unreachable", extra={
                "code": "UNAVAILABLE", "reason": "DATABASE_UNAVAILABLE", "ms": _ms(started),
                "error": f"{type(exc).__name__}: {exc}"})
        elif database_timed_out(exc):
            status = to_status(grpc.StatusCode.UNAVAILABLE, DATABASE_TIMEOUT_MESSAGE,
                               "DATABASE_TIMEOUT")
            log.error("rpc failed: database timed out", extra={
                "code": "UNAVAILABLE", "reason": "DATABASE_TIMEOUT", "ms": _ms(started),
                "error": type(exc).__name__})
        else:
            status = to_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, "INTERNAL")
            log.error("rpc crashed", exc_info=exc, extra={"code": "INTERNAL", "reason": "INTERNAL",
                                                          "ms": _ms(started)})
        self._observer.observe(method, status.code, time.perf_counter() - started)
        await context.abort(status.code, status.details,
                            trailing_metadata=(*status.trailing_metadata,
                                               ("x-request-id", request_id)))

    def _cancelled(self, method: str, context: aio.ServicerContext, started: float) -> None:
        """A call the client gave up on (its deadline ran out, or it cancelled) still gets its
        one line and its metric: the handler was stopped where it was, and what it had not
        committed is rolled back."""
        try:
            remaining = context.time_remaining()
        except Exception:  # the call is already gone
            remaining = None
        code = (grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= DEADLINE_MARGIN_SECONDS
                else grpc.StatusCode.CANCELLED)
        log.info("rpc cancelled", extra={"code": code.name, "ms": _ms(started)})
        self._observer.observe(method, code, time.perf_counter() - started)

    def _done(self, method: str, context: aio.ServicerContext, started: float) -> None:
        code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.OK
        log.info("rpc", extra={"code": code.name, "ms": _ms(started)})
        self._observer.observe(method, code, time.perf_counter() - started)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


# A call that ends this close to its deadline ended because of it: the client's copy of the
# deadline fires a little before the server's, so the server may still see some time left.
DEADLINE_MARGIN_SECONDS = 0.1


def _decoder(deserializer: Callable[[bytes], Any] | None,
             method: str) -> Callable[[bytes], Any]:
    """Requests are decoded here, after authentication, not by gRPC before the handler: a
    request that is not the method's message (a client built from another proto version, or
    garbage) is then INVALID_ARGUMENT with its one log line and metric, instead of a bare
    UNKNOWN that no metric counted."""
    def decode(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, whatever the wire format broke
            name = method.rsplit("/", 1)[-1]
            raise InvalidArgument(
                f"the request is not a valid {name} request message ({exc}); check that the "
                "client uses this server's protos", reason="INVALID_REQUEST",
                metadata={"method": method}) from exc
    return decode


async def _decoded(request_iterator: Any, decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for raw in request_iterator:
        yield decode(raw)


def _wrap(handler: grpc.RpcMethodHandler, method: str, metadata: tuple[tuple[str, Any], ...],
          icpt: ServiceInterceptor) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        decode_uu = _decoder(handler.request_deserializer, method)

        async def unary_unary(raw: bytes, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id = _request_id(metadata)  # known before authentication, for every reply
            request = None
            admitted = False
            try:
                principal, _ = await icpt._begin(method, metadata, request_id, context)
                admitted = True
                current_principal.set(principal)
                request = decode_uu(raw)
                response = await inner_uu(request, context)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                icpt._cancelled(method, context, started)
                raise
            except Exception as exc:
                await icpt._fail(exc, method, request_id, context, started, request)
                raise AssertionError("unreachable") from exc
            finally:
                if admitted:
                    icpt._admission.release()
            icpt._done(method, context, started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, response_serializer=handler.response_serializer)

    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        decode_us = _decoder(handler.request_deserializer, method)

        async def unary_stream(raw: bytes, context: aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id = _request_id(metadata)  # known before authentication, for every reply
            request = None
            admitted = False
            try:
                principal, _ = await icpt._begin(method, metadata, request_id, context)
                admitted = True
                current_principal.set(principal)
                request = decode_us(raw)
                async for item in inner_us(request, context):
                    yield item
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                icpt._cancelled(method, context, started)
                raise
            except Exception as exc:
                await icpt._fail(exc, method, request_id, context, started, request)
            finally:
                if admitted:
                    icpt._admission.release()
            icpt._done(method, context, started)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, response_serializer=handler.response_serializer)

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary
        decode_su = _decoder(handler.request_deserializer, method)

        async def stream_unary(request_iterator: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id = _request_id(metadata)  # known before authentication, for every reply
            admitted = False
            try:
                principal, _ = await icpt._begin(method, metadata, request_id, context)
                admitted = True
                current_principal.set(principal)
                response = await inner_su(_decoded(request_iterator, decode_su), context)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                icpt._cancelled(method, context, started)
                raise
            except Exception as exc:
                await icpt._fail(exc, method, request_id, context, started)
                raise AssertionError("unreachable") from exc
            finally:
                if admitted:
                    icpt._admission.release()
            icpt._done(method, context, started)
            return response

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, response_serializer=handler.response_serializer)

    inner_ss = handler.stream_stream
    decode_ss = _decoder(handler.request_deserializer, method)

    async def stream_stream(request_iterator: Any,
                            context: aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        request_id = _request_id(metadata)  # known before authentication, for every reply
        admitted = False
        try:
            principal, _ = await icpt._begin(method, metadata, request_id, context)
            admitted = True
            current_principal.set(principal)
            async for item in inner_ss(_decoded(request_iterator, decode_ss), context):
                yield item
        except aio.AbortError:
            raise
        except asyncio.CancelledError:
            icpt._cancelled(method, context, started)
            raise
        except Exception as exc:
            await icpt._fail(exc, method, request_id, context, started)
        finally:
            if admitted:
                icpt._admission.release()
        icpt._done(method, context, started)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, response_serializer=handler.response_serializer)
