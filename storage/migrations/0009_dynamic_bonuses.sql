-- Dynamic bonuses (seed 004): definitions, calculation requests in batching windows, batches
-- with their cost, results (the approval queue, kept 30 days) and the per-customer ledger of
-- issued rewards (kept).

CREATE TABLE bonus_definitions (
    id                   bigserial     PRIMARY KEY,
    definition_id        text          NOT NULL UNIQUE,
    display_name         text          NOT NULL DEFAULT '',
    formula_source       text          NOT NULL,
    -- CompiledFormula.to_stored(): the versioned, validated tree the batches run.
    formula_stored       jsonb         NOT NULL,
    result_type          text          NOT NULL CHECK (result_type IN
                             ('AMOUNT', 'BONUS_TEMPLATE', 'POINTS', 'GEMS', 'DIAMONDS')),
    points_target        text          CHECK (points_target IN
                             ('BALANCE', 'LEADERBOARD', 'LEVEL_PROGRESS')),
    min_allowed          numeric(20,6),
    cap_amount           numeric(20,6),
    rounding             text          NOT NULL,
    decimals             integer       NOT NULL,
    rounding_factor      numeric(20,6),
    data_mode            text          NOT NULL CHECK (data_mode IN
                             ('TRANSACTIONS_AND_PROPERTIES', 'PROPERTIES_ONLY')),
    period               jsonb,        -- core.periods.period_to_dict, NULL for PROPERTIES_ONLY
    approval_mode        text          NOT NULL CHECK (approval_mode IN ('AUTOMATIC', 'MANUAL')),
    batch_window_seconds integer       CHECK (batch_window_seconds BETWEEN 1 AND 86400),
    skipped_message      text          NOT NULL DEFAULT '',
    calculated_message   text          NOT NULL DEFAULT '',
    issued_message       text          NOT NULL DEFAULT '',
    revision             bigint        NOT NULL DEFAULT 1,
    create_time          timestamptz   NOT NULL,
    update_time          timestamptz   NOT NULL
);

-- One row per (definition, batching window): its cost once computed.
CREATE TABLE bonus_batches (
    id              bigserial   PRIMARY KEY,
    definition_pk   bigint      NOT NULL REFERENCES bonus_definitions (id),
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    request_count   integer     NOT NULL DEFAULT 0,
    customer_count  integer     NOT NULL DEFAULT 0,
    events_read     bigint      NOT NULL DEFAULT 0,
    duration_ms     bigint      NOT NULL DEFAULT 0,
    finish_time     timestamptz,
    UNIQUE (definition_pk, window_start)
);

-- A calculation request for one customer. request_key is unique per definition, so a retried
-- request (or a trigger firing twice for the same reason) adds nothing.
CREATE TABLE bonus_requests (
    id              bigserial   PRIMARY KEY,
    definition_pk   bigint      NOT NULL REFERENCES bonus_definitions (id),
    request_key     text        NOT NULL,
    -- Checked against customers when requested; no foreign key, like the other per-customer
    -- tables here (customers are never deleted, and bulk tools may truncate them).
    customer_id     text        NOT NULL,
    window_start    timestamptz NOT NULL,
    request_time    timestamptz NOT NULL,
    -- The transaction window to read, resolved when requested (NULL: properties only).
    period_start    timestamptz,
    period_end      timestamptz,
    source          text        NOT NULL DEFAULT 'api',
    status          text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DONE')),
    UNIQUE (definition_pk, request_key)
);
CREATE INDEX bonus_requests_pending ON bonus_requests (definition_pk, window_start, id)
    WHERE status = 'PENDING';
CREATE INDEX bonus_requests_time ON bonus_requests (request_time);

