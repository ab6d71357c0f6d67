"""Regressions of the security surface, settings loading and FormulaService.

What a user is guaranteed here:
- every failed call carries its x-request-id trailer next to the google.rpc details, even when
  it fails authentication;
- an edited page token is INVALID_ARGUMENT INVALID_PAGE_TOKEN on every List RPC, never INTERNAL;
- a bad setting is one line per problem and exit status 2, and never prints a secret (API keys,
  the SMTP password); bad TLS files are such a setting problem, named by their setting;
- `promo up` writes its admin key atomically and refuses a key file too short to be a key with
  one line naming the file;
- FormulaService refuses a variable given twice, a variable with both value and per-currency
  values, and a number it would have to guess ("1_000"); MROUND's result is a multiple of its
  factor (seed 000: MROUND(34.75, 0.1) = 34.8 whatever the decimals); No Round keeps every
  digit; fixed dates carry a time zone whose wall clock measures the 31-day limit.

Everything runs against the real stack: a real server on loopback with real PostgreSQL, and the
real `promo` command in a subprocess for settings and start-up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
import trustme

from cli.main import ADMIN_KEY_FILE, _local_admin_key
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rpb
from promo.v1 import reward_types_pb2_grpc as rpb_grpc
from server.errors import error_info_of
from tests.conftest import Api, Services, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.promo_process import clean_env as _env
from tests.e2e.promo_process import run_promo as _promo
from tests.e2e.test_bonuses_api import create, definition, stub

BERLIN = ZoneInfo("Europe/Berlin")
NOT_OURS = "page_token is not a token this server issued"


# --- helpers ---------------------------------------------------------------------------------


def _page_token(after: list[object], filters: dict[str, object]) -> str:
    """A page token as core.pagination builds it (base64 JSON with no signature), as a client
    that decodes and edits one would write it."""
    fingerprint = hashlib.sha256(
        json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]
    payload = json.dumps({"a": after, "f": fingerprint}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


async def _customer(api: Api, *events: tuple[str, str, datetime]) -> None:
    stub_ = cpb_grpc.CustomerServiceStub(api.channel)
    await stub_.UpsertCustomers(cpb.UpsertCustomersRequest(request_id="u", customers=[
        cpb.Customer(customer_id="p1", currency="EUR", time_zone="Europe/Berlin")]),
        metadata=api.key())
    if events:
        await stub_.RecordEvents(cpb.RecordEventsRequest(request_id="e", events=[
            cpb.Event(external_id=f"x{i}", customer_id="p1", kind=kind, amount=amount,
                      currency="EUR", occurred_at=ts(at))
            for i, (kind, amount, at) in enumerate(events)]), metadata=api.key())


def _october_in_berlin(time_zone: str) -> fpb.TransactionPeriod:
    return fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
        start=ts(datetime(2026, 10, 1, tzinfo=BERLIN)),
        end=ts(datetime(2026, 11, 1, tzinfo=BERLIN)), time_zone=time_zone))


# --- request ids on failed calls --------------------------------------------------------------


@pytest.mark.parametrize(("credentials", "code", "reason"), [
    ("admin", grpc.StatusCode.NOT_FOUND, "REWARD_TYPE_NOT_FOUND"),
    ("none", grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY"),
])
async def test_failed_calls_carry_the_request_id_and_the_error_details(
        api: Api, credentials: str, code: grpc.StatusCode, reason: str) -> None:
    """README: "Every response carries the call's x-request-id in its trailers". A failed call
    keeps it next to its google.rpc details, including a call refused before authentication."""
    stub_ = rpb_grpc.RewardTypeServiceStub(api.channel)
    key = api.key() if credentials == "admin" else ()
    with pytest.raises(grpc.RpcError) as err:
        await stub_.GetRewardType(rpb.GetRewardTypeRequest(name="nope"),
                                  metadata=(*key, ("x-request-id", "trace-77")))
    assert err.value.code() == code
    assert rpc_error_reason(err.value) == reason
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers.get("x-request-id") == "trace-77"


async def test_a_failed_call_without_a_request_id_gets_a_generated_one(api: Api) -> None:
    stub_ = rpb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub_.GetRewardType(rpb.GetRewardTypeRequest(name="nope"), metadata=api.key())
    assert rpc_error_reason(err.value) == "REWARD_TYPE_NOT_FOUND"
    trailers = dict(err.value.trailing_metadata() or ())
    generated = str(trailers.get("x-request-id", ""))
    assert len(generated) == 32 and int(generated, 16) >= 0  # uuid4().hex, as on success


# --- page tokens ------------------------------------------------------------------------------


async def test_a_page_token_without_a_key_is_an_invalid_page_token(api: Api) -> None:
    """Tokens are base64 JSON that a client can decode and edit; one with an empty key list
    (the filters' fingerprint intact) is INVALID_PAGE_TOKEN."""
    stub_ = rpb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub_.ListRewardTypes(rpb.ListRewardTypesRequest(page_token=_page_token([], {})),
                                    metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"
    assert err.value.details() == NOT_OURS


@pytest.mark.parametrize("after", [["not-a-number"], [10**30], [], [1, 2], [True]])
async def test_an_edited_listener_page_token_is_an_invalid_page_token(
        api: Api, after: list[object]) -> None:
    """Listener pages are keyed by a 64-bit id: text, an integer beyond int64, a missing or
    extra part are INVALID_PAGE_TOKEN."""
    stub_ = lpb_grpc.ListenerServiceStub(api.channel)
    token = _page_token(after, {"event_type": None})
    with pytest.raises(grpc.RpcError) as err:
        await stub_.ListListeners(lpb.ListListenersRequest(page_token=token),
                                  metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"
    assert err.value.details() == NOT_OURS


@pytest.mark.parametrize("after", [["x" * 1001], ["a\x00b"], [7]])
async def test_an_edited_text_key_is_an_invalid_page_token(api: Api,
                                                           after: list[object]) -> None:
    """Text keys are at most 1000 characters PostgreSQL can store (no NUL)."""
    stub_ = rpb_grpc.RewardTypeServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub_.ListRewardTypes(rpb.ListRewardTypesRequest(
            page_token=_page_token(after, {})), metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("after", [["yesterday", 1], ["2026-10-01T00:00:00", 1],
                                   ["2026-10-01T00:00:00+00:00", "1"]])
async def test_an_edited_event_page_token_is_an_invalid_page_token(
        api: Api, after: list[object]) -> None:
    """Event pages are keyed by (an instant with a UTC offset, a 64-bit id)."""
    await _customer(api)
    token = _page_token(after, {"customer_id": "p1", "kinds": []})
    with pytest.raises(grpc.RpcError) as err:
        await cpb_grpc.CustomerServiceStub(api.channel).ListCustomerEvents(
            cpb.ListCustomerEventsRequest(customer_id="p1", page_token=token),
            metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"


# --- settings: clear errors that never echo a secret -----------------------------------------


async def test_a_too_short_api_key_is_refused_without_echoing_it() -> None:
    """Only each problem's setting and message are printed, never pydantic's input_value."""
    secret = "Sh0rt-Secret-42"  # 15 characters: refused, and it is still a secret
    keys = json.dumps([{"name": "a", "roles": ["admin"], "key": secret}])
    code, output = await _promo("migrate", env=_env(PROMO_API_KEYS=keys))
    assert code == 2
    assert output.splitlines() == [
        "invalid settings: PROMO_API_KEYS[0]: API key 'a': a key must be at least 16 "
        "characters"]
    assert secret not in output.replace("\n", "")


async def test_an_invalid_setting_does_not_echo_the_smtp_password() -> None:
    """A model-level check fails; the SMTP password in the same settings is not printed."""
    password = "Xy]9-smtp-relay-password"
    code, output = await _promo("migrate", env=_env(
        PROMO_DB_POOL_MIN_SIZE="20", PROMO_SMTP_HOST="smtp.example.com",
        PROMO_SMTP_FROM="alerts@example.com", PROMO_SMTP_USERNAME="promo",
        PROMO_SMTP_PASSWORD=password))
    assert code == 2
    assert output.splitlines() == [
        "invalid settings: PROMO_DB_POOL_MIN_SIZE must not exceed PROMO_DB_POOL_MAX_SIZE"]
    flat = output.replace("\n", "")
    assert "smtp-relay-password" not in flat and "Xy]9" not in flat


async def test_every_bad_setting_is_one_line() -> None:
    code, output = await _promo("worker", env=_env(
        PROMO_GRPC_PORT="70000", PROMO_LOG_LEVEL="LOUD",
        PROMO_API_KEYS='[{"name": "crm", "roles": ["boss"], "key_sha256": "' + "a" * 64 + '"}]'))
    assert code == 2
    assert output.splitlines() == [
        "invalid settings: PROMO_GRPC_PORT: Input should be less than or equal to 65535",
        "invalid settings: PROMO_API_KEYS[0].roles: unknown role(s) ['boss']; known roles are "
        "['admin', 'listener', 'runtime']",
        "invalid settings: PROMO_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or "
        "'ERROR'"]


@pytest.mark.parametrize("problem", ["missing", "not-pem", "other-key"])
async def test_bad_tls_files_stop_serve_with_one_line_naming_the_setting(
        database_url: str, tmp_path: Path, problem: str) -> None:
    """A missing certificate, a file that is not PEM, or a key of another certificate is a
    settings problem: one line naming the setting and the file, exit status 2, no traceback."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if problem == "not-pem":
        cert.write_text("not a certificate\n")
        key.write_text("not a key\n")
    elif problem == "other-key":
        ca = trustme.CA()
        cert.write_bytes(ca.issue_cert("localhost").cert_chain_pems[0].bytes())
        key.write_bytes(ca.issue_cert("localhost").private_key_pem.bytes())
    code, output = await _promo("serve", env=_env(
        PROMO_DATABASE_URL=database_url, PROMO_MIGRATE_ON_START="false", PROMO_GRPC_PORT="0",
        PROMO_TLS_CERT_FILE=str(cert), PROMO_TLS_KEY_FILE=str(key)))
    assert code == 2, output
    expected = {
        "missing": f"PROMO_TLS_CERT_FILE: {cert} does not exist",
        "not-pem": f"PROMO_TLS_CERT_FILE: {cert} holds no PEM certificate "
                   "(-----BEGIN CERTIFICATE----- ...)",
        "other-key": f"PROMO_TLS_KEY_FILE: {key} is not the private key of the first "
                     f"certificate in PROMO_TLS_CERT_FILE ({cert})",
    }[problem]
    assert output.splitlines() == [f"invalid settings: {expected}"]


async def test_promo_up_refuses_an_empty_admin_key_file_with_one_line(
        database_url: str, services: Services, queue_name: str, tmp_path: Path) -> None:
    """An admin-key file too short to be a key (an older version could leave it empty) stops
    `promo up` with one line naming the file, exit status 2; the file is left for the operator."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key_file = data_dir / ADMIN_KEY_FILE
    key_file.touch(mode=0o600)
    code, output = await _promo("up", env=_env(
        PROMO_DATA_DIR=str(data_dir), PROMO_DATABASE_URL=database_url,
        PROMO_REDIS_URL=services.redis_url, PROMO_QUEUE_NAME=queue_name,
        PROMO_MIGRATE_ON_START="false", PROMO_GRPC_PORT="0", PROMO_METRICS_PORT="0",
        PROMO_LOG_FORMAT="text", PROMO_SHUTDOWN_GRACE_SECONDS="1"))
    assert code == 2, output
    assert output.splitlines() == [
        f"error: {key_file} holds no valid key: it holds 0 characters, a key has at least 16; "
        "delete the file and `promo up` creates a new key"]
    assert key_file.read_text() == ""


def test_the_admin_key_file_is_written_whole_with_mode_0600(tmp_path: Path) -> None:
    """Written through a temporary file and a rename: the folder holds the whole key file and
    nothing else, readable by its owner only; the next start reads the same key."""
    key = _local_admin_key(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [ADMIN_KEY_FILE]
    path = tmp_path / ADMIN_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key + "\n" and len(key) >= 16
    assert _local_admin_key(tmp_path) == key


# --- FormulaService -----------------------------------------------------------------------------


async def test_a_variable_given_twice_is_invalid_argument(api: Api) -> None:
    """Two values for one name are a mistake the operator sees, not "the last one wins"."""
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    variables = [fpb.FormulaVariable(name="bonus", value="1"),
                 fpb.FormulaVariable(name="bonus", value="2")]
    with pytest.raises(grpc.RpcError) as err:
        await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
            source="bonus", customer_id="p1", variables=variables), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "variables[1] ('bonus'): the name is given twice"
    info = error_info_of(err.value)
    assert info is not None and info.reason == "FORMULA_INVALID"
    assert dict(info.metadata) == {"field": "variables[1]", "variable": "bonus"}


async def test_a_variable_with_a_value_and_per_currency_values_is_invalid_argument(
        api: Api) -> None:
    """The proto says: leave value empty when per_currency is given. Both given is refused."""
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    variable = fpb.FormulaVariable(name="bonus", value="5", per_currency={"USD": "3"})
    with pytest.raises(grpc.RpcError) as err:
        await stub_.ValidateFormula(fpb.ValidateFormulaRequest(
            source="bonus", variables=[variable]), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "variables[0] ('bonus'): give value or per_currency, not both"
    assert rpc_error_reason(err.value) == "FORMULA_INVALID"


@pytest.mark.parametrize("value", ["1_000", "-1_0", "٣"])
async def test_a_number_a_person_reads_otherwise_is_invalid_argument(api: Api,
                                                                     value: str) -> None:
    """Variable values that start like a number are read as the API reads every amount:
    ASCII digits only ("1_000" is not silently 1000)."""
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub_.ValidateFormula(fpb.ValidateFormulaRequest(
            source="bonus * 2", variables=[fpb.FormulaVariable(name="bonus", value=value)]),
            metadata=api.key())
    if value == "٣":  # no ASCII digit: a text value, never the number 3
        assert rpc_error_reason(err.value) == "FORMULA_INVALID"
        assert err.value.details() == "line 1, column 1: '*' needs a number, but this is text"
        return
    assert rpc_error_reason(err.value) == "INVALID_DECIMAL"
    assert err.value.details() == (f"variables[0].value must be a decimal number such as "
                                   f"10.50, got {value!r}")


async def test_per_currency_variables_follow_the_customer_currency(api: Api) -> None:
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    cap = fpb.FormulaVariable(name="max_bonus", per_currency={"eur": "200", "USD": "250"})
    reply = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="cap(1000, max_bonus)", customer_id="p1", variables=[cap]), metadata=api.key())
    assert (reply.outcome, reply.amount) == (fpb.DRY_RUN_OUTCOME_AMOUNT, "200")
    gbp_only = fpb.FormulaVariable(name="max_bonus", per_currency={"GBP": "180"})
    skipped = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="cap(1000, max_bonus)", customer_id="p1", variables=[gbp_only]),
        metadata=api.key())
    assert skipped.outcome == fpb.DRY_RUN_OUTCOME_SKIPPED
    assert skipped.skip_reason == "MISSING_CURRENCY_VALUE"
    assert skipped.skip_detail == "the variable 'max_bonus' has no value for EUR (it has GBP)"


@pytest.mark.parametrize(("decimals", "expected"), [(0, "34.8"), (1, "34.8"), (2, "34.80")])
async def test_mround_gives_the_seeds_result_whatever_the_decimals(
        api: Api, decimals: int, expected: str) -> None:
    """Seed 000: MROUND(34.75, 0.1) = 34.8. The multiple is written with at least the factor's
    decimal places, so decimals left unset (as `promo formulas dry-run --rounding-factor 0.1`
    sends them) never round it a second time."""
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="34.75", customer_id="p1", rounding=ppb.ROUNDING_MODE_MROUND,
        rounding_factor="0.1", decimals=decimals), metadata=api.key())
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert (reply.value_after_rounding, reply.amount) == (expected, expected)


