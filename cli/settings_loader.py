"""Loading the settings for a `promo` command: bad settings are one line each, exit status 2.

Why not print the exception: pydantic's ValidationError text carries the raw input of the
failing field or model (``input_value=...``), which for the API keys, a model-level check or
the SMTP settings means keys and passwords on the terminal and in CI logs. Only the location
and the message are printed, as plain text (rich markup off, so a ``[`` in a message is shown
rather than swallowed), and the settings' own messages never name a value.
"""

from __future__ import annotations

import re

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.text import Text

from config.settings import Settings, load_settings
from server.logs import configure_logging

_VALUE_ERROR_PREFIX = "Value error, "


def _location(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as the setting's name: ('api_keys', 0) -> PROMO_API_KEYS[0]."""
    if not loc:
        return ""
    text = f"PROMO_{str(loc[0]).upper()}"
    for part in loc[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


# pydantic-settings' text for a value that is not JSON where JSON is expected (PROMO_API_KEYS).
_PARSE_ERROR = re.compile(r'error parsing value for field "(\w+)"')


def settings_problems(exc: Exception) -> list[str]:
    """One line per problem, as ``PROMO_SETTING: message`` (no input values, no URLs)."""
    if isinstance(exc, SettingsError) and (found := _PARSE_ERROR.search(str(exc))):
        return [f"{_location((found.group(1),))}: is not valid JSON"]
    if not isinstance(exc, ValidationError):
        # Our own errors (SecretKeysSettingError, TlsFileError, a missing PROMO_CONFIG_FILE)
        # name the setting, never its value.
        return [str(exc)]
    lines = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        message = str(error["msg"]).removeprefix(_VALUE_ERROR_PREFIX)
        where = _location(tuple(error["loc"]))
        lines.append(f"{where}: {message}" if where else message)
    return lines


def load_settings_or_exit(console: Console) -> Settings:
    """The settings, with logging configured from them; on a bad setting print every problem
    (one line each) and exit with status 2."""
    try:
        settings = load_settings()
    except Exception as exc:  # ValidationError, or one of ours raised through pydantic
        for line in settings_problems(exc):
            console.print(Text.assemble(("invalid settings: ", "red"), line), soft_wrap=True,
                          highlight=False)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings
