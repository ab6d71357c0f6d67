-- Promotions, their caps' usage counters, grants, and the one-round-trip grant/revoke functions.

CREATE TABLE promotions (
    id           bigserial   PRIMARY KEY,
    code         text        NOT NULL UNIQUE,
    name         text        NOT NULL,
    description  text        NOT NULL DEFAULT '',
    properties   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status       text        NOT NULL CHECK (status IN ('DRAFT', 'ACTIVE', 'DEACTIVATED')),
    time_zone    text        NOT NULL DEFAULT 'UTC',
    customer_cap integer     CHECK (customer_cap IS NULL OR customer_cap > 0),
    rewards      jsonb       NOT NULL,   -- validated reward definitions
    budget_caps  jsonb       NOT NULL DEFAULT '[]'::jsonb,
    reward_kinds text[]      NOT NULL DEFAULT '{}',  -- for list filters
    version      integer     NOT NULL DEFAULT 1,     -- bumped on every change; caches compare it
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX promotions_name ON promotions (lower(name));
CREATE INDEX promotions_status ON promotions (status, code);

-- Usage per cap and period window. scope is a reward type name (budget caps, amounts) or
-- '#customers' (the customer cap, counted in customers). Keyed by meaning rather than by cap id,
-- so editing a cap's limit keeps what was already spent.
CREATE TABLE cap_usage (
    promotion_id bigint        NOT NULL REFERENCES promotions (id) ON DELETE CASCADE,
    scope        text          NOT NULL,
    period       text          NOT NULL CHECK (period IN ('DAILY', 'WEEKLY', 'MONTHLY', 'LIFETIME')),
    period_start timestamptz   NOT NULL,
    used         numeric(20,6) NOT NULL DEFAULT 0 CHECK (used >= 0),
    grants       integer       NOT NULL DEFAULT 0 CHECK (grants >= 0),
    PRIMARY KEY (promotion_id, scope, period, period_start)
);

CREATE TABLE grants (
    id            bigserial   PRIMARY KEY,
    promotion_id  bigint      NOT NULL REFERENCES promotions (id) ON DELETE CASCADE,
    customer_id   text        NOT NULL,
    campaign_key  text        NOT NULL DEFAULT '',
    request_id    text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('GRANTED', 'REVOKED')),
    rewards       jsonb       NOT NULL,  -- [{"reward_type", "value"}]
    charges       jsonb       NOT NULL,  -- [{"scope", "period", "start", "amount"}]: what to give back on revoke
    promo_code    text        NOT NULL DEFAULT '',
    granted_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    revoke_reason text,
    UNIQUE (promotion_id, request_id)
);
-- One live grant per customer, promotion and campaign; a revoked grant frees the slot.
CREATE UNIQUE INDEX grants_one_live ON grants (promotion_id, customer_id, campaign_key)
    WHERE status = 'GRANTED';
CREATE INDEX grants_promotion_time ON grants (promotion_id, granted_at);

-- Live grants per customer, so the customer cap counts unique customers.
CREATE TABLE promotion_customers (
    promotion_id  bigint  NOT NULL REFERENCES promotions (id) ON DELETE CASCADE,
    customer_id   text    NOT NULL,
    live_grants   integer NOT NULL CHECK (live_grants >= 0),
    PRIMARY KEY (promotion_id, customer_id)
);

