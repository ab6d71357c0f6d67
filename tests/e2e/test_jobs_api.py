"""JobService: operators list the workers' jobs and run a dead one again (docs/operations.md,
"Dead jobs"). A campaign execution whose every attempt was interrupted is buried dead by the
sweeper and leaves its campaign unexecuted; RetryJob makes it pending, due now, with
fresh attempts, and the next run executes the campaign. Everything through the real server and
the real outbox functions, on the pinned clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import jobs_pb2 as pb
from promo.v1 import jobs_pb2_grpc as pb_grpc
from storage import outbox
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import promotion, reward_type
from tests.e2e.test_cli import Cli
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers.metrics import OutboxCollector
from workers.outbox import job_lease, run_outbox_job


def stub(api: Api) -> pb_grpc.JobServiceStub:
    return pb_grpc.JobServiceStub(api.channel)


async def list_jobs(api: Api, **kw: Any) -> pb.ListJobsResponse:
    return await stub(api).ListJobs(pb.ListJobsRequest(**kw), metadata=api.key())


async def retry(api: Api, job_id: str, request_id: str = "retry-1") -> pb.RetryJobResponse:
    return await stub(api).RetryJob(pb.RetryJobRequest(request_id=request_id, job_id=job_id),
                                    metadata=api.key())


async def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await call
    return caught.value


async def dead_campaign_execution(api: Api, pool: asyncpg.Pool, settings: Settings,
                                  clock: FixedClock) -> int:
    """A campaign for c1 whose execution job had one attempt, started by a worker that died:
    the sweeper's bury_interrupted_jobs marks it dead once the lease runs out."""
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=1)
    await create_campaign(api, "spring", execute_at, customers=["c1"], conditional=False)
    job_id: int = await pool.fetchval(
        "SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")
    await bury(pool, settings, clock, job_id)
    return job_id


async def bury(pool: asyncpg.Pool, settings: Settings, clock: FixedClock, job_id: int) -> None:
    """Give the job one attempt, start it at its due time as a worker would, let that worker
    die (the lease runs out) and run the sweeper's bury_interrupted_jobs: the job is dead."""
    await pool.execute("UPDATE outbox_jobs SET max_attempts = 1 WHERE id = $1", job_id)
    clock.set(max(clock.now(), await pool.fetchval(
        "SELECT due_at FROM outbox_jobs WHERE id = $1", job_id)))
    async with pool.acquire() as conn:
        assert await outbox.start_attempt(conn, job_id, now=clock.now(),
                                          lease=job_lease(settings)) is not None
        clock.set(clock.now() + job_lease(settings) + timedelta(seconds=1))
        buried = await outbox.bury_interrupted_jobs(conn, now=clock.now())
    assert [b.id for b in buried] == [job_id]


async def campaign_status(api: Api) -> int:
    response = await cpb_grpc.CampaignServiceStub(api.channel).GetCampaign(
        cpb.GetCampaignRequest(campaign_id="spring"), metadata=api.key())
    return response.campaign.status


