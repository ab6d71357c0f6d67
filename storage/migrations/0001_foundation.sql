-- Foundation: idempotency records, the transactional job outbox, and reward types.

-- Every mutating RPC takes a request id; the first answer is kept here so a retry returns it.
CREATE TABLE idempotency_keys (
    scope        text        NOT NULL,   -- the RPC (or job) the request id belongs to
    request_id   text        NOT NULL,
    request_hash bytea       NOT NULL,   -- fingerprint of the request, to refuse reuse with other input
    response     bytea,                  -- the serialized first answer
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Work that must happen later or elsewhere, written in the same transaction as the change that
-- causes it. Redis only carries a pointer to a row here; the sweeper re-queues anything due.
CREATE TABLE outbox_jobs (
    id            bigserial   PRIMARY KEY,
    kind          text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    dedup_key     text        UNIQUE,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'done', 'dead')),
    due_at        timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 8 CHECK (max_attempts > 0),
    locked_until  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX outbox_jobs_due ON outbox_jobs (due_at) WHERE status = 'pending';

CREATE TABLE reward_types (
    id           bigserial   PRIMARY KEY,
    name         text        NOT NULL UNIQUE,
    display_name text        NOT NULL,
    description  text        NOT NULL DEFAULT '',
    image_url    text        NOT NULL DEFAULT '',
    category     text        NOT NULL CHECK (category IN ('AMOUNT', 'UNITS')),
    min_value    numeric(20, 6),
    max_value    numeric(20, 6),
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now(),
    CHECK (min_value IS NULL OR max_value IS NULL OR min_value <= max_value)
);
