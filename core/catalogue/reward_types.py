"""Reward types (seed 000): what a promotion pays out, and the bounds on its value."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlparse

from core.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
UPDATABLE_FIELDS = frozenset(
    {"display_name", "description", "image_url", "category", "min_value", "max_value"}
)


class RewardCategory(enum.Enum):
    """AMOUNT is money; UNITS counts activity rewards such as free spins."""

    AMOUNT = "AMOUNT"
    UNITS = "UNITS"


@dataclass(frozen=True)
class RewardType:
    name: str
    display_name: str
    category: RewardCategory
    description: str = ""
    image_url: str = ""
    min_value: Decimal | None = None
    max_value: Decimal | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None


def validate_name(name: str, *, field: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"{field} must be 1-100 characters of letters, digits, '_', '-' or '.', starting "
            f"with a letter or digit; got {name!r}",
            reason="INVALID_NAME", metadata={"field": field})
    return name


def validate_reward_type(reward_type: RewardType) -> RewardType:
    """Check every field; returns the value with text fields trimmed."""
    validate_name(reward_type.name)
    display_name = reward_type.display_name.strip()
    if not display_name or len(display_name) > 200:
        raise InvalidArgument("display_name is required and at most 200 characters",
                              reason="INVALID_DISPLAY_NAME", metadata={"field": "display_name"})
    description = reward_type.description.strip()
    if len(description) > 2000:
        raise InvalidArgument("description must be at most 2000 characters",
                              reason="INVALID_DESCRIPTION", metadata={"field": "description"})
    image_url = reward_type.image_url.strip()
    if image_url:
        try:
            parsed = urlparse(image_url)
        except ValueError:  # e.g. "http://[" or a netloc that NFKC turns into '#'
            parsed = None
        if (parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc
                or len(image_url) > 2000):
            raise InvalidArgument(f"image_url must be an http(s) URL, got {image_url!r}",
                                  reason="INVALID_URL", metadata={"field": "image_url"})
    low, high = reward_type.min_value, reward_type.max_value
    if low is not None and high is not None and low > high:
        raise InvalidArgument(f"min_value {low} is above max_value {high}",
                              reason="INVALID_BOUNDS", metadata={"field": "min_value"})
    return replace(reward_type, display_name=display_name, description=description,
                   image_url=image_url)


def apply_update(current: RewardType, patch: RewardType, paths: list[str]) -> RewardType:
    """Copy the masked fields from ``patch`` onto ``current`` and validate the result."""
    if not paths:
        raise InvalidArgument("update_mask must name at least one field",
                              reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
    unknown = sorted(set(paths) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidArgument(
            f"update_mask names fields that cannot be updated: {', '.join(unknown)}; "
            f"updatable fields are {', '.join(sorted(UPDATABLE_FIELDS))}",
            reason="INVALID_UPDATE_MASK", metadata={"field": "update_mask"})
    updated = replace(current, **{path: getattr(patch, path) for path in paths})
    return validate_reward_type(updated)
