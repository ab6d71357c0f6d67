"""`promo jobs`: the workers' background jobs, and running a dead one again (JobService)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    pages,
    print_json,
    request_id,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import show_message, show_rows
from promo.v1 import jobs_pb2 as pb
from promo.v1 import jobs_pb2_grpc as pb_grpc

app = typer.Typer(help="Background jobs: list them, run a dead one again.",
                  no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.JobServiceStub
STATUS = "JOB_STATUS_"


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="pending, done or dead.")] = None,
    kind: Annotated[str, typer.Option(
        help="campaign.notify, campaign.execute, bonus.batch or webhook.deliver.")] = "",
    page_size: PageSizeOpt = 0,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Jobs, newest first (`--status dead` for the ones that need a look)."""
    request = pb.ListJobsRequest(
        page_size=page_size, page_token=page_token, kind=kind,
        status=enum_value(pb.JobStatus, STATUS, status, "--status") if status else 0)  # type: ignore[arg-type]
    items: list[pb.Job] = []
    token = ""
    for page in pages(ctx, STUB, "ListJobs", request, follow=all_pages):
        items.extend(page.jobs)
        token = page.next_page_token
    if as_json:
        print_json({"jobs": [to_dict(j) for j in items], "next_page_token": token})
        return
    show_rows("Jobs", ["id", "kind", "status", "attempts", "due", "payload", "last error"],
              ([j.job_id, j.kind, enum_name(pb.JobStatus, STATUS, j.status).lower(),
                f"{j.attempts}/{j.max_attempts}", j.due_time.ToJsonString(), j.payload_json,
                j.last_error] for j in items), token)


@app.command()
def retry(ctx: typer.Context, job_id: str, request: RequestIdOpt = None,
          as_json: JsonOpt = False) -> None:
    """Run a dead job again (pending, due now, its attempts starting over)."""
    response = call(ctx, STUB, "RetryJob", pb.RetryJobRequest(
        request_id=request_id(request), job_id=job_id))
    if as_json:
        print_json(response)
    else:
        show_message(response.job, title=f"job {job_id}")