@pytest.mark.parametrize(("value", "rounding", "decimals", "expected"), [
    # Seed 004's table (Round Down / Up / to Nearest, 2 and 0 decimals) and seed 000's.
    ("2.735", ppb.ROUNDING_MODE_ROUND_DOWN, 2, "2.73"),
    ("2.735", ppb.ROUNDING_MODE_ROUND_UP, 2, "2.74"),
    ("2.735", ppb.ROUNDING_MODE_ROUND, 2, "2.74"),
    ("2.734", ppb.ROUNDING_MODE_ROUND, 2, "2.73"),
    ("2.735", ppb.ROUNDING_MODE_ROUND_DOWN, 0, "2"),
    ("2.735", ppb.ROUNDING_MODE_ROUND_UP, 0, "3"),
    ("2.735", ppb.ROUNDING_MODE_ROUND, 0, "3"),
    ("5.789", ppb.ROUNDING_MODE_ROUND_DOWN, 2, "5.78"),
])
async def test_dry_run_rounds_as_the_seeds_tables(api: Api, value: str, rounding: int,
                                                  decimals: int, expected: str) -> None:
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source=value, customer_id="p1", rounding=rounding, decimals=decimals),
        metadata=api.key())
    assert (reply.raw_value, reply.amount) == (value, expected)


