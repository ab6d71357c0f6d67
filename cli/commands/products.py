"""`promo products`: personalized product promotions, customers' product lists (in bulk from a
file), a customer's view and selection, product-set discounts, and basket evaluate/apply
(ProductPromotionService, docs/products.md)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.field_mask_pb2 import FieldMask
from rich.text import Text

from cli.client import (
    batch_failure,
    call,
    connection_callback,
    derived_request_id,
    enum_name,
    fail,
    int32,
    load_json_file,
    pages,
    parse_message,
    print_json,
    read_csv,
    request_id,
    send,
    to_dict,
)
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import console, show_message, show_rows
from promo.v1 import products_pb2 as pb
from promo.v1 import products_pb2_grpc as pb_grpc

app = typer.Typer(help="Personalized product promotions: product lists, selections, "
                       "product-set discounts, baskets.", no_args_is_help=True,
                  callback=connection_callback)
discounts_app = typer.Typer(help="Product-set discounts.", no_args_is_help=True)
basket_app = typer.Typer(help="Evaluate (preview) or apply the discounts to a basket.",
                         no_args_is_help=True)
app.add_typer(discounts_app, name="discounts")
app.add_typer(basket_app, name="basket")
STUB = pb_grpc.ProductPromotionServiceStub
BATCH = 10_000  # customers per AssignProductLists / RemoveProductLists call (the server's limit)
FIELDS = ("name", "description", "max_distinct_products", "lock_after_first_apply")


def _say(text: str) -> None:
    """One line of human output, printed as is (ids and product names may hold [brackets])."""
    console().print(text, markup=False, highlight=False)


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
           next_page_token: str = "") -> None:
    """show_rows with the text cells as plain Text (ids, filters and product names may hold
    [brackets], which rich would read as markup)."""
    show_rows(title, columns, ([Text(v) if isinstance(v, str) else v for v in row]
                               for row in rows), next_page_token)


# --- personalized promotions --------------------------------------------------------------------


def _show_promotion(promotion: pb.PersonalizedPromotion, as_json: bool) -> None:
    if as_json:
        print_json(promotion)
    else:
        show_message(promotion, title=f"personalized promotion {promotion.backend_id}")


def _file_object(file: Path, message: Any, what: str) -> tuple[Any, list[str]]:
    """A message from a proto-JSON object file, and the top-level fields it names (a mask)."""
    data = load_json_file(file)
    if not isinstance(data, dict):
        fail(f"{file}: expected a JSON object ({what})")
    parsed = parse_message(data, message, str(file))
    names = {f.json_name: f.name for f in message.DESCRIPTOR.fields}
    return parsed, [names.get(key, key) for key in data]


NameOpt = Annotated[str | None, typer.Option(help="Name (at most 200 characters).")]
DescriptionOpt = Annotated[str | None, typer.Option(help="Description.")]
MaxOpt = Annotated[int | None, typer.Option(
    "--max-distinct", min=0, help="Distinct products a customer may select (0: all).")]
LockOpt = Annotated[bool | None, typer.Option(
    "--lock/--no-lock", help="Lock the selection after the first apply.")]


@app.command()
def create(
    ctx: typer.Context,
    backend_id: Annotated[str | None, typer.Argument(
        help="Backend id (letters, digits, _ - .).", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="The PersonalizedPromotion as proto JSON.")] = None,
    name: NameOpt = None,
    description: DescriptionOpt = None,
    max_distinct: MaxOpt = None,
    lock: LockOpt = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a personalized promotion from flags or a JSON file."""
    if file is not None:
        if any(v is not None for v in (name, description, max_distinct, lock)):
            fail("give either --file or the promotion's flags, not both")
        promotion, _ = _file_object(file, pb.PersonalizedPromotion(), "a PersonalizedPromotion")
        if backend_id:
            promotion.backend_id = backend_id
    else:
        if not backend_id:
            fail("give BACKEND_ID and --name, or --file with the promotion as JSON")
        promotion = pb.PersonalizedPromotion(
            backend_id=backend_id, name=name or "", description=description or "",
            max_distinct_products=int32(max_distinct or 0, "--max-distinct"),
            lock_after_first_apply=bool(lock))
    response = call(ctx, STUB, "CreatePersonalizedPromotion",
                    pb.CreatePersonalizedPromotionRequest(
                        request_id=request_id(request), personalized_promotion=promotion))
    _show_promotion(response.personalized_promotion, as_json)


