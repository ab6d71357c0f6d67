"""`promo promotions`: the lobby, lifecycle, GetReward and revoke by hand, reconciliation.

(PromotionService and RewardService.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    fail,
    int32,
    load_json_file,
    pages,
    parse_message,
    parse_pairs,
    print_json,
    request_id,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import console, show_message, show_rows, stack, usage_bar
from promo.v1 import promotions_pb2 as pb
from promo.v1 import promotions_pb2_grpc as pb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc

app = typer.Typer(help="Promotions: create, the lobby, activate/deactivate, rewards by hand, "
                       "reconciliation.", no_args_is_help=True, callback=connection_callback)
STUB = pb_grpc.PromotionServiceStub
REWARD_STUB = rpb_grpc.RewardServiceStub
CUSTOMERS_SCOPE = "#customers"


def _cap(text: str) -> pb.BudgetCap:
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        fail(f"--cap takes REWARD_TYPE:PERIOD:LIMIT (e.g. cashback:daily:1000), got {text!r}")
    return pb.BudgetCap(reward_type=parts[0], limit=parts[2], period=enum_value(  # type: ignore[arg-type]
        pb.CapPeriod, "CAP_PERIOD_", parts[1], "--cap period"))


def _from_flags(code: str | None, name: str | None, description: str, time_zone: str,
                rewards: list[str] | None, external: list[str] | None, caps: list[str] | None,
                customer_cap: int, properties: list[str] | None) -> pb.Promotion:
    if not code:
        fail("give --code (and --reward), or --file with the promotion as JSON")
    promotion = pb.Promotion(promotion_code=code, name=name or code, description=description,
                             time_zone=time_zone, customer_cap=customer_cap,
                             properties=parse_pairs(properties, "--property"))
    for reward_type, value in parse_pairs(rewards, "--reward").items():
        promotion.rewards.add(reward_type=reward_type, kind=pb.REWARD_KIND_SINGLE, value=value)
    for reward_type in external or []:
        promotion.rewards.add(reward_type=reward_type, kind=pb.REWARD_KIND_EXTERNAL)
    promotion.budget_caps.extend(_cap(c) for c in caps or [])
    return promotion


def _show(promotion: pb.Promotion, as_json: bool) -> None:
    """A promotion as JSON, or its fields and then its caps as bars."""
    if as_json:
        print_json(promotion)
        return
    show_message(promotion, title=f"promotion {promotion.promotion_code}", skip=("cap_usage",))
    bars = _caps(promotion)
    if bars:
        out = console()
        out.print("caps used:")
        for bar in bars:
            out.print(bar, width=min(out.width, 60))


def _kinds(promotion: pb.Promotion) -> str:
    kinds = [enum_name(pb.RewardKind, "REWARD_KIND_", r.kind).lower() for r in promotion.rewards]
    return ", ".join(dict.fromkeys(kinds))


def _caps(promotion: pb.Promotion) -> list[object]:
    bars: list[object] = []
    for usage in promotion.cap_usage:
        if usage.scope == CUSTOMERS_SCOPE:
            label = "customers"
        else:
            period = enum_name(pb.CapPeriod, "CAP_PERIOD_", usage.period).lower()
            label = f"{usage.scope} {period}"
        bars.append(usage_bar(label, usage.used, usage.limit, usage.reached))
    return bars


def _codes(promotion: pb.Promotion) -> object:
    """The lobby's code column: the promotion code, or the pool as "used/total" over a bar."""
    if promotion.code_type != pb.CODE_TYPE_PERSONALIZED:
        return "promotion code"
    inventory = promotion.code_inventory
    bar = usage_bar("personalized", str(inventory.used), str(inventory.total),
                    inventory.total > 0 and inventory.available == 0)
    notes = [f"{inventory.available:,} available"]
    if promotion.fallback_active:
        notes.append("default code on")
    return stack([bar, ", ".join(notes)])


def _code_alert(text: str) -> pb.CodeAlertThreshold:
    if text.endswith("%"):
        return pb.CodeAlertThreshold(remaining_percent=text[:-1])
    if not text.isascii() or not text.isdigit():  # "²" is a digit to str.isdigit()
        fail(f"--code-alert takes a number of codes (500) or a percentage (10%), got {text!r}")
    return pb.CodeAlertThreshold(remaining_codes=int32(int(text), "--code-alert"))


