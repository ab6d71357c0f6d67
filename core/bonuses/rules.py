"""Triggers: real-time automation rules and weekly schedules that request bonus calculations.

Automation rule (seed 004: "5% of net loss for every 100 bets on Gold Quest"): every ``every``
events of ``event_kind`` matching ``filters`` fire one calculation request for the customer
(accumulation: the count carries over between recording calls and restarts after each firing).
An optional qualification (e.g. a deposit of at least 100 EUR) must come first; with
``max_executions`` the rule fires at most that many times per qualification, after which a new
qualifying event is needed ("three times, then a new deposit"). Events that arrive while the
customer is not qualified are not counted. The minimum amount is money, so it has a currency:
the qualification's ``currency`` when set (only events in it qualify: no exchange rates), or
else the customer's own currency, the way the definitions' per-currency variables resolve: 100
JPY never meets "at least 100 EUR". Only when neither the rule nor the customer names a currency
is the amount compared as it is (nothing says which currency is meant; set the rule's currency
to rule that out).

The transaction period of a rule's request (the seed's table for automation rules):

* ``DEFINITION``: the definition's own period (fixed dates, time back, relative with a zone),
  resolved when the rule fires;
* ``FIRST_TO_LAST``: from the first to the last event the firing counted (inclusive);
* ``QUALIFICATION_TO_LAST``: from the qualifying event to the last counted event;
* ``FIRST_TO_FIXED_END`` / ``QUALIFICATION_TO_FIXED_END``: from the first counted event / the
  qualification to a fixed end date.

A window longer than 31 days is not refused here (the events have already happened): the batch
skips such a request with INVALID_PERIOD, the vendor's third failure case.

A rule whose window has a fixed end (the two fixed end modes, or ``DEFINITION`` with a
definition of fixed dates) stops at that end: an event at or after it neither counts nor
qualifies (``counting_end``). Otherwise a firing after the end would ask for a window that ends
before it starts (or, with fixed dates, pay the same window's events again).

Request keys (unique per definition, so a retried call adds nothing): an API request's is
``<request_id>/<customer>`` (the request id's '/' and '%' escaped), a rule firing's
``rule:<rule_id>:<n>/<customer>``, a schedule run's
``schedule:<schedule_id>:<run time>/<customer>``. API request ids starting with one of the
trigger prefixes are refused (``check_api_request_id``), so the three can never meet;
stored keys keep their format.

Schedule (seed 004: "every Monday, 10% of all deposits made during the weekend"): on a weekday
(or every day) at a local time in a fixed zone, one request per listed customer, or per customer
of a campaign's target group; a definition period such as "last weekend" without a zone then
resolves in each customer's own zone.

Editing (UpdateBonusRule / UpdateBonusSchedule, by update mask): every field but the id and
the output-only ones. A rule whose counting condition changes (``RULE_COUNTING_FIELDS``) starts
every customer's count again, since counts made under the old condition must not fire the new
one; other changes (qualification, limit, period) apply from the next event or firing. A
schedule whose timing changes (``SCHEDULE_TIMING_FIELDS``) gets its next run computed again from
the time of the edit.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from core.customers import currency_problem
from core.errors import InvalidArgument
from core.formula import EventRecord, Filter, compile_formula, filter_matches
from core.periods import FixedPeriod, Period, load_time_zone

RULE_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
KIND = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")
MAX_EVERY = 1_000_000
INCLUSIVE = timedelta(microseconds=1)
"""Windows are half-open [start, end): the last counted event is included by ending just
after it."""


class PeriodMode(enum.Enum):
    DEFINITION = "DEFINITION"
    FIRST_TO_LAST = "FIRST_TO_LAST"
    QUALIFICATION_TO_LAST = "QUALIFICATION_TO_LAST"
    FIRST_TO_FIXED_END = "FIRST_TO_FIXED_END"
    QUALIFICATION_TO_FIXED_END = "QUALIFICATION_TO_FIXED_END"


def _bad(field: str, message: str, reason: str = "INVALID_BONUS_RULE") -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", reason=reason, metadata={"field": field})


# Update masks (BonusRule / BonusSchedule field names): all but ids and output-only fields.
RULE_UPDATABLE = ("definition_id", "event_kind", "filter", "every", "qualification_kind",
                  "qualification_min_amount", "qualification_filter", "max_executions",
                  "period_mode", "period_end", "active", "qualification_currency")
RULE_COUNTING_FIELDS = frozenset({"event_kind", "filter", "every"})
SCHEDULE_UPDATABLE = ("definition_id", "customer_ids", "campaign_id", "since_campaign_entrance",
                      "weekday", "local_time", "time_zone", "active")
SCHEDULE_TIMING_FIELDS = frozenset({"weekday", "local_time", "time_zone"})


def check_update_mask(paths: Sequence[str], updatable: Sequence[str]) -> list[str]:
    """The mask's paths, each once; an empty mask, or a path naming an id, an output-only or
    unknown field, is refused with the path."""
    if not paths:
        raise InvalidArgument("update_mask must name at least one field",
                              reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
    for path in paths:
        if path not in updatable:
            raise InvalidArgument(
                f"update_mask: {path!r} cannot be updated; updatable fields: "
                f"{', '.join(updatable)}", reason="INVALID_UPDATE_MASK",
                metadata={"field": "update_mask", "path": path})
    return list(dict.fromkeys(paths))


# --- request keys ----------------------------------------------------------------------------

RULE_KEY_PREFIX = "rule:"
SCHEDULE_KEY_PREFIX = "schedule:"
RESERVED_REQUEST_ID_PREFIXES = (RULE_KEY_PREFIX, SCHEDULE_KEY_PREFIX)


def rule_request_key(rule_id: str, firing: int, customer_id: str) -> str:
    return f"{RULE_KEY_PREFIX}{rule_id}:{firing}/{customer_id}"


def schedule_request_key(schedule_id: str, run_at: datetime, customer_id: str) -> str:
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:{run_at.isoformat()}/{customer_id}"


def api_request_key(request_id: str, customer_id: str) -> str:
    """An API request's key; ``request_id`` passed ``check_api_request_id``.

    The request id's own '/' and '%' are escaped ('%2F', '%25'), so the key's first '/' always
    ends the request id: customer ids may contain '/', and unescaped, request "a" for customer
    "b/c" and request "a/b" for customer "c" would share "a/b/c" (the second silently dropped).
    Ids without those two characters (all keys stored before) keep their key."""
    escaped = request_id.replace("%", "%25").replace("/", "%2F")
    return f"{escaped}/{customer_id}"


def check_api_request_id(request_id: str) -> str:
    """Refuse a RequestBonusCalculation request_id that starts like a trigger's request key:
    "rule:x:1" would take rule x's first firing's key for every customer it names, and the
    firing would then add nothing. A key ``<request_id>/...`` starts with a reserved prefix
    only if the request id does (the '/' comes after it), so this check is enough."""
    if request_id.startswith(RESERVED_REQUEST_ID_PREFIXES):
        prefixes = ", ".join(repr(p) for p in RESERVED_REQUEST_ID_PREFIXES)
        raise InvalidArgument(
            f"request_id {request_id[:100]!r} starts with a prefix reserved for the requests "
            f"of automation rules and schedules ({prefixes}); use another request_id",
            reason="INVALID_REQUEST_ID", metadata={"field": "request_id"})
    return request_id


@dataclass(frozen=True)
class Qualification:
    kind: str
    min_amount: Decimal | None = None
    filters: tuple[Filter, ...] = ()
    # ISO 4217: only events in it qualify. None: a min amount is in the customer's currency.
    currency: str | None = None


@dataclass(frozen=True)
class Rule:
    rule_id: str
    definition_id: str
    event_kind: str
    every: int
    filters: tuple[Filter, ...] = ()
    qualification: Qualification | None = None
    max_executions: int | None = None
    period_mode: PeriodMode = PeriodMode.DEFINITION
    period_end: datetime | None = None
    active: bool = True


def check_rule_period_fits(rule: Rule, *, reads_transactions: bool) -> None:
    """A rule of a definition that reads customer properties only has no transaction period
    to choose: any period mode but the definition's own would be silently ignored, so it is
    refused (a period_end needs a fixed-end mode, which validate_rule checks)."""
    if reads_transactions:
        return
    if rule.period_mode is not PeriodMode.DEFINITION:
        raise _bad("period_mode", f"{rule.period_mode.value} is a transaction period, but "
                   f"definition {rule.definition_id!r} reads customer properties only: leave "
                   "period_mode unset", "INVALID_PERIOD")


def validate_rule(rule: Rule) -> Rule:
    if not RULE_ID.match(rule.rule_id):
        raise _bad("rule_id", "must be 1-64 characters: lower-case letters, digits, '_', '.', "
                   f"'-', starting with a letter or digit; got {rule.rule_id!r}", "INVALID_ID")
    if not KIND.match(rule.event_kind):
        raise _bad("event_kind", f"{rule.event_kind!r} is not an event kind", "INVALID_KIND")
    if not 1 <= rule.every <= MAX_EVERY:
        raise _bad("every", f"must be between 1 and {MAX_EVERY}, got {rule.every}")
    q = rule.qualification
    if q is not None:
        if not KIND.match(q.kind):
            raise _bad("qualification.kind", f"{q.kind!r} is not an event kind", "INVALID_KIND")
        if q.min_amount is not None and q.min_amount < 0:
            raise _bad("qualification.min_amount", "must not be negative")
        if q.currency is not None and (problem := currency_problem(q.currency,
                                                                   required=True)):
            raise _bad("qualification.currency", problem.removeprefix("currency "))
    if rule.max_executions is not None:
        if q is None:
            raise _bad("max_executions", "limits executions per qualification: set a "
                       "qualification too")
        if rule.max_executions < 1:
            raise _bad("max_executions", f"must be at least 1, got {rule.max_executions}")
    needs_qualification = rule.period_mode in (PeriodMode.QUALIFICATION_TO_LAST,
                                               PeriodMode.QUALIFICATION_TO_FIXED_END)
    if needs_qualification and q is None:
        raise _bad("period_mode", f"{rule.period_mode.value} needs a qualification")
    fixed_end = rule.period_mode in (PeriodMode.FIRST_TO_FIXED_END,
                                     PeriodMode.QUALIFICATION_TO_FIXED_END)
    if fixed_end and rule.period_end is None:
        raise _bad("period_end", f"is required for {rule.period_mode.value}", "MISSING_FIELD")
    if not fixed_end and rule.period_end is not None:
        raise _bad("period_end", f"applies only to the fixed end modes, not "
                   f"{rule.period_mode.value}")
    if rule.period_end is not None and rule.period_end.tzinfo is None:
        raise _bad("period_end", "must be timezone-aware")
    return rule


@dataclass(frozen=True)
class RuleState:
    """One customer's progress on one rule."""

    accumulated: int = 0
    first_event_at: datetime | None = None  # the earliest counted event (events may arrive
    last_event_at: datetime | None = None  # out of order), and the latest
    qualified_at: datetime | None = None
    executions: int = 0  # since the last qualification
    fired: int = 0  # ever: numbers each firing (its request key)