-- Grant in one statement: check the cached config is current and the promotion ACTIVE, return
-- an existing grant for this request or customer, else insert the grant, charge the customer cap
-- (for the customer's first live grant) and the budget windows last (their rows are the hot
-- spot; their locks are held until commit). A cap that would be exceeded raises SQLSTATE PC001
-- with the cap in the message, which undoes everything the statement did.
CREATE FUNCTION promo_grant(
    p_promotion_id bigint, p_version integer, p_customer_id text, p_campaign_key text,
    p_request_id text, p_rewards jsonb, p_promo_code text, p_now timestamptz,
    p_customer_cap integer, p_customers_start timestamptz,
    p_scopes text[], p_periods text[], p_starts timestamptz[], p_amounts numeric[],
    p_limits numeric[]
) RETURNS TABLE (outcome text, grant_id bigint, grant_status text, rewards jsonb,
                 promo_code text, granted_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_status  text;
    v_version integer;
    v_id      bigint;
    v_live    integer;
    v_charges jsonb := '[]'::jsonb;
    i         integer;
BEGIN
    SELECT p.status, p.version INTO v_status, v_version FROM promotions p WHERE p.id = p_promotion_id;
    IF v_version IS NULL THEN
        RETURN QUERY SELECT 'NOT_FOUND'::text, NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_version <> p_version THEN
        RETURN QUERY SELECT 'STALE'::text, NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;

    -- A retry (same request id), or a customer who already has this grant: the same answer.
    RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at
        FROM grants g WHERE g.promotion_id = p_promotion_id AND g.request_id = p_request_id;
    IF FOUND THEN RETURN; END IF;
    RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at
        FROM grants g WHERE g.promotion_id = p_promotion_id AND g.customer_id = p_customer_id
         AND g.campaign_key = p_campaign_key AND g.status = 'GRANTED';
    IF FOUND THEN RETURN; END IF;

    IF v_status <> 'ACTIVE' THEN
        RETURN QUERY SELECT 'NOT_ACTIVE'::text, NULL::bigint, v_status, NULL::jsonb, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        v_charges := v_charges || jsonb_build_object('scope', p_scopes[i], 'period', p_periods[i],
                                                     'start', p_starts[i], 'amount', p_amounts[i]);
    END LOOP;

    INSERT INTO grants (promotion_id, customer_id, campaign_key, request_id, status, rewards,
                        charges, promo_code, granted_at)
    VALUES (p_promotion_id, p_customer_id, p_campaign_key, p_request_id, 'GRANTED', p_rewards,
            v_charges, p_promo_code, p_now)
    ON CONFLICT DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        -- A concurrent request for the same request id or customer won; answer with its grant.
        RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at
            FROM grants g WHERE g.promotion_id = p_promotion_id
             AND (g.request_id = p_request_id OR (g.customer_id = p_customer_id
                  AND g.campaign_key = p_campaign_key AND g.status = 'GRANTED'))
             ORDER BY g.request_id = p_request_id DESC LIMIT 1;
        RETURN;
    END IF;

    INSERT INTO promotion_customers AS pc (promotion_id, customer_id, live_grants)
    VALUES (p_promotion_id, p_customer_id, 1)
    ON CONFLICT (promotion_id, customer_id) DO UPDATE SET live_grants = pc.live_grants + 1
    RETURNING pc.live_grants INTO v_live;
    IF v_live = 1 AND p_customer_cap IS NOT NULL THEN
        INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used, grants)
        SELECT p_promotion_id, '#customers', 'LIFETIME', p_customers_start, 1, 1
        ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
           SET used = u.used + 1, grants = u.grants + 1
         WHERE u.used + 1 <= p_customer_cap
        RETURNING u.grants INTO v_live;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = 'CUSTOMER_CAP_REACHED|#customers|LIFETIME';
        END IF;
    END IF;

    -- Budget windows last: their rows are contended by every grant of the promotion.
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used, grants)
        SELECT p_promotion_id, p_scopes[i], p_periods[i], p_starts[i], p_amounts[i], 1
         WHERE p_limits[i] IS NULL OR p_amounts[i] <= p_limits[i]
        ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
           SET used = u.used + excluded.used, grants = u.grants + 1
         WHERE p_limits[i] IS NULL OR u.used + excluded.used <= p_limits[i]
        RETURNING u.grants INTO v_live;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'PC001',
                MESSAGE = 'BUDGET_CAP_REACHED|' || p_scopes[i] || '|' || p_periods[i];
        END IF;
    END LOOP;

    RETURN QUERY SELECT 'GRANTED'::text, v_id, 'GRANTED'::text, p_rewards, p_promo_code, p_now;
END;
$$;

-- Revoke: the grant frees its customer slot and gives back exactly what it was charged, to the
-- windows it was charged in. Racing a grant is safe: both lock the same counter rows.
CREATE FUNCTION promo_revoke(p_grant_id bigint, p_reason text, p_now timestamptz)
RETURNS TABLE (outcome text, promotion_id bigint, customer_id text)
LANGUAGE plpgsql AS $$
DECLARE
    v_grant grants%ROWTYPE;
    v_live  integer;
    v_charge jsonb;
BEGIN
    UPDATE grants g SET status = 'REVOKED', revoked_at = p_now, revoke_reason = p_reason
     WHERE g.id = p_grant_id AND g.status = 'GRANTED'
    RETURNING g.* INTO v_grant;
    IF v_grant.id IS NULL THEN
        RETURN QUERY SELECT CASE WHEN g.id IS NULL THEN 'NOT_FOUND' ELSE 'ALREADY_REVOKED' END,
                            g.promotion_id, g.customer_id
            FROM (SELECT 1) AS one LEFT JOIN grants g ON g.id = p_grant_id;
        RETURN;
    END IF;
    UPDATE promotion_customers pc SET live_grants = pc.live_grants - 1
     WHERE pc.promotion_id = v_grant.promotion_id AND pc.customer_id = v_grant.customer_id
    RETURNING pc.live_grants INTO v_live;
    IF v_live = 0 THEN
        UPDATE cap_usage u SET used = u.used - 1, grants = u.grants - 1
         WHERE u.promotion_id = v_grant.promotion_id AND u.scope = '#customers'
           AND u.period = 'LIFETIME' AND u.used >= 1;
    END IF;
    FOR v_charge IN SELECT * FROM jsonb_array_elements(v_grant.charges) LOOP
        UPDATE cap_usage u
           SET used = u.used - (v_charge->>'amount')::numeric, grants = u.grants - 1
         WHERE u.promotion_id = v_grant.promotion_id AND u.scope = v_charge->>'scope'
           AND u.period = v_charge->>'period'
           AND u.period_start = (v_charge->>'start')::timestamptz;
    END LOOP;
    RETURN QUERY SELECT 'REVOKED'::text, v_grant.promotion_id, v_grant.customer_id;
END;
$$;