@app.command()
def get(ctx: typer.Context, backend_id: str, as_json: JsonOpt = False) -> None:
    """Show a personalized promotion."""
    response = call(ctx, STUB, "GetPersonalizedPromotion",
                    pb.GetPersonalizedPromotionRequest(backend_id=backend_id))
    _show_promotion(response.personalized_promotion, as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    search: Annotated[str, typer.Option(help="Name or backend id contains this.")] = "",
    locked: Annotated[bool | None, typer.Option(
        "--lock/--no-lock", help="Only promotions that lock (or do not lock) after the first "
                                 "apply.", show_default=False)] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Personalized promotions by backend id."""
    request = pb.ListPersonalizedPromotionsRequest(page_size=page_size, page_token=page_token,
                                                   search=search)
    if locked is not None:
        request.lock_after_first_apply = locked
    items: list[pb.PersonalizedPromotion] = []
    token = ""
    for page in pages(ctx, STUB, "ListPersonalizedPromotions", request, follow=all_pages):
        items.extend(page.personalized_promotions)
        token = page.next_page_token
    if as_json:
        print_json({"personalized_promotions": [to_dict(p) for p in items],
                    "next_page_token": token})
        return
    _table("Personalized promotions", ["backend id", "name", "max distinct",
                                          "locks after first apply"],
              ([p.backend_id, p.name, p.max_distinct_products or "all",
                p.lock_after_first_apply] for p in items), token)


@app.command()
def update(
    ctx: typer.Context,
    backend_id: str,
    name: NameOpt = None,
    description: DescriptionOpt = None,
    max_distinct: MaxOpt = None,
    lock: LockOpt = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the given fields of a personalized promotion."""
    promotion = pb.PersonalizedPromotion(backend_id=backend_id)
    values = {"name": name, "description": description,
              "max_distinct_products": None if max_distinct is None
              else int32(max_distinct, "--max-distinct"),
              "lock_after_first_apply": lock}
    paths = [path for path in FIELDS if values[path] is not None]
    if not paths:
        fail("nothing to change: give --name, --description, --max-distinct or --lock/--no-lock")
    for path in paths:
        setattr(promotion, path, values[path])
    response = call(ctx, STUB, "UpdatePersonalizedPromotion",
                    pb.UpdatePersonalizedPromotionRequest(
                        request_id=request_id(request), personalized_promotion=promotion,
                        update_mask=FieldMask(paths=paths)))
    _show_promotion(response.personalized_promotion, as_json)


@app.command()
def delete(ctx: typer.Context, backend_id: str, request: RequestIdOpt = None,
           as_json: JsonOpt = False) -> None:
    """Delete a personalized promotion and its product lists (not while a discount links it)."""
    response = call(ctx, STUB, "DeletePersonalizedPromotion",
                    pb.DeletePersonalizedPromotionRequest(request_id=request_id(request),
                                                          backend_id=backend_id))
    if as_json:
        print_json(response)
    else:
        _say(f"deleted {backend_id} and {response.deleted_product_lists} product "
                        "list(s)")


# --- product lists ------------------------------------------------------------------------------


Assignment = tuple[str, tuple[str, ...], str, str]  # customer, products, default, where (an error)


def _read_assignments(path: Path, default: str) -> list[Assignment]:
    """``customer_id,product,product...`` rows (CSV; a ``customer_id`` header is skipped), or a
    .json list of ``{"customer_id", "product_ids", "default_product_id"}``."""
    if path.suffix.lower() == ".json":
        data = load_json_file(path)
        if not isinstance(data, list):
            fail(f"{path}: expected a JSON list of {{customer_id, product_ids}} objects")
        rows: list[Assignment] = []
        for number, item in enumerate(data, start=1):
            products = item.get("product_ids") if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(item.get("customer_id"), str) \
                    or not isinstance(products, list) \
                    or not all(isinstance(p, str) for p in products):
                fail(f"{path} item {number}: give customer_id and a list of product_ids")
            rows.append((item["customer_id"], tuple(products),
                         str(item.get("default_product_id") or default),
                         f"{path.name} item {number}"))
        return rows
    rows = []
    for number, cells in enumerate(read_csv(path, csv.reader), start=1):
        cells = [c.strip() for c in cells]
        if not any(cells) or (number == 1 and cells[0] == "customer_id"):
            continue
        products = tuple(c for c in cells[1:] if c)
        if not cells[0] or not products:
            fail(f"{path} line {number}: give customer_id,product_id[,product_id...]")
        rows.append((cells[0], products, default, f"{path.name} line {number}"))
    return rows


@app.command()
def assign(
    ctx: typer.Context,
    promotion: Annotated[str, typer.Argument(help="The personalized promotion's backend id.")],
    customer: Annotated[list[str] | None, typer.Option(
        "--customer", help="A customer to give the list to (repeat).")] = None,
    product: Annotated[list[str] | None, typer.Option(
        "--product", help="A product of the list, in display order (repeat).")] = None,
    default: Annotated[str, typer.Option(
        "--default", help="The default product (empty: the first of each list).")] = "",
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="Bulk: CSV rows customer_id,product_id,product_id... or a .json list of "
             "{customer_id, product_ids, default_product_id}.")] = None,
    request: Annotated[str | None, typer.Option(
        "--request-id", help="Idempotency key (default: a fresh one, or for --file one derived "
                             "from the file's content, the promotion and --default).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Give customers product lists (replacing the ones they had in the promotion).

    Lists go in calls of up to 10,000 customers sharing the same list. When a call is refused,
    the error names the file line of a customer it cites and what earlier calls assigned;
    running the same command again continues."""
    if file is not None:
        if customer or product:
            fail("give either --file or --customer/--product, not both")
        rows = _read_assignments(file, default)
        if not rows:
            fail(f"{file} has no product lists")
        base = request or derived_request_id("lists", file.read_bytes(), promotion=promotion,
                                             default=default)
    else:
        if not customer or not product:
            fail("give --customer and --product (repeat them), or --file")
        rows = [(c, tuple(product), default, f"--customer {number}")
                for number, c in enumerate(customer, start=1)]
        base = request_id(request)
    groups: dict[tuple[tuple[str, ...], str], list[tuple[str, str]]] = {}
    for customer_id, products, default_product, where in rows:
        groups.setdefault((products, default_product), []).append((customer_id, where))
    created = replaced = calls = 0
    for (products, default_product), members in groups.items():
        for start in range(0, len(members), BATCH):
            batch = members[start:start + BATCH]
            try:
                response = send(ctx, STUB, "AssignProductLists", pb.AssignProductListsRequest(
                    request_id=base if calls == 0 and file is None else f"{base}-{calls}",
                    personalized_promotion_id=promotion,
                    customer_ids=[customer_id for customer_id, _ in batch],
                    product_ids=products, default_product_id=default_product))
            except grpc.RpcError as exc:
                fail(batch_failure(
                    exc, field="customer_ids",
                    names=[f"customer_ids[{i}] ({where})" for i, (_, where) in enumerate(batch)],
                    written=None if calls == 0 else (
                        f"{calls} earlier call(s) assigned lists ({created} created, "
                        f"{replaced} replaced); the lists of this call and later ones were not "
                        "assigned; run the same command again to continue (a list assigned "
                        "again stays as it is)")))
            created += response.created_count
            replaced += response.replaced_count
            calls += 1
    if as_json:
        typer.echo(json.dumps({"created_count": created, "replaced_count": replaced,
                               "calls": calls}, indent=2))
    else:
        _say(f"assigned lists in {promotion}: {created} created, {replaced} "
                        f"replaced ({calls} call(s))")


def _read_customer_ids(path: Path) -> list[str]:
    lines = read_csv(path, csv.reader)
    ids = [cells[0].strip() for cells in lines if cells and cells[0].strip()]
    return ids[1:] if ids and ids[0] == "customer_id" else ids


@app.command()
def remove(
    ctx: typer.Context,
    promotion: Annotated[str, typer.Argument(help="The personalized promotion's backend id.")],
    customers: Annotated[list[str] | None, typer.Argument(
        help="Customer ids.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="Customer ids, one a line (the first column of a CSV).")] = None,
    request: Annotated[str | None, typer.Option(
        "--request-id", help="Idempotency key (default: a fresh one, or for --file one derived "
                             "from the file's content, the promotion and the CUSTOMER_IDS).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Take customers out of a personalized promotion (their list and selection go).

    Customers go in calls of up to 10,000; when a call is refused, the error names positions in
    the whole list (CUSTOMER_IDS, then the file's) and what earlier calls removed."""
    ids = list(customers or []) + (_read_customer_ids(file) if file is not None else [])
    if not ids:
        fail("give CUSTOMER_IDS or --file")
    if file is not None:
        base = request or derived_request_id("remove", file.read_bytes(), promotion=promotion,
                                             customers=list(customers or []))
    else:
        base = request_id(request)
    removed = 0
    for number, start in enumerate(range(0, len(ids), BATCH)):
        try:
            response = send(ctx, STUB, "RemoveProductLists", pb.RemoveProductListsRequest(
                request_id=base if number == 0 else f"{base}-{number}",
                personalized_promotion_id=promotion, customer_ids=ids[start:start + BATCH]))
        except grpc.RpcError as exc:
            fail(batch_failure(
                exc, field="customer_ids",
                names=[f"customer_ids[{start + i}]" for i in range(BATCH)],
                written=None if number == 0 else (
                    f"customer_ids[0] to customer_ids[{start - 1}] went in {number} earlier "
                    f"call(s), which removed {removed} product list(s); the rest were not "
                    "removed; run the same command again to continue (removing again changes "
                    "nothing)")))
        removed += response.removed_count
    if as_json:
        typer.echo(json.dumps({"removed_count": removed}, indent=2))
    else:
        _say(f"removed {removed} product list(s) from {promotion}")


def _entry_rows(entries: list[pb.CustomerProductPromotion], first: str) -> list[list[Any]]:
    return [[e.customer_id if first == "customer" else e.personalized_promotion.backend_id,
             ", ".join(e.product_ids), e.default_product_id, ", ".join(e.chosen_product_ids),
             ", ".join(e.selected_product_ids),
             e.first_apply_time.ToJsonString() if e.HasField("first_apply_time") else "",
             e.selection_locked] for e in entries]


ENTRY_COLUMNS = ["products", "default", "chosen", "selected", "first applied", "locked"]


@app.command()
def lists(ctx: typer.Context,
          promotion: Annotated[str, typer.Argument(help="The personalized promotion's "
                                                        "backend id.")],
          page_size: PageSizeOpt = 50, page_token: PageTokenOpt = "",
          all_pages: AllOpt = False, as_json: JsonOpt = False) -> None:
    """The customers enrolled in a promotion, with their lists and selections."""
    request = pb.ListProductListsRequest(personalized_promotion_id=promotion,
                                         page_size=page_size, page_token=page_token)
    items: list[pb.CustomerProductPromotion] = []
    token = ""
    for page in pages(ctx, STUB, "ListProductLists", request, follow=all_pages):
        items.extend(page.product_lists)
        token = page.next_page_token
    if as_json:
        print_json({"product_lists": [to_dict(e) for e in items], "next_page_token": token})
        return
    _table(f"Product lists of {promotion}", ["customer", *ENTRY_COLUMNS],
              _entry_rows(items, "customer"), token)


@app.command()
def customer(ctx: typer.Context, customer_id: str, as_json: JsonOpt = False) -> None:
    """A customer's view: their personalized promotions, lists and selections."""
    response = call(ctx, STUB, "GetCustomerProductPromotions",
                    pb.GetCustomerProductPromotionsRequest(customer_id=customer_id))
    if as_json:
        print_json(response)
        return
    _table(f"Product promotions of {customer_id}", ["promotion", *ENTRY_COLUMNS],
              _entry_rows(list(response.promotions), "promotion"))


@app.command()
def select(
    ctx: typer.Context,
    customer_id: str,
    promotion: Annotated[str, typer.Argument(help="The personalized promotion's backend id.")],
    products: Annotated[list[str] | None, typer.Argument(
        help="Products from the customer's list (none: back to the default product).",
        show_default=False)] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a customer's product selection in a personalized promotion."""
    response = call(ctx, STUB, "SelectProducts", pb.SelectProductsRequest(
        request_id=request_id(request), customer_id=customer_id,
        personalized_promotion_id=promotion, product_ids=products or []))
    if as_json:
        print_json(response)
        return
    entry = response.promotion
    chosen = ", ".join(entry.chosen_product_ids) or f"nothing (default {entry.default_product_id})"
    _say(f"{customer_id} in {promotion}: chose {chosen}; selected "
                    f"{', '.join(entry.selected_product_ids)}")


# --- product-set discounts ----------------------------------------------------------------------


DISCOUNT_TYPE = "DISCOUNT_TYPE_"


def _sets(discount: pb.ProductSetDiscount) -> str:
    parts = []
    for product_set in discount.product_sets:
        products = (f"personalized {product_set.personalized_promotion_id}"
                    if product_set.personalized_promotion_id
                    else ", ".join(product_set.product_ids))
        gets = (f", {product_set.discounted_quantity} discounted"
                if product_set.gets_discount else "")
        parts.append(f"{product_set.name} [{products}] x{product_set.required_quantity}{gets}")
    return "; ".join(parts)


def _show_discount(discount: pb.ProductSetDiscount, as_json: bool) -> None:
    if as_json:
        print_json(discount)
    else:
        show_message(discount, title=f"product-set discount {discount.discount_id}",
                     skip=("product_sets",))
        _say(f"sets: {_sets(discount)}")


@discounts_app.command("create")
def discount_create(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="The ProductSetDiscount as proto JSON (its sets, type and value).")],
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a product-set discount from a JSON file."""
    discount, _ = _file_object(file, pb.ProductSetDiscount(), "a ProductSetDiscount")
    response = call(ctx, STUB, "CreateProductSetDiscount", pb.CreateProductSetDiscountRequest(
        request_id=request_id(request), product_set_discount=discount))
    _show_discount(response.product_set_discount, as_json)


@discounts_app.command("update")
def discount_update(
    ctx: typer.Context,
    discount_id: str,
    file: Annotated[Path, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="Proto JSON of the fields to change (its top-level keys are the update mask; "
             "product_sets is replaced as a whole).")],
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the fields of a product-set discount given in a JSON file."""
    discount, paths = _file_object(file, pb.ProductSetDiscount(), "ProductSetDiscount fields")
    discount.discount_id = discount_id
    response = call(ctx, STUB, "UpdateProductSetDiscount", pb.UpdateProductSetDiscountRequest(
        request_id=request_id(request), product_set_discount=discount,
        update_mask=FieldMask(paths=[p for p in paths if p != "discount_id"])))
    _show_discount(response.product_set_discount, as_json)


@discounts_app.command("get")
def discount_get(ctx: typer.Context, discount_id: str, as_json: JsonOpt = False) -> None:
    """Show a product-set discount."""
    response = call(ctx, STUB, "GetProductSetDiscount",
                    pb.GetProductSetDiscountRequest(discount_id=discount_id))
    _show_discount(response.product_set_discount, as_json)


@discounts_app.command("list")
def discount_list(
    ctx: typer.Context,
    promotion: Annotated[str, typer.Option(
        "--promotion", help="Only discounts with a set linked to this personalized "
                            "promotion.")] = "",
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Product-set discounts by id."""
    request = pb.ListProductSetDiscountsRequest(page_size=page_size, page_token=page_token,
                                                personalized_promotion_id=promotion)
    items: list[pb.ProductSetDiscount] = []
    token = ""
    for page in pages(ctx, STUB, "ListProductSetDiscounts", request, follow=all_pages):
        items.extend(page.product_set_discounts)
        token = page.next_page_token
    if as_json:
        print_json({"product_set_discounts": [to_dict(d) for d in items],
                    "next_page_token": token})
        return
    _table("Product-set discounts", ["id", "name", "type", "value", "min basket", "sets"],
              ([d.discount_id, d.name,
                enum_name(pb.DiscountType, DISCOUNT_TYPE, d.discount_type).lower(), d.value,
                d.min_basket_total, _sets(d)] for d in items), token)


@discounts_app.command("delete")
def discount_delete(ctx: typer.Context, discount_id: str, request: RequestIdOpt = None,
                    as_json: JsonOpt = False) -> None:
    """Delete a product-set discount."""
    response = call(ctx, STUB, "DeleteProductSetDiscount", pb.DeleteProductSetDiscountRequest(
        request_id=request_id(request), discount_id=discount_id))
    if as_json:
        print_json(response)
    else:
        _say(f"deleted discount {discount_id}")


# --- baskets ------------------------------------------------------------------------------------


def _lines(file: Path | None, lines: list[str] | None) -> list[pb.BasketLine]:
    """Basket lines from a JSON file (a list of lines, or an object with "lines") or from
    ``--line PRODUCT:QUANTITY:UNIT_PRICE`` flags."""
    if (file is None) == (not lines):
        fail("give the basket with --file or --line PRODUCT:QUANTITY:UNIT_PRICE (repeat)")
    if file is not None:
        data = load_json_file(file)
        items = data.get("lines") if isinstance(data, dict) else data
        if not isinstance(items, list):
            fail(f"{file}: expected a JSON list of basket lines (or an object with \"lines\")")
        return [parse_message(item, pb.BasketLine(), f"{file} line {i + 1}")
                for i, item in enumerate(items)]
    parsed = []
    for text in lines or []:
        parts = text.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            fail(f"--line takes PRODUCT:QUANTITY:UNIT_PRICE (e.g. espresso:2:7.99), got "
                 f"{text!r}")
        parsed.append(pb.BasketLine(product_id=parts[0],
                                    quantity=int32(int(parts[1]), f"--line {text}: quantity"),
                                    unit_price=parts[2]))
    return parsed


def _show_evaluation(evaluation: pb.BasketEvaluation, basket: list[pb.BasketLine]) -> None:
    if evaluation.outcomes:
        _table("Discounts", ["discount", "applied", "amount", "explanation"],
                  ([o.discount_id, o.applied, o.amount, o.explanation]
                   for o in evaluation.outcomes))
    else:
        _say("no discount concerns this basket")
    if evaluation.discount_lines:
        _table("Discounted lines", ["discount", "line", "product", "units", "amount off"],
                  ([d.discount_id, d.line_index + 1, d.product_id, d.quantity, d.amount]
                   for d in evaluation.discount_lines))
    _say(f"basket {evaluation.basket_total} ({len(basket)} line(s)), discounts "
              f"{evaluation.discount_total}, to pay {evaluation.total_after_discounts}")


BasketFileOpt = Annotated[Path | None, typer.Option(
    "--file", "-f", exists=True, dir_okay=False,
    help='JSON: [{"product_id", "quantity", "unit_price"}, ...] or {"lines": [...]}.')]
LineOpt = Annotated[list[str] | None, typer.Option(
    "--line", help="PRODUCT:QUANTITY:UNIT_PRICE, e.g. espresso:2:7.99 (repeat).")]


@basket_app.command("evaluate")
def basket_evaluate(ctx: typer.Context, customer_id: str, file: BasketFileOpt = None,
                    line: LineOpt = None, as_json: JsonOpt = False) -> None:
    """Preview the product-set discounts of a customer's basket (changes nothing)."""
    basket = _lines(file, line)
    response = call(ctx, STUB, "EvaluateBasket",
                    pb.EvaluateBasketRequest(customer_id=customer_id, lines=basket))
    if as_json:
        print_json(response)
        return
    _show_evaluation(response.evaluation, basket)


@basket_app.command("apply")
def basket_apply(ctx: typer.Context, customer_id: str, file: BasketFileOpt = None,
                 line: LineOpt = None, request: RequestIdOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Apply the discounts to a basket: records first applies (and locks selections)."""
    basket = _lines(file, line)
    response = call(ctx, STUB, "ApplyBasket", pb.ApplyBasketRequest(
        request_id=request_id(request), customer_id=customer_id, lines=basket))
    if as_json:
        print_json(response)
        return
    _show_evaluation(response.evaluation, basket)
    if response.first_applied_promotion_ids:
        _say("first applied: " + ", ".join(response.first_applied_promotion_ids))
