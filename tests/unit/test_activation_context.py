"""What of GetReward's context reaches the log: bounded in size, credentials redacted."""

from __future__ import annotations

import pytest

from server.activation_context import (
    MAX_ENTRIES,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    REDACTED,
    loggable_context,
)


def test_a_small_context_is_logged_as_sent() -> None:
    assert loggable_context({"channel": "sms", "campaign": "spring"}) == \
        {"campaign": "spring", "channel": "sms"}


@pytest.mark.parametrize("key", ["password", "api_key", "API-Key", "x_token", "Authorization",
                                 "client_secret", "session_id", "private_key", "credentials",
                                 "pwd", "db_pwd", "bearer", "jwt", "access_key", "AccessKey",
                                 "signature", "otp", "user_pin", "PIN", "card.cvv"])
def test_values_of_keys_that_name_a_credential_are_redacted(key: str) -> None:
    assert loggable_context({key: "s3cr3t", "channel": "sms"}) == \
        {key: REDACTED, "channel": "sms"}


@pytest.mark.parametrize("key", ["pinned_offer", "shipping", "topic", "spinner", "channel"])
def test_ordinary_keys_that_merely_contain_a_short_credential_word_are_logged(key: str) -> None:
    assert loggable_context({key: "x"}) == {key: "x"}


def test_long_keys_and_values_are_cut() -> None:
    shown = loggable_context({"k" * 500: "v" * 5000})
    [(key, value)] = shown.items()
    assert (len(key), len(value)) == (MAX_KEY_LENGTH, MAX_VALUE_LENGTH)
    assert key.endswith("…") and value.endswith("…")


def test_at_most_the_first_entries_in_key_order_and_a_count_of_the_rest() -> None:
    context = {f"k{i:03d}": str(i) for i in range(MAX_ENTRIES + 5)}
    shown = loggable_context(context)
    assert list(shown)[:MAX_ENTRIES] == [f"k{i:03d}" for i in range(MAX_ENTRIES)]
    assert shown["…"] == "5 more entries not logged"
    assert len(shown) == MAX_ENTRIES + 1