async def test_no_round_reports_the_raw_value_it_keeps(api: Api) -> None:
    """"No Round: keeps the exact calculated value": the raw value shows every digit the
    amount has, so the two agree."""
    await _customer(api)
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="100 / 3", customer_id="p1"), metadata=api.key())
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert reply.raw_value == reply.value_after_rounding == reply.amount
    assert len(reply.amount.replace(".", "")) > 28


async def test_fixed_dates_of_a_31_day_month_across_dst_are_allowed_in_their_zone(
        api: Api, clock: FixedClock) -> None:
    """October in Europe/Berlin has 31 days (31 days and 1 hour of absolute time, because of
    the DST change). Given as fixed dates with time_zone Europe/Berlin it is allowed, and reads
    the same window as LAST_FULL_MONTH in the customer's zone; without a zone (UTC) the same
    instants are 31 days and 1 hour, over the limit."""
    clock.set(datetime(2026, 11, 2, 9, 0, tzinfo=UTC))
    await _customer(api, ("deposit", "100", datetime(2026, 10, 31, 22, 30, tzinfo=UTC)))
    stub_ = fpb_grpc.FormulaServiceStub(api.channel)
    reply = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="sum(deposit.amount)", customer_id="p1",
        period=_october_in_berlin("Europe/Berlin")), metadata=api.key())
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert [a.value for a in reply.aggregates] == ["100.000000"]
    assert (reply.window_end.ToDatetime() - reply.window_start.ToDatetime()
            == timedelta(days=31, hours=1))
    relative = await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
        source="sum(deposit.amount)", customer_id="p1", period=fpb.TransactionPeriod(
            relative=fpb.TransactionPeriod.Relative(kind=fpb.RELATIVE_KIND_LAST_FULL_MONTH))),
        metadata=api.key())
    assert (relative.window_start, relative.window_end) == (reply.window_start,
                                                            reply.window_end)
    with pytest.raises(grpc.RpcError) as err:
        await stub_.DryRunFormula(fpb.DryRunFormulaRequest(
            source="sum(deposit.amount)", customer_id="p1", period=_october_in_berlin("")),
            metadata=api.key())
    assert rpc_error_reason(err.value) == "PERIOD_TOO_LONG"
    assert err.value.details() == ("the transaction period is 31 days and 1 hour long; the "
                                   "limit is 31 days")


async def test_an_unknown_time_zone_of_fixed_dates_is_invalid_argument(api: Api) -> None:
    await _customer(api)
    with pytest.raises(grpc.RpcError) as err:
        await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(fpb.DryRunFormulaRequest(
            source="sum(deposit.amount)", customer_id="p1",
            period=_october_in_berlin("Europe/Atlantis")), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "INVALID_TIME_ZONE"
    assert err.value.details() == ("unknown time zone 'Europe/Atlantis' in "
                                   "period.fixed.time_zone; use an IANA name such as "
                                   "'Europe/Berlin'")


async def test_a_bonus_definition_keeps_the_time_zone_of_its_fixed_dates(api: Api) -> None:
    """Bonus definitions read periods through the same conversion, and give the zone back."""
    created = await create(api, definition("october", "sum(deposit.amount) * 10%",
                                           period=_october_in_berlin("Europe/Berlin")))
    assert created.period.fixed.time_zone == "Europe/Berlin"
    got = await stub(api).GetBonusDefinition(bpb.GetBonusDefinitionRequest(
        definition_id="october"), metadata=api.key())
    assert got.definition.period == _october_in_berlin("Europe/Berlin")
