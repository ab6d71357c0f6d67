"""`promo reward-types`: the catalogue of reward types (RewardTypeService)."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf import field_mask_pb2

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    fail,
    pages,
    print_json,
    request_id,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import show_message, show_rows
from promo.v1 import reward_types_pb2 as pb
from promo.v1 import reward_types_pb2_grpc as pb_grpc

app = typer.Typer(help="Reward types: what a reward is (cashback, free spins...) and its limits.",
                  no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.RewardTypeServiceStub
CATEGORY = "REWARD_CATEGORY_"



def _show(reward_type: pb.RewardType, as_json: bool) -> None:
    if as_json:
        print_json(reward_type)
    else:
        show_message(reward_type, title=f"reward type {reward_type.name}")


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique name, e.g. cashback.")],
    display_name: Annotated[str, typer.Option(help="Name shown to people.")],
    category: Annotated[str, typer.Option(help="amount or units.")] = "amount",
    description: Annotated[str, typer.Option()] = "",
    image_url: Annotated[str, typer.Option()] = "",
    min_value: Annotated[str, typer.Option("--min", help="Smallest value of one grant.")] = "",
    max_value: Annotated[str, typer.Option("--max", help="Largest value of one grant.")] = "",
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a reward type."""
    reward_type = pb.RewardType(
        name=name, display_name=display_name, description=description, image_url=image_url,
        category=enum_value(pb.RewardCategory, CATEGORY, category, "--category"),  # type: ignore[arg-type]
        min_value=min_value, max_value=max_value)
    response = call(ctx, STUB, "CreateRewardType", pb.CreateRewardTypeRequest(
        request_id=request_id(request), reward_type=reward_type))
    _show(response.reward_type, as_json)


@app.command()
def get(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Show one reward type."""
    response = call(ctx, STUB, "GetRewardType", pb.GetRewardTypeRequest(name=name))
    _show(response.reward_type, as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List reward types by name."""
    request = pb.ListRewardTypesRequest(page_size=page_size, page_token=page_token)
    items: list[pb.RewardType] = []
    token = ""
    for page in pages(ctx, STUB, "ListRewardTypes", request, follow=all_pages):
        items.extend(page.reward_types)
        token = page.next_page_token
    if as_json:
        print_json({"reward_types": [to_dict(r) for r in items], "next_page_token": token})
        return
    show_rows("Reward types", ["name", "display name", "category", "min", "max"],
              ([r.name, r.display_name, enum_name(pb.RewardCategory, CATEGORY, r.category),
                r.min_value, r.max_value] for r in items), token)


@app.command()
def update(
    ctx: typer.Context,
    name: str,
    display_name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    image_url: Annotated[str | None, typer.Option()] = None,
    min_value: Annotated[str | None, typer.Option("--min", help="'' clears it.")] = None,
    max_value: Annotated[str | None, typer.Option("--max", help="'' clears it.")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the given fields of a reward type (only those you pass)."""
    changes = {"display_name": display_name, "description": description,
               "image_url": image_url, "min_value": min_value, "max_value": max_value}
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        fail("name at least one field to change (--display-name, --description, ...)")
    reward_type = pb.RewardType(name=name, **given)
    response = call(ctx, STUB, "UpdateRewardType", pb.UpdateRewardTypeRequest(
        request_id=request_id(request), reward_type=reward_type,
        update_mask=field_mask_pb2.FieldMask(paths=sorted(given))))
    _show(response.reward_type, as_json)
