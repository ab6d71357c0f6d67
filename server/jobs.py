"""JobService: the outbox's jobs for operators, and RetryJob for a dead one (storage.jobs)."""

from __future__ import annotations

import json
import logging

import asyncpg
from grpc import aio

from core.errors import InvalidArgument
from core.pagination import effective_page_size
from promo.v1 import jobs_pb2 as pb
from promo.v1 import jobs_pb2_grpc as pb_grpc
from server.convert import required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.page_tokens import decode_page_token, encode_page_token
from storage import jobs as repo
from storage.queue import queue_after_commit

log = logging.getLogger("promo.jobs")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
ROLES = {f"/{SERVICE_NAME}/{m}": {"admin"} for m in ("ListJobs", "RetryJob")}

_STATUS_TO_PB = {"pending": pb.JOB_STATUS_PENDING, "done": pb.JOB_STATUS_DONE,
                 "dead": pb.JOB_STATUS_DEAD}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_MAX_KIND_LENGTH = 64
_MAX_JOB_ID = 2**63 - 1


def job_to_pb(row: repo.JobRow) -> pb.Job:
    return pb.Job(
        job_id=str(row.id), kind=row.kind, status=_STATUS_TO_PB[row.status],
        payload_json=json.dumps(row.payload, sort_keys=True, separators=(",", ":")),
        attempts=row.attempts, max_attempts=row.max_attempts, due_time=timestamp(row.due_at),
        create_time=timestamp(row.created_at), finish_time=timestamp(row.finished_at),
        last_error=row.last_error or "")


def _job_id(value: str) -> int:
    required_id(value, "job_id")
    if (not value.isascii() or not value.isdigit() or len(value) > 19
            or not 0 < int(value) <= _MAX_JOB_ID):
        raise InvalidArgument(f"job_id must be a positive integer, got {value[:40]!r}",
                              reason="INVALID_ID", metadata={"field": "job_id"})
    return int(value)


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    async def ListJobs(self, request: pb.ListJobsRequest,
                       context: aio.ServicerContext) -> pb.ListJobsResponse:
        size = effective_page_size(request.page_size)
        if request.status and request.status not in _STATUS_FROM_PB:
            raise InvalidArgument(f"status {request.status} is not a job status",
                                  reason="INVALID_STATUS", metadata={"field": "status"})
        if len(request.kind) > _MAX_KIND_LENGTH or "\x00" in request.kind:
            raise InvalidArgument(f"kind is at most {_MAX_KIND_LENGTH} characters, without NUL",
                                  reason="INVALID_KIND", metadata={"field": "kind"})
        status = _STATUS_FROM_PB.get(request.status)
        kind = request.kind or None
        filters = {"status": status, "kind": kind}
        cursor = decode_page_token(request.page_token, filters, key=(int,))
        async with self._deps.pool.acquire() as conn:
            rows = await repo.list_jobs(conn, status=status, kind=kind,
                                        before_id=int(cursor.after[0]) if cursor else None,
                                        limit=size + 1)
        page, more = rows[:size], len(rows) > size
        return pb.ListJobsResponse(
            jobs=[job_to_pb(r) for r in page],
            next_page_token=encode_page_token([page[-1].id], filters) if more else "")

    async def RetryJob(self, request: pb.RetryJobRequest,
                       context: aio.ServicerContext) -> pb.RetryJobResponse:
        job_id = _job_id(request.job_id)
        now = self._deps.clock.now()
        queued: list[int] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.retry_dead_job(conn, job_id, now=now)
            queued.append(row.id)
            log.info("dead job retried", extra={"outbox_job_id": row.id, "kind": row.kind,
                                                "last_error": row.last_error})
            return pb.RetryJobResponse(job=job_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._deps.pool, "RetryJob", request, work)
        for queued_id in queued:  # empty on a replayed request: queued the first time
            await queue_after_commit(self._deps.redis, job_id=queued_id, due_at=now,
                                     queue_name=self._deps.queue_name)
        return pb.RetryJobResponse.FromString(raw)


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(deps), server)