@dataclass(frozen=True)
class Firing:
    number: int
    period: tuple[datetime, datetime] | None  # None: the definition's period


def _matches(filters: Sequence[Filter], event: EventRecord) -> bool:
    return all(filter_matches(f, event) for f in filters)


def qualifies(q: Qualification, event: EventRecord, customer_currency: str | None = None
              ) -> bool:
    """Whether ``event`` qualifies. Only an event in the qualification's currency does, or
    else, with a minimum amount, one in the customer's currency (neither known: any)."""
    if event.kind != q.kind:
        return False
    currency = q.currency or (customer_currency if q.min_amount is not None else None)
    if currency is not None and event.currency != currency:
        return False
    return ((q.min_amount is None or event.amount >= q.min_amount)
            and _matches(q.filters, event))


def counting_end(rule: Rule, definition_period: Period | None) -> datetime | None:
    """The instant from which the rule's events no longer count nor qualify: its fixed end
    date, or in DEFINITION mode the end of the definition's fixed dates (every firing would
    compute that same window); None when the window moves with the firing."""
    if rule.period_mode in (PeriodMode.FIRST_TO_FIXED_END, PeriodMode.QUALIFICATION_TO_FIXED_END):
        return rule.period_end
    if rule.period_mode is PeriodMode.DEFINITION and isinstance(definition_period, FixedPeriod):
        return definition_period.end
    return None