async def test_a_dead_campaign_execution_runs_again_after_retry_job(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    job_id = await dead_campaign_execution(api, pool, settings, clock)
    assert await campaign_status(api) == cpb.CAMPAIGN_STATUS_SCHEDULED  # never executed

    dead = (await list_jobs(api, status=pb.JOB_STATUS_DEAD)).jobs
    assert [(j.job_id, j.kind, j.attempts, j.max_attempts, j.last_error) for j in dead] == [
        (str(job_id), "campaign.execute", 1, 1, "interrupted 1 times")]
    assert dead[0].payload_json.startswith('{"campaign":') and dead[0].HasField("finish_time")

    answer = await retry(api, str(job_id))
    job = answer.job
    assert (job.status, job.attempts, job.last_error) == (
        pb.JOB_STATUS_PENDING, 0, "interrupted 1 times")
    assert job.due_time.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()
    assert not job.HasField("finish_time")
    # A retry of the call is the first answer and changes nothing; the id for another job is
    # REQUEST_ID_REUSED.
    assert await retry(api, str(job_id)) == answer
    error = await refused(retry(api, "999999"))
    assert rpc_error_reason(error) == "REQUEST_ID_REUSED"

    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await run_outbox_job(ctx, job_id)
    assert await campaign_status(api) == cpb.CAMPAIGN_STATUS_EXECUTED
    done = (await list_jobs(api, kind="campaign.execute")).jobs
    assert [(j.status, j.attempts) for j in done] == [(pb.JOB_STATUS_DONE, 1)]
    # Done is not dead: nothing to retry.
    error = await refused(retry(api, str(job_id), request_id="retry-2"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(error) == "JOB_NOT_DEAD"
    assert error.details() == f"job {job_id} is done, not dead: it has already run to completion"


async def test_the_dead_jobs_gauge_counts_dead_jobs_per_kind(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """promo_outbox_dead_jobs (workers' metrics, read on scrape): one per kind with dead jobs,
    gone once the job is retried."""
    job_id = await dead_campaign_execution(api, pool, settings, clock)
    collector = OutboxCollector(asyncio.get_running_loop(), lambda: pool)

    async def dead_gauge() -> dict[str, float]:
        families = collector.families()
        async with pool.acquire() as conn:
            collector.fill(families, await collector.rows(conn))
        dead = {f.name: f for f in families}["promo_outbox_dead_jobs"]
        return {s.labels["kind"]: s.value for s in dead.samples}

    assert await dead_gauge() == {"campaign.execute": 1.0}
    await retry(api, str(job_id))
    assert await dead_gauge() == {}


async def test_retry_job_refuses_pending_jobs_webhook_deliveries_and_bad_ids(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "spring", clock.now() + timedelta(hours=1),
                          customers=["c1"], conditional=False)
    pending = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")
    error = await refused(retry(api, str(pending)))
    assert (error.code(), rpc_error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                       "JOB_NOT_DEAD")
    assert error.details() == (f"job {pending} is pending, not dead: it will run (or is "
                               "running) on its own")
    webhook = await pool.fetchval(
        """INSERT INTO outbox_jobs (kind, payload, status, finished_at)
           VALUES ('webhook.deliver', '{"delivery_id": 1}', 'dead', now()) RETURNING id""")
    error = await refused(retry(api, str(webhook), request_id="retry-webhook"))
    assert rpc_error_reason(error) == "USE_REDELIVER_EVENT"
    assert "RedeliverEvent" in (error.details() or "")
    error = await refused(retry(api, "424242", request_id="retry-unknown"))
    assert (error.code(), rpc_error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    for n, bad in enumerate(["abc", "-1", "0", "1.5", "١٢", "9" * 20, "9" * 5000]):
        error = await refused(retry(api, bad, request_id=f"bad-{n}"))
        assert (error.code(), rpc_error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                           "INVALID_ID"), bad
    error = await refused(retry(api, "", request_id="empty"))
    assert (rpc_error_reason(error), error.details()) == ("MISSING_FIELD", "job_id is required")
    # Nothing changed: the pending job is still pending, the dead webhook job still dead.
    assert await pool.fetchval("SELECT status FROM outbox_jobs WHERE id = $1", pending) == \
        "pending"
    assert await pool.fetchval("SELECT status FROM outbox_jobs WHERE id = $1", webhook) == "dead"


async def test_list_jobs_pages_newest_first_and_filters(api: Api, pool: asyncpg.Pool) -> None:
    ids = [await pool.fetchval(
        "INSERT INTO outbox_jobs (kind, payload, status) VALUES ($1, '{}', $2) RETURNING id",
        kind, status) for kind, status in [
            ("bonus.batch", "done"), ("bonus.batch", "dead"), ("campaign.notify", "pending"),
            ("bonus.batch", "pending"), ("bonus.batch", "dead")]]
    seen: list[str] = []
    token = ""
    while True:
        page = await list_jobs(api, page_size=2, page_token=token, kind="bonus.batch")
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [str(i) for i in reversed(ids) if i != ids[2]]
    dead = await list_jobs(api, status=pb.JOB_STATUS_DEAD)
    assert [j.job_id for j in dead.jobs] == [str(ids[4]), str(ids[1])]
    # A token belongs to its filters.
    first = await list_jobs(api, page_size=1, kind="bonus.batch")
    error = await refused(list_jobs(api, page_size=1, page_token=first.next_page_token))
    assert rpc_error_reason(error) == "INVALID_PAGE_TOKEN"
    error = await refused(list_jobs(api, status=7))
    assert rpc_error_reason(error) == "INVALID_STATUS"
    error = await refused(list_jobs(api, kind="x" * 65))
    assert rpc_error_reason(error) == "INVALID_KIND"


async def test_only_admins_see_and_retry_jobs(api: Api) -> None:
    for role in ("runtime", "listener"):
        error = await refused(stub(api).ListJobs(pb.ListJobsRequest(),
                                                 metadata=api.key(role)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await refused(stub(api).RetryJob(
            pb.RetryJobRequest(request_id="r", job_id="1"), metadata=api.key(role)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_promo_jobs_list_and_retry(api: Api, pool: asyncpg.Pool, settings: Settings,
                                         clock: FixedClock, tmp_path: Path) -> None:
    """The CLI: `promo jobs list --status dead` shows the job with its error, `promo jobs
    retry` makes it pending, and retrying a job that is not dead is one error line."""
    job_id = await dead_campaign_execution(api, pool, settings, clock)
    cli = Cli(api, tmp_path)
    listed = await cli.json("jobs", "list", "--status", "dead")
    assert [(j["job_id"], j["kind"], j["last_error"]) for j in listed["jobs"]] == [
        (str(job_id), "campaign.execute", "interrupted 1 times")]
    table = await cli.ok("jobs", "list")
    assert "campaign.execute" in table and "dead" in table and "1/1" in table
    retried = await cli.json("jobs", "retry", str(job_id), "--request-id", "cli-retry")
    assert (retried["job"]["status"], retried["job"]["attempts"]) == ("JOB_STATUS_PENDING", 0)
    assert await cli.error("jobs", "retry", str(job_id)) == (
        f"error: FAILED_PRECONDITION: job {job_id} is pending, not dead: it will run (or is "
        "running) on its own (JOB_NOT_DEAD)")
    assert (await cli.json("jobs", "list", "--status", "dead"))["jobs"] == []


async def test_a_dead_bonus_batch_computes_its_window_after_retry_job(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A bonus batch whose every attempt was interrupted leaves its window's request PENDING
    (the sweeper re-arms only finished batches); after RetryJob the next run computes it."""
    from tests.e2e.test_bonuses_api import create, customers, definition, request, results

    await customers(api, ("c1", "EUR", "UTC"))
    await create(api, definition("deposits", "sum(deposit.amount) * 10%"))
    await request(api, "deposits", ["c1"], "req-1")
    job_id: int = await pool.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch'")
    await bury(pool, settings, clock, job_id)
    assert await pool.fetchval("SELECT status FROM bonus_requests") == "PENDING"

    await retry(api, str(job_id), request_id="retry-batch")
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    assert await run_outbox_job(ctx, job_id) == "done"
    assert await pool.fetchval("SELECT status FROM bonus_requests") == "DONE"
    [result] = await results(api)
    assert result.customer_id == "c1"
