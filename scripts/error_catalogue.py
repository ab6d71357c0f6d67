"""Write docs/errors.md: every ErrorInfo reason the service can answer, with its gRPC code, an
example message and where it is raised, read from the sources (server/, core/, storage/).

Why generated: 150 reasons across 12 services change with the code; a hand-kept list would
drift. The catalogue is checked in, and `python scripts/error_catalogue.py --check` (run by
tests/unit/test_error_catalogue.py) fails when it is stale.

How a reason is found: a ``reason="..."`` keyword in a call (the exception classes of
core/errors.py, or a helper taking ``reason``), a literal passed where a helper takes its
``reason`` parameter, or such a parameter's default. Its gRPC code is the exception class's
(core/errors.py -> server/errors.py), directly or through the helper that raises it; a reason
made outside that (the interceptors' own statuses) is listed from EXTRA.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages are beside it
from server.errors import (  # noqa: E402
    DATABASE_TIMEOUT_MESSAGE,
    DATABASE_UNAVAILABLE_MESSAGE,
    INTERNAL_MESSAGE,
)

UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
OUTPUT = ROOT / "docs" / "errors.md"
SOURCE_DIRS = ("server", "core", "storage")
CODES = {"InvalidArgument": "INVALID_ARGUMENT", "NotFound": "NOT_FOUND",
         "AlreadyExists": "ALREADY_EXISTS", "FailedPrecondition": "FAILED_PRECONDITION",
         "PermissionDenied": "PERMISSION_DENIED", "Unauthenticated": "UNAUTHENTICATED",
         "ResourceExhausted": "RESOURCE_EXHAUSTED", "Aborted": "ABORTED"}
# Statuses the interceptors build themselves (server/interceptors.py, server/errors.py).
EXTRA = {
    "DATABASE_UNAVAILABLE": ("UNAVAILABLE", DATABASE_UNAVAILABLE_MESSAGE,
                             "server/interceptors.py"),
    "DATABASE_TIMEOUT": ("UNAVAILABLE", DATABASE_TIMEOUT_MESSAGE, "server/interceptors.py"),
    "INTERNAL": ("INTERNAL", INTERNAL_MESSAGE, "server/interceptors.py"),
}


@dataclass
class Reason:
    codes: set[str] = field(default_factory=set)
    message: str = ""
    where: set[str] = field(default_factory=set)


def _text(node: ast.expr | None) -> str:
    """A message argument as text: literals as they are, f-string fields as {name}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("{" + ast.unparse(value.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    return ""


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text())


def _helpers(trees: list[tuple[str, ast.Module]]) -> dict[str, tuple[int, int | None, str]]:
    """Functions with a ``reason`` parameter: name -> (its index, the message parameter's index,
    the gRPC code of the exception class they build with it)."""
    helpers: dict[str, tuple[int, int | None, str]] = {}
    for _, tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            names = [a.arg for a in node.args.args]
            keyword_only = [a.arg for a in node.args.kwonlyargs]
            if ("reason" not in names and "reason" not in keyword_only) or node.name in CODES:
                continue
            code = ""
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call) and _name(inner) in CODES:
                    code = CODES[_name(inner)]
                    break
            message = next((i for i, n in enumerate(names) if n in ("message", "problem")),
                           None)
            index = names.index("reason") if "reason" in names else -1  # -1: keyword-only
            helpers[node.name] = (index, message, code)
    return helpers


def collect() -> dict[str, Reason]:
    trees = list(_trees())
    helpers = _helpers(trees)
    found: dict[str, Reason] = {}

    def add(reason_node: ast.expr | None, code: str, message: str, where: str) -> None:
        # Only UPPER_SNAKE constants: some helpers call their message text "reason" too.
        if (isinstance(reason_node, ast.Constant) and isinstance(reason_node.value, str)
                and UPPER_SNAKE.fullmatch(reason_node.value)):
            entry = found.setdefault(reason_node.value, Reason())
            if code:
                entry.codes.add(code)
            if message and not entry.message:
                entry.message = message
            entry.where.add(where)

    for path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in helpers:
                index, _, code = helpers[node.name]
                defaults = node.args.defaults
                args = node.args.args[len(node.args.args) - len(defaults):]
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "reason":
                        add(default, code, "", path)
            if isinstance(node, ast.ClassDef):  # an error class: super().__init__(reason=...)
                base = next((b.id for b in node.bases if isinstance(b, ast.Name)
                             and b.id in CODES), "")
                if base:
                    for inner in ast.walk(node):
                        if isinstance(inner, ast.Call) and _name(inner) == "__init__":
                            add(next((k.value for k in inner.keywords if k.arg == "reason"),
                                     None), CODES[base],
                                _text(inner.args[0]) if inner.args else "", path)
            if not isinstance(node, ast.Call):
                continue
            name = _name(node)
            reason_kw = next((k.value for k in node.keywords if k.arg == "reason"), None)
            if name in CODES:
                add(reason_kw, CODES[name], _text(node.args[0]) if node.args else "", path)
            elif name in helpers:
                index, message_index, code = helpers[name]
                reason_node = reason_kw or (node.args[index] if 0 <= index < len(node.args)
                                            else None)
                message = (_text(node.args[message_index])
                           if message_index is not None and message_index < len(node.args)
                           else "")
                add(reason_node, code, message, path)
            elif reason_kw is not None:
                add(reason_kw, "", "", path)
    for reason, (code, message, where) in EXTRA.items():
        entry = found.setdefault(reason, Reason())
        entry.codes.add(code)
        entry.message = entry.message or message
        entry.where.add(where)
    return found


def render(found: dict[str, Reason]) -> str:
    lines = [
        "# Error reasons",
        "",
        "Every error the service answers carries a `google.rpc.ErrorInfo` (domain `promo.engine`)",
        "whose `reason` says which refusal it is; switch on the reason, not on the message. This",
        "list is generated from the sources by `scripts/error_catalogue.py` (a test fails when it",
        "is stale). The message column shows one message of the reason, with `{...}` where the",
        "call's own values go; `metadata` usually names the `field` and the ids involved.",
        "",
        "| reason | gRPC code | example message | raised in |",
        "|---|---|---|---|",
    ]
    for reason in sorted(found):
        entry = found[reason]
        codes = ", ".join(sorted(entry.codes)) or "(varies)"
        message = entry.message.replace("|", "\\|").replace("\n", " ")
        if len(message) > 160:
            message = message[:157] + "..."
        where = ", ".join(f"`{w}`" for w in sorted(entry.where))
        lines.append(f"| `{reason}` | {codes} | {message} | {where} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render(collect())
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/error_catalogue.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}: {len(text.splitlines()) - 10} reasons")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