def _period(rule: Rule, state: RuleState, last: datetime) -> tuple[datetime, datetime] | None:
    mode = rule.period_mode
    if mode is PeriodMode.DEFINITION:
        return None
    start = state.first_event_at if mode in (PeriodMode.FIRST_TO_LAST,
                                             PeriodMode.FIRST_TO_FIXED_END) else state.qualified_at
    assert start is not None
    if mode in (PeriodMode.FIRST_TO_LAST, PeriodMode.QUALIFICATION_TO_LAST):
        return start, max(start, last) + INCLUSIVE
    assert rule.period_end is not None
    return start, rule.period_end


def apply_event(rule: Rule, state: RuleState, event: EventRecord, *,
                customer_currency: str | None = None,
                definition_period: Period | None = None) -> tuple[RuleState, Firing | None]:
    """The state after ``event`` (events of one customer in time order), and the firing it
    caused, if any. ``customer_currency``: the customer's, for a minimum amount without a
    currency of its own; ``definition_period``: the rule's definition's (see counting_end)."""
    end = counting_end(rule, definition_period)
    if end is not None and event.occurred_at >= end:
        return state, None
    q = rule.qualification
    if q is not None and qualifies(q, event, customer_currency):
        # A new qualification: the execution limit starts again, the accumulation too.
        state = replace(state, qualified_at=event.occurred_at, executions=0, accumulated=0,
                        first_event_at=None, last_event_at=None)
    if event.kind != rule.event_kind or not _matches(rule.filters, event):
        return state, None
    if q is not None:
        if state.qualified_at is None:
            return state, None
        if rule.max_executions is not None and state.executions >= rule.max_executions:
            return state, None
    at = event.occurred_at
    first = at if state.first_event_at is None else min(state.first_event_at, at)
    last = at if state.last_event_at is None else max(state.last_event_at, at)
    state = replace(state, accumulated=state.accumulated + 1, first_event_at=first,
                    last_event_at=last)
    if state.accumulated < rule.every:
        return state, None
    period = _period(rule, state, last)
    fired = state.fired + 1
    state = replace(state, accumulated=0, first_event_at=None, last_event_at=None,
                    executions=state.executions + 1, fired=fired)
    return state, Firing(number=fired, period=period)


