-- Scheduled campaigns, their target groups and approvals (conditional execution, seed 001).

CREATE TABLE campaigns (
    id             bigserial   PRIMARY KEY,
    campaign_id    text        NOT NULL UNIQUE,
    name           text        NOT NULL,
    execute_at     timestamptz NOT NULL,   -- ClearanceRequiredBy
    conditional    boolean     NOT NULL,
    status         text        NOT NULL CHECK (status IN ('SCHEDULED', 'AWAITING_CLEARANCE',
                                                          'EXECUTED', 'CANCELLED')),
    target_count   integer     NOT NULL DEFAULT 0,
    approved_count integer,                -- set at execution
    rejected_count integer,                -- set at execution (never approved counts as rejected)
    notified_at    timestamptz,
    executed_at    timestamptz,
    cancelled_at   timestamptz,
    create_time    timestamptz NOT NULL DEFAULT now(),
    update_time    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_open ON campaigns (execute_at) WHERE status IN ('SCHEDULED', 'AWAITING_CLEARANCE');

CREATE TABLE campaign_promotions (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    promotion_id bigint NOT NULL REFERENCES promotions (id),
    position     integer NOT NULL,
    PRIMARY KEY (campaign_id, promotion_id)
);

-- approved: NULL until a listener says; the last status before ClearanceRequiredBy wins.
CREATE TABLE campaign_targets (
    campaign_id      bigint      NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    customer_id      text        NOT NULL,
    approved         boolean,
    status_time      timestamptz,
    PRIMARY KEY (campaign_id, customer_id)
);