-- At most one result per request: a batch retried after a crash cannot calculate twice.
CREATE TABLE bonus_results (
    id                  bigserial     PRIMARY KEY,
    bonus_id            uuid          NOT NULL UNIQUE,
    request_pk          bigint        NOT NULL UNIQUE REFERENCES bonus_requests (id)
                                      ON DELETE CASCADE,
    definition_pk       bigint        NOT NULL REFERENCES bonus_definitions (id),
    batch_pk            bigint        REFERENCES bonus_batches (id) ON DELETE SET NULL,
    customer_id         text          NOT NULL,
    status              text          NOT NULL CHECK (status IN
                            ('SKIPPED', 'CALCULATED', 'ISSUED', 'REJECTED')),
    result_type         text          NOT NULL,
    points_target       text,
    amount              numeric(20,6),
    template            text,
    skip_reason         text,
    skip_detail         text,
    raw_value           text,
    currency            text,
    period_start        timestamptz,
    period_end          timestamptz,
    aggregates          jsonb         NOT NULL DEFAULT '[]'::jsonb,
    aggregate_kinds     text[]        NOT NULL DEFAULT '{}',
    branch              text,
    explanation         text          NOT NULL DEFAULT '',
    definition_revision bigint        NOT NULL,
    calculation_count   integer       NOT NULL DEFAULT 1,
    calculate_time      timestamptz   NOT NULL,
    decide_time         timestamptz,
    decided_by          text,
    reject_reason       text
);
CREATE INDEX bonus_results_queue ON bonus_results (definition_pk, status, id);
CREATE INDEX bonus_results_customer ON bonus_results (customer_id, id);
CREATE INDEX bonus_results_time ON bonus_results (calculate_time);

-- Issued rewards, once per result (bonus_id), kept after the results are purged.
CREATE TABLE bonus_ledger (
    id              bigserial     PRIMARY KEY,
    bonus_id        uuid          NOT NULL UNIQUE,
    customer_id     text          NOT NULL,
    definition_id   text          NOT NULL,
    result_type     text          NOT NULL,
    points_target   text,
    amount          numeric(20,6),
    template        text,
    source          text          NOT NULL DEFAULT 'DYNAMIC_FORMULA',
    issue_time      timestamptz   NOT NULL
);
CREATE INDEX bonus_ledger_customer ON bonus_ledger (customer_id, id);

-- Triggers. Automation rules: every N matching events (with accumulation), after an optional
-- qualification, at most max_executions times per qualification. Filters are kept as the text
-- the operator wrote (formula filter syntax) and compiled when loaded.
CREATE TABLE bonus_rules (
    id                    bigserial   PRIMARY KEY,
    rule_id               text        NOT NULL UNIQUE,
    definition_pk         bigint      NOT NULL REFERENCES bonus_definitions (id),
    event_kind            text        NOT NULL,
    event_filter          text        NOT NULL DEFAULT '',
    every_n               integer     NOT NULL CHECK (every_n >= 1),
    qualification_kind    text,
    qualification_min     numeric(20,6),
    qualification_filter  text        NOT NULL DEFAULT '',
    max_executions        integer     CHECK (max_executions >= 1),
    period_mode           text        NOT NULL,
    period_end            timestamptz,
    active                boolean     NOT NULL DEFAULT true,
    create_time           timestamptz NOT NULL
);
CREATE INDEX bonus_rules_kind ON bonus_rules (event_kind) WHERE active;
CREATE INDEX bonus_rules_qualification ON bonus_rules (qualification_kind) WHERE active;

CREATE TABLE bonus_rule_states (
    rule_pk         bigint      NOT NULL REFERENCES bonus_rules (id),
    customer_id     text        NOT NULL,
    accumulated     integer     NOT NULL DEFAULT 0,
    first_event_at  timestamptz,
    last_event_at   timestamptz,
    qualified_at    timestamptz,
    executions      integer     NOT NULL DEFAULT 0,
    fired           integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (rule_pk, customer_id)
);

-- Scheduled runs: at a local time (on a weekday, or daily) a request for each listed customer,
-- or for each customer of a campaign's target group (approved ones, if it is conditional).
CREATE TABLE bonus_schedules (
    id              bigserial   PRIMARY KEY,
    schedule_id     text        NOT NULL UNIQUE,
    definition_pk   bigint      NOT NULL REFERENCES bonus_definitions (id),
    customer_ids    text[]      NOT NULL,
    campaign_pk     bigint      REFERENCES campaigns (id),
    -- With a campaign: read events from the campaign's execution (the customers' entrance)
    -- until the run, instead of the definition's period.
    since_campaign_entrance boolean NOT NULL DEFAULT false,
    weekday         integer     CHECK (weekday BETWEEN 1 AND 7),
    local_time      time        NOT NULL,
    time_zone       text        NOT NULL,
    next_run_at     timestamptz NOT NULL,
    last_run_at     timestamptz,
    active          boolean     NOT NULL DEFAULT true,
    create_time     timestamptz NOT NULL
);
CREATE INDEX bonus_schedules_due ON bonus_schedules (next_run_at) WHERE active;