@app.command()
def create(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="The promotion as proto JSON (any reward kind: tiers, formulas...).")] = None,
    code: Annotated[str | None, typer.Option(help="Promotion code, e.g. VIP25.")] = None,
    name: Annotated[str | None, typer.Option(help="Name (default: the code).")] = None,
    description: Annotated[str, typer.Option()] = "",
    time_zone: Annotated[str, typer.Option(help="IANA zone of the cap periods.")] = "UTC",
    reward: Annotated[list[str] | None, typer.Option(
        "--reward", help="A SINGLE reward TYPE=VALUE (repeat for several).")] = None,
    external_reward: Annotated[list[str] | None, typer.Option(
        "--external-reward", help="An EXTERNAL reward TYPE (value given at GetReward).")] = None,
    cap: Annotated[list[str] | None, typer.Option(
        "--cap", help="Budget cap TYPE:PERIOD:LIMIT, PERIOD daily|weekly|monthly|lifetime.")]
        = None,
    customer_cap: Annotated[int, typer.Option(min=0, help="Most customers (0: no cap).")] = 0,
    prop: Annotated[list[str] | None, typer.Option(
        "--property", help="KEY=VALUE returned with every grant.")] = None,
    personalized: Annotated[bool, typer.Option(
        help="Hand out unique codes from a pool (`promo codes upload`).")] = False,
    fallback_code: Annotated[str, typer.Option(
        help="PERSONALIZED: the code handed out once the pool is empty.")] = "",
    code_alert: Annotated[list[str] | None, typer.Option(
        "--code-alert", help="PERSONALIZED: alert at N remaining codes or at P% (repeat).")]
        = None,
    activate: Annotated[bool, typer.Option(help="Activate at once (else a draft).")] = False,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a promotion from flags (SINGLE/EXTERNAL rewards) or from a JSON file."""
    if file is not None:
        if any((code, name, description, reward, external_reward, cap, customer_cap, prop,
                personalized, fallback_code, code_alert)):
            fail("give either --file or the promotion's flags, not both")
        promotion = parse_message(load_json_file(file), pb.Promotion(), str(file))
    else:
        promotion = _from_flags(code, name, description, time_zone, reward, external_reward, cap,
                                customer_cap, prop)
        if personalized:
            promotion.code_type = pb.CODE_TYPE_PERSONALIZED
        promotion.fallback_code = fallback_code
        promotion.code_alerts.extend(_code_alert(a) for a in code_alert or [])
    response = call(ctx, STUB, "CreatePromotion", pb.CreatePromotionRequest(
        request_id=request_id(request), promotion=promotion, activate=activate))
    _show(response.promotion, as_json)


@app.command()
def get(ctx: typer.Context, code: str, as_json: JsonOpt = False) -> None:
    """Show a promotion with its live cap usage."""
    promotion = call(ctx, STUB, "GetPromotion",
                     pb.GetPromotionRequest(promotion_code=code)).promotion
    _show(promotion, as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    search: Annotated[str, typer.Option(help="Code or name contains this.")] = "",
    status: Annotated[list[str] | None, typer.Option(
        "--status", help="draft, active or deactivated (repeat for several).")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="single, tiered, external or calculated (repeat for several).")] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The lobby: every promotion with its status, reward kinds, availability and caps used."""
    request = pb.ListPromotionsRequest(
        page_size=page_size, page_token=page_token, search=search,
        statuses=[enum_value(pb.PromotionStatus, "PROMOTION_STATUS_", s, "--status")
                  for s in status or []],
        reward_kinds=[enum_value(pb.RewardKind, "REWARD_KIND_", k, "--kind")
                      for k in kind or []])
    items: list[pb.Promotion] = []
    token = ""
    for page in pages(ctx, STUB, "ListPromotions", request, follow=all_pages):
        items.extend(page.promotions)
        token = page.next_page_token
    if as_json:
        print_json({"promotions": [to_dict(p) for p in items], "next_page_token": token})
        return
    show_rows("Promotions", ["code", "name", "status", "rewards", "promo codes", "availability",
                             "caps used"],
              ([p.promotion_code, p.name,
                enum_name(pb.PromotionStatus, "PROMOTION_STATUS_", p.status).lower(),
                _kinds(p), _codes(p),
                enum_name(pb.Availability, "AVAILABILITY_", p.availability).lower(),
                stack(_caps(p))] for p in items), token)


