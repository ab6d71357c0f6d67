"""Message templates operators register for a bonus's events ("your bonus of
{{event.bonus_amount}}"): checked when saved, rendered by plain substitution, never evaluated.

A placeholder is ``{{event.NAME}}`` (spaces inside the braces allowed) where NAME is one of
:data:`PLACEHOLDERS`. When the template is saved, an unknown name is refused, and so is what is
left of a broken placeholder once the valid ones are taken out (``{{``, ``}}`` or ``{event.``:
``{{event.x}``, ``{event.x}}``, ``{{event.x``), so a typo never reaches a customer as literal
braces. Single braces elsewhere are plain text. Rendering replaces each placeholder, in one pass,
with the event's value as text (missing values become the empty string); nothing else in the
text is interpreted, and a value that looks like a placeholder is not substituted again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from core.errors import InvalidArgument

MAX_TEMPLATE_LENGTH = 2000
PLACEHOLDERS = ("bonus_amount", "bonus_template", "customer_id", "formula_id", "bonus_id",
                "result_type", "currency", "reason", "status")
# The spaces inside the braces are stripped in Python, not by the pattern: ``\s*([^{}]*?)\s*``
# backtracks over every split of a run of spaces, and "{{" followed by 2,000 spaces and no "}}"
# took 16 s of the server's event loop to refuse. This pattern is linear.
_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
_NAME = re.compile(r"event\.([a-z_]+)\Z")
# What remains of a broken placeholder after the complete ones are removed.
_LEFTOVER = re.compile(r"\{\{|\}\}|\{\s*event\.")


def validate_template(text: str, *, field: str) -> str:
    """The template unchanged, or InvalidArgument naming the first bad placeholder and its
    position (1-based character)."""
    if len(text) > MAX_TEMPLATE_LENGTH:
        raise InvalidArgument(f"{field} is longer than {MAX_TEMPLATE_LENGTH} characters",
                              reason="INVALID_MESSAGE_TEMPLATE", metadata={"field": field})
    for match in _PLACEHOLDER.finditer(text):
        name = _NAME.match(match.group(1).strip())
        if name is None or name.group(1) not in PLACEHOLDERS:
            known = ", ".join("{{event." + p + "}}" for p in PLACEHOLDERS)
            raise InvalidArgument(
                f"{field}: unknown placeholder {match.group(0)!r} at character "
                f"{match.start() + 1}; use one of {known}",
                reason="INVALID_MESSAGE_TEMPLATE", metadata={"field": field})
    # Blank out the valid placeholders (same length, so positions stay) and look for the rest.
    rest = _PLACEHOLDER.sub(lambda m: "\0" * len(m.group(0)), text)
    leftover = _LEFTOVER.search(rest)
    if leftover is not None:
        raise InvalidArgument(
            f"{field}: broken placeholder {leftover.group(0)!r} at character "
            f"{leftover.start() + 1}; write a placeholder as {{{{event.NAME}}}}",
            reason="INVALID_MESSAGE_TEMPLATE", metadata={"field": field})
    return text


def render_template(text: str, values: Mapping[str, object]) -> str:
    """Replace every ``{{event.NAME}}`` with ``values[NAME]`` as text (None: empty)."""

    def substitute(match: re.Match[str]) -> str:
        name = _NAME.match(match.group(1).strip())
        if name is None:
            return match.group(0)
        value = values.get(name.group(1))
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(substitute, text)
