"""CodePoolService: uploads of personalized promo codes and the pools' inventory.

An upload streams in (chunks of at most 1 MB, at most 10 MB in all, refused as soon as it
grows past that), is checked whole in memory (core.codes), and is then added in one
transaction: one COPY, the counter, the thresholds. A rejected file adds nothing. The upload is
idempotent on its request id and the file's bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from grpc import aio

from core.codes import MAX_UPLOAD_BYTES, CodeType, parse_code_file, too_large
from core.errors import FailedPrecondition, InvalidArgument
from core.text import nul_problem
from promo.v1 import codes_pb2 as pb
from promo.v1 import codes_pb2_grpc as pb_grpc
from server.auth import current_principal
from server.convert import required_id, timestamp
from server.deps import Dependencies
from server.grant_batcher import DEADLOCK_ATTEMPTS
from server.promotion_convert import inventory_to_pb
from storage import code_pools
from storage import promotions as promotions_repo
from storage.idempotency import run_once, validate_request_id
from storage.promotions import StoredPromotion
from storage.queue import queue_after_commit

log = logging.getLogger("promo.codes")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CodePoolService"].full_name
ROLES = {f"/{SERVICE_NAME}/{m.name}": {"admin"}
         for m in pb.DESCRIPTOR.services_by_name["CodePoolService"].methods}
MAX_CHUNK_BYTES = 1024 * 1024
# Files up to this size are parsed on the event loop (a thread hop costs more than they do).
PARSE_INLINE_BYTES = 256 * 1024


async def _read_upload(requests: AsyncIterator[pb.UploadCodesRequest]
                       ) -> tuple[str, str, bytes]:
    """(promotion code, request id, the file's bytes) from the stream, refusing a file over
    the limit as soon as it passes it."""
    promotion_code = request_id = ""
    parts: list[bytes] = []
    size = 0
    first = True
    async for message in requests:
        if first:
            promotion_code, request_id = message.promotion_code, message.request_id
            first = False
        elif (message.promotion_code not in ("", promotion_code)
              or message.request_id not in ("", request_id)):
            raise InvalidArgument(
                "promotion_code and request_id go in the first message only (later "
                "messages may repeat them unchanged)", reason="INVALID_UPLOAD_STREAM",
                metadata={"field": "promotion_code"})
        if len(message.data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"each message carries at most {MAX_CHUNK_BYTES:,} bytes of "
                                  "data", reason="UPLOAD_CHUNK_TOO_LARGE",
                                  metadata={"field": "data"})
        size += len(message.data)
        if size > MAX_UPLOAD_BYTES:
            raise too_large(size)
        parts.append(message.data)
    if first:
        raise InvalidArgument("the upload stream was empty: send the promotion_code, "
                              "request_id and the file's data", reason="EMPTY_UPLOAD",
                              metadata={"field": "data"})
    if not promotion_code:
        raise InvalidArgument("promotion_code is required in the first message",
                              reason="INVALID_ID", metadata={"field": "promotion_code"})
    # A stream has no single request for the interceptor's NUL safety net to inspect.
    if (problem := nul_problem(promotion_code, "promotion_code")) is not None:
        raise InvalidArgument(problem, reason="INVALID_TEXT", metadata={"field": "promotion_code"})
    validate_request_id(request_id)
    return promotion_code, request_id, b"".join(parts)


def _personalized(stored: StoredPromotion) -> None:
    if stored.promotion.code_type is not CodeType.PERSONALIZED:
        raise FailedPrecondition(
            f"promotion {stored.promotion.code} hands out its promotion code; set code_type "
            "CODE_TYPE_PERSONALIZED (in DRAFT or DEACTIVATED) before uploading codes",
            reason="NOT_PERSONALIZED", metadata={"promotion_code": stored.promotion.code,
                                                 "status": stored.promotion.status.value})


class CodePoolServicer(pb_grpc.CodePoolServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    async def UploadCodes(self, request_iterator: AsyncIterator[pb.UploadCodesRequest],
                          context: aio.ServicerContext) -> pb.UploadCodesResponse:
        promotion_code, request_id, data = await _read_upload(request_iterator)
        # A 10 MiB file is seconds of parsing: on a thread, so other calls are not held up.
        codes = (parse_code_file(data) if len(data) < PARSE_INLINE_BYTES
                 else await asyncio.to_thread(parse_code_file, data))
        now = self._deps.clock.now()
        digest = hashlib.sha256(promotion_code.encode() + b"\0" + data).digest()
        queued: list[int] = []

        uploaded: list[dict[str, object]] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            # Run again after a deadlock (grants racing the pool's alert check): only what the
            # committed run did counts.
            queued.clear()
            uploaded.clear()
            # FOR SHARE: an UpdatePromotion setting the fallback code to one of these codes
            # waits for this upload and then sees them (and refuses), or goes first and this
            # upload reads its new fallback code (and refuses the file).
            stored = await promotions_repo.get(conn, promotion_code, for_share=True)
            _personalized(stored)
            await code_pools.sync_pool(conn, stored.id, stored.promotion, now)
            upload_id, raised = await code_pools.add_codes(
                conn, stored.id, codes, size=len(data), now=now,
                fallback_code=stored.promotion.fallback_code)
            if raised:
                queued.extend(await code_pools.dispatch_alerts(conn, now))
            inventory = await code_pools.inventory(conn, stored.id)
            assert inventory is not None
            uploaded.append({"promotion_code": promotion_code, "upload_id": upload_id,
                             "codes": len(codes.codes), "bytes": len(data),
                             "available": inventory.available})
            return pb.UploadCodesResponse(
                upload_id=str(upload_id), codes_added=len(codes.codes),
                inventory=inventory_to_pb(inventory)).SerializeToString()

        raw = await run_once(self._deps.pool, scope="UploadCodes",
                             caller=current_principal.get().name, request_id=request_id,
                             request_hash=digest, work=work, deadlock_attempts=DEADLOCK_ATTEMPTS)
        for fields in uploaded:  # empty for a replayed request
            log.info("codes uploaded", extra=fields)
        for job_id in queued:
            await queue_after_commit(self._deps.redis, job_id=job_id, due_at=now,
                                     queue_name=self._deps.queue_name)
        return pb.UploadCodesResponse.FromString(raw)

    async def GetCodeInventory(self, request: pb.GetCodeInventoryRequest,
                               context: aio.ServicerContext) -> pb.GetCodeInventoryResponse:
        required_id(request.promotion_code, "promotion_code")
        async with self._deps.pool.acquire() as conn:
            stored = await promotions_repo.get(conn, request.promotion_code)
            _personalized(stored)
            inventory = await code_pools.inventory(conn, stored.id)
            uploads = await code_pools.uploads(conn, stored.id)
        response = pb.GetCodeInventoryResponse()
        if inventory is not None:
            response.inventory.CopyFrom(inventory_to_pb(inventory))
            response.fallback_active = (inventory.available == 0
                                        and bool(stored.promotion.fallback_code))
        for upload in uploads:
            response.uploads.add(upload_id=str(upload.upload_id), codes=upload.codes,
                                 bytes=upload.bytes, uploaded_at=timestamp(upload.uploaded_at))
        return response


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_CodePoolServiceServicer_to_server(
        CodePoolServicer(deps), server)