@app.command()
def activate(ctx: typer.Context, code: str, request: RequestIdOpt = None,
             as_json: JsonOpt = False) -> None:
    """Activate a promotion: GetReward starts granting."""
    response = call(ctx, STUB, "ActivatePromotion", pb.ActivatePromotionRequest(
        request_id=request_id(request), promotion_code=code))
    _show(response.promotion, as_json)


@app.command()
def deactivate(ctx: typer.Context, code: str, request: RequestIdOpt = None,
               as_json: JsonOpt = False) -> None:
    """Deactivate a promotion: GetReward answers NOT_ACTIVE."""
    response = call(ctx, STUB, "DeactivatePromotion", pb.DeactivatePromotionRequest(
        request_id=request_id(request), promotion_code=code))
    _show(response.promotion, as_json)


@app.command("get-reward")
def get_reward(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="Promotion code.")],
    customer: Annotated[str, typer.Argument(help="Customer id.")],
    campaign: Annotated[str, typer.Option("--campaign", help="Campaign id, if any.")] = "",
    context: Annotated[list[str] | None, typer.Option(
        "--context", help="KEY=VALUE context of the call.")] = None,
    external: Annotated[list[str] | None, typer.Option(
        "--external", help="TYPE=VALUE for an EXTERNAL reward.")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a customer's reward (GetReward), as a promotion system would."""
    response = call(ctx, REWARD_STUB, "GetReward", rpb.GetRewardRequest(
        promotion_code=code, customer_id=customer, request_id=request_id(request),
        campaign_id=campaign, context=parse_pairs(context, "--context"),
        external_values=parse_pairs(external, "--external")))
    if as_json:
        print_json(response)
        return
    out = console()
    if not response.HasField("grant"):
        reason = enum_name(rpb.DenialReason, "DENIAL_REASON_", response.denial_reason)
        out.print(f"denied: {reason}: {response.denial_message}")
        return
    grant = response.grant
    rewards = ", ".join(f"{r.reward_type}={r.value}" if r.value else r.reward_type
                        for r in grant.rewards)
    again = " (existing grant)" if response.existing else ""
    out.print(f"granted{again}: grant {grant.grant_id}, promo code {grant.promo_code}: "
              f"{rewards}")


@app.command()
def revoke(
    ctx: typer.Context,
    grant_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept with the grant).")] = "",
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a grant: its amounts go back to the caps."""
    response = call(ctx, REWARD_STUB, "RevokeGrant", rpb.RevokeGrantRequest(
        request_id=request_id(request), grant_id=grant_id, reason=reason))
    if as_json:
        print_json(response)
    else:
        console().print(f"grant {grant_id} revoked" if response.revoked
                        else f"grant {grant_id} was already revoked")


@app.command()
def reconciliation(ctx: typer.Context, code: str, as_json: JsonOpt = False) -> None:
    """Grants and revokes per cap and period, against the cap counters."""
    response = call(ctx, STUB, "GetPromotionReconciliation",
                    pb.GetPromotionReconciliationRequest(promotion_code=code))
    if as_json:
        print_json(response)
        return
    show_rows(f"Reconciliation of {code}",
              ["scope", "period", "period start", "granted", "revoked", "net", "limit",
               "counter ok"],
              ([r.scope, enum_name(pb.CapPeriod, "CAP_PERIOD_", r.period).lower(),
                r.period_start.ToJsonString() if r.HasField("period_start") else "",
                f"{r.granted_count} / {r.granted_amount}",
                f"{r.revoked_count} / {r.revoked_amount}", r.net_amount, r.limit,
                r.counter_matches] for r in response.rows))