# --- schedules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    schedule_id: str
    definition_id: str
    customer_ids: tuple[str, ...]
    weekday: int | None  # 1 = Monday ... 7 = Sunday; None = every day
    local_time: time
    time_zone: str
    active: bool = True
    campaign_id: str | None = None  # instead of customer_ids: the campaign's target group
    # With campaign_id: the period runs from the campaign's execution (the customers' entrance
    # into it) to the run ("from campaign entrance till now"), not the definition's period.
    since_campaign_entrance: bool = False


MAX_SCHEDULE_CUSTOMERS = 100_000
# The schedule comes back in every answer about it (create, get, update, list), and a gRPC
# client refuses answers over 4 MiB by default: 100,000 ids of 48 characters were a 5 MB answer
# to a create that had succeeded. The ids' UTF-8 bytes are capped below that instead (about
# 100,000 ids of up to 29 characters); a campaign's target group (campaign_id) has no such cap.
MAX_SCHEDULE_CUSTOMER_BYTES = 3 * 1024 * 1024


def validate_schedule(s: Schedule) -> Schedule:
    if not RULE_ID.match(s.schedule_id):
        raise _bad("schedule_id", "must be 1-64 characters: lower-case letters, digits, '_', "
                   f"'.', '-', starting with a letter or digit; got {s.schedule_id!r}",
                   "INVALID_ID")
    if s.campaign_id and s.customer_ids:
        raise _bad("customer_ids", "give customer_ids or campaign_id, not both")
    if not s.customer_ids and not s.campaign_id:
        raise _bad("customer_ids", "must name at least one customer (or give campaign_id)",
                   "MISSING_FIELD")
    if len(s.customer_ids) > MAX_SCHEDULE_CUSTOMERS:
        raise _bad("customer_ids", f"at most {MAX_SCHEDULE_CUSTOMERS} customers")
    size = sum(len(c.encode()) + 2 for c in s.customer_ids)  # as the answer encodes them
    if size > MAX_SCHEDULE_CUSTOMER_BYTES:
        raise _bad("customer_ids", f"the customer ids take {size:,} bytes, more than the "
                   f"{MAX_SCHEDULE_CUSTOMER_BYTES:,} a schedule can hold (every answer carries "
                   "them); split the customers over several schedules or use a campaign's "
                   "target group (campaign_id)")
    if len(set(s.customer_ids)) != len(s.customer_ids):
        raise _bad("customer_ids", "names a customer more than once", "DUPLICATE_ID")
    if s.since_campaign_entrance and not s.campaign_id:
        raise _bad("since_campaign_entrance", "needs campaign_id")
    if s.weekday is not None and not 1 <= s.weekday <= 7:
        raise _bad("weekday", f"must be 1 (Monday) to 7 (Sunday), got {s.weekday}")
    load_time_zone(s.time_zone)
    return s


def next_run(s: Schedule, after: datetime) -> datetime:
    """The first run strictly after ``after``: the local time on the weekday, in the zone."""
    zone = ZoneInfo(s.time_zone)
    local = after.astimezone(zone)
    day: date = local.date()
    for offset in range(0, 9):
        candidate_day = day + timedelta(days=offset)
        if s.weekday is not None and candidate_day.isoweekday() != s.weekday:
            continue
        candidate = datetime.combine(candidate_day, s.local_time, tzinfo=zone)
        if candidate > after:
            return candidate
    raise AssertionError("a weekly schedule always runs within 8 days")  # pragma: no cover


def compile_filter(kind: str, text: str, *, field: str) -> tuple[Filter, ...]:
    """Filter text in the formula's ``where`` syntax (``game = "Gold Quest" and
    game_category != "Roulette"``) as filters; errors name ``field`` with the column in
    ``text``."""
    if not text.strip():
        return ()
    if "\n" in text:
        raise _bad(field, "must be one line")
    prefix = f"count({kind} where "
    try:
        compiled = compile_formula(f"{prefix}{text})")
    except InvalidArgument as exc:
        column = max(1, int(exc.metadata.get("column", "1")) - len(prefix))
        detail = exc.message.split(": ", 1)[-1] if exc.message.startswith("line ") else \
            exc.message
        raise InvalidArgument(f"{field}: column {column}: {detail}", reason=exc.reason,
                              metadata={"field": field, "column": column}) from exc
    [spec] = compiled.aggregates
    return spec.filters
