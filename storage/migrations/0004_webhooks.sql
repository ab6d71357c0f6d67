-- Webhook listeners, the events they receive, one delivery per (event, listener), and the log
-- of every HTTP attempt. Each delivery is carried by an outbox job (kind 'webhook.deliver').

-- Who wants which event. The secret is kept in clear: the sender needs it to sign. After a
-- rotation the previous secret still signs (as a second v1= value) for a grace period, so a
-- listener can switch its configuration without dropping deliveries.
CREATE TABLE webhook_listeners (
    id                bigserial   PRIMARY KEY,
    event_type        integer     NOT NULL,
    url               text        NOT NULL,
    secret            text        NOT NULL,
    previous_secret   text,
    secret_rotated_at timestamptz,
    active            boolean     NOT NULL DEFAULT true,
    description       text        NOT NULL DEFAULT '',
    create_time       timestamptz NOT NULL DEFAULT now(),
    update_time       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_listeners_active_type ON webhook_listeners (event_type) WHERE active;

-- One row per emitted event, written in the transaction of the change that caused it. body is
-- the exact JSON sent (and signed), so every attempt and redelivery sends the same bytes.
CREATE TABLE webhook_events (
    id          bigserial   PRIMARY KEY,
    event_id    uuid        NOT NULL UNIQUE,     -- Promo-Event-Id: listeners de-duplicate on it
    event_type  integer     NOT NULL,
    dedup_key   text        UNIQUE,              -- a second emit with the same key is a no-op
    body        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    deliver_by  timestamptz,                     -- NULL: occurred_at + PROMO_WEBHOOK_DEADLINE_SECONDS
    create_time timestamptz NOT NULL DEFAULT now()
);

-- One row per (event, listener). listener_id has no foreign key on purpose: unregistering a
-- listener cancels its pending deliveries but keeps their history listable.
CREATE TABLE webhook_deliveries (
    id                bigserial   PRIMARY KEY,
    event_id          bigint      NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    listener_id       bigint      NOT NULL,
    status            text        NOT NULL DEFAULT 'PENDING'
                      CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED', 'DEAD', 'CANCELLED')),
    outbox_job_id     bigint,                    -- the job carrying the current run
    run_started_at    timestamptz NOT NULL,      -- emit time, or the last redelivery's
    deliver_by        timestamptz,               -- NULL: run_started_at + the deadline setting
    attempts          integer     NOT NULL DEFAULT 0,
    last_status_code  integer,
    last_error        text,
    last_latency_ms   double precision,
    delivered_at      timestamptz,
    create_time       timestamptz NOT NULL DEFAULT now(),
    update_time       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, listener_id)
);
CREATE INDEX webhook_deliveries_listener ON webhook_deliveries (listener_id, id);
CREATE INDEX webhook_deliveries_status ON webhook_deliveries (status, id);
CREATE INDEX webhook_deliveries_pending_listener ON webhook_deliveries (listener_id)
    WHERE status = 'PENDING';

-- Every HTTP attempt. An attempt whose worker died mid-call keeps finished_at NULL until the next
-- attempt of the delivery marks it interrupted.
CREATE TABLE webhook_attempts (
    id            bigserial   PRIMARY KEY,
    delivery_id   bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt       integer     NOT NULL,          -- 1, 2, ... over the delivery's whole life
    outbox_job_id bigint,
    url           text        NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    status_code   integer,
    error         text,
    latency_ms    double precision,
    UNIQUE (delivery_id, attempt)
);
