-- Personalized promo codes: a pool of unique one-time codes per promotion, allocated by
-- GetReward inside promo_grant, with an optional fallback code, inventory and threshold alerts.
--
-- Allocation is a counter, not a search: codes carry a dense ordinal (1, 2, ... in upload order)
-- and code_pools.allocated says how many have been handed out, so the next code is the one with
-- ordinal allocated + 1. Taking it is one UPDATE of the pool's counter row (under its row lock,
-- so no two grants ever see the same ordinal) and one primary-key lookup; a grant that fails
-- later in promo_grant rolls the counter back with everything else. A code handed out is never
-- handed out again (a revoked grant does not return its code).

ALTER TABLE promotions
    ADD COLUMN code_type     text NOT NULL DEFAULT 'PROMOTION_CODE'
                             CHECK (code_type IN ('PROMOTION_CODE', 'PERSONALIZED')),
    ADD COLUMN fallback_code text NOT NULL DEFAULT '',
    -- [{"remaining_codes": 100} | {"remaining_percent": "10"}]
    ADD COLUMN code_alerts   jsonb NOT NULL DEFAULT '[]'::jsonb;

CREATE TABLE code_pools (
    promotion_id         bigint      PRIMARY KEY REFERENCES promotions (id),
    total                integer     NOT NULL DEFAULT 0 CHECK (total >= 0),
    allocated            integer     NOT NULL DEFAULT 0 CHECK (allocated >= 0 AND allocated <= total),
    -- Grants that got the fallback code because the pool was empty.
    fallback_grants      integer     NOT NULL DEFAULT 0,
    -- The highest level among armed thresholds (-1: none armed): promo_grant checks the
    -- thresholds only when the remaining count falls to it.
    next_alert_at        integer     NOT NULL DEFAULT 0,
    -- The fallback-active alert fires once per depletion; a replenishment re-arms it.
    fallback_alert_armed boolean     NOT NULL DEFAULT true,
    uploads              integer     NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE promo_codes (
    promotion_id bigint  NOT NULL,
    ordinal      integer NOT NULL,
    code         text    NOT NULL,
    upload_id    bigint  NOT NULL,
    PRIMARY KEY (promotion_id, ordinal),
    UNIQUE (promotion_id, code)
);

CREATE TABLE code_uploads (
    id           bigserial   PRIMARY KEY,
    promotion_id bigint      NOT NULL REFERENCES promotions (id),
    codes        integer     NOT NULL,
    bytes        bigint      NOT NULL,
    first_ordinal integer    NOT NULL,
    uploaded_at  timestamptz NOT NULL
);

-- One row per configured threshold, plus the DEPLETED row (level 0) of every pool.
-- level = remaining_codes, or floor(total * remaining_percent / 100), recomputed on upload.
CREATE TABLE code_pool_thresholds (
    promotion_id      bigint  NOT NULL REFERENCES code_pools (promotion_id),
    key               text    NOT NULL,  -- 'remaining:100', 'percent:10', 'depleted'
    kind              text    NOT NULL CHECK (kind IN ('THRESHOLD', 'DEPLETED')),
    remaining_codes   integer,
    remaining_percent numeric(5,2),
    level             integer NOT NULL DEFAULT 0,
    armed             boolean NOT NULL DEFAULT true,
    PRIMARY KEY (promotion_id, key)
);

-- Alerts raised in the transaction that caused them (a grant, an upload, a config change), then
-- turned into events for the listeners (storage.code_pools.dispatch_alerts) right after, or by
-- the worker's sweeper if the process died in between.
CREATE TABLE code_pool_alerts (
    id            bigserial   PRIMARY KEY,
    promotion_id  bigint      NOT NULL REFERENCES promotions (id),
    kind          text        NOT NULL CHECK (kind IN ('THRESHOLD', 'DEPLETED', 'FALLBACK_ACTIVE')),
    threshold_key text        NOT NULL DEFAULT '',
    level         integer     NOT NULL DEFAULT 0,
    remaining     integer     NOT NULL,
    total         integer     NOT NULL,
    raised_at     timestamptz NOT NULL,
    emitted_at    timestamptz
);
CREATE INDEX code_pool_alerts_pending ON code_pool_alerts (id) WHERE emitted_at IS NULL;

-- Bring the thresholds in line with the pool's current total and remaining count: recompute
-- levels, fire every armed threshold whose level the remaining count has reached (one alert
-- each, then disarmed), re-arm every disarmed one the remaining count is above again.
-- A pool that never had a code (total 0) raises nothing: nothing ran out.
-- Returns how many alerts it raised.
CREATE FUNCTION promo_code_pool_check(p_promotion_id bigint, p_now timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_total     integer;
    v_remaining integer;
    v_raised    integer;
BEGIN
    SELECT total, total - allocated INTO v_total, v_remaining
      FROM code_pools WHERE promotion_id = p_promotion_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE code_pool_thresholds
       SET level = coalesce(remaining_codes, floor(v_total * remaining_percent / 100)::integer)
     WHERE promotion_id = p_promotion_id;
    WITH fired AS (
        UPDATE code_pool_thresholds SET armed = false
         WHERE promotion_id = p_promotion_id AND armed AND v_remaining <= level AND v_total > 0
        RETURNING kind, key, level)
    INSERT INTO code_pool_alerts (promotion_id, kind, threshold_key, level, remaining, total,
                                  raised_at)
    SELECT p_promotion_id, kind, key, level, v_remaining, v_total, p_now FROM fired;
    GET DIAGNOSTICS v_raised = ROW_COUNT;
    UPDATE code_pool_thresholds SET armed = true
     WHERE promotion_id = p_promotion_id AND NOT armed AND v_remaining > level;
    UPDATE code_pools
       SET next_alert_at = coalesce((SELECT max(level) FROM code_pool_thresholds
                                      WHERE promotion_id = p_promotion_id AND armed), -1),
           fallback_alert_armed = fallback_alert_armed OR v_remaining > 0,
           updated_at = p_now
     WHERE promotion_id = p_promotion_id;
    RETURN v_raised;
END;
$$;

-- promo_grant learns to hand out codes: two new parameters and an "alert" column, so the old
-- signature goes.
DROP FUNCTION promo_grant(bigint, integer, text, text, text, jsonb, text, timestamptz, integer,
                          timestamptz, text[], text[], timestamptz[], numeric[], numeric[]);

CREATE FUNCTION promo_grant(
    p_promotion_id bigint, p_version integer, p_customer_id text, p_campaign_key text,
    p_request_id text, p_rewards jsonb, p_promo_code text, p_now timestamptz,
    p_customer_cap integer, p_customers_start timestamptz,
    p_scopes text[], p_periods text[], p_starts timestamptz[], p_amounts numeric[],
    p_limits numeric[], p_personalized boolean, p_fallback_code text
) RETURNS TABLE (outcome text, grant_id bigint, grant_status text, rewards jsonb,
                 promo_code text, granted_at timestamptz, alert boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_status    text;
    v_version   integer;
    v_id        bigint;
    v_live      integer;
    v_charges   jsonb := '[]'::jsonb;
    v_ordinal   integer;
    v_total     integer;
    v_alert_at  integer;
    v_code      text;
    v_alert     boolean := false;
    i           integer;
BEGIN
    SELECT p.status, p.version INTO v_status, v_version FROM promotions p WHERE p.id = p_promotion_id;
    IF v_version IS NULL THEN
        RETURN QUERY SELECT 'NOT_FOUND'::text, NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::timestamptz, false;
        RETURN;
    END IF;
    IF v_version <> p_version THEN
        RETURN QUERY SELECT 'STALE'::text, NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::timestamptz, false;
        RETURN;
    END IF;

    IF v_status <> 'ACTIVE' THEN
        -- A retry, or a customer who already has this grant, still gets its answer.
        RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at, false
            FROM grants g WHERE g.promotion_id = p_promotion_id
             AND (g.request_id = p_request_id OR (g.customer_id = p_customer_id
                  AND g.campaign_key = p_campaign_key AND g.status = 'GRANTED'))
             ORDER BY g.request_id = p_request_id DESC LIMIT 1;
        IF FOUND THEN RETURN; END IF;
        RETURN QUERY SELECT 'NOT_ACTIVE'::text, NULL::bigint, v_status, NULL::jsonb, NULL::text, NULL::timestamptz, false;
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
        -- A retry (same request id), a customer who already has this grant, or a concurrent
        -- request that won: answer with that grant.
        RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at, false
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

    -- Budget windows: their rows are contended by every grant of the promotion.
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

    -- The code last: the pool's counter row is locked from here to commit.
    IF p_personalized THEN
        UPDATE code_pools AS cp SET allocated = cp.allocated + 1
         WHERE cp.promotion_id = p_promotion_id AND cp.allocated < cp.total
        RETURNING cp.allocated, cp.total, cp.next_alert_at INTO v_ordinal, v_total, v_alert_at;
        IF FOUND THEN
            SELECT c.code INTO v_code FROM promo_codes c
             WHERE c.promotion_id = p_promotion_id AND c.ordinal = v_ordinal;
            IF v_total - v_ordinal <= v_alert_at THEN
                v_alert := promo_code_pool_check(p_promotion_id, p_now) > 0;
            END IF;
        ELSIF p_fallback_code <> '' THEN
            -- The pool is empty: the fallback code, and the FALLBACK_ACTIVE alert once.
            v_code := p_fallback_code;
            SELECT cp.fallback_alert_armed, cp.total INTO v_alert, v_total
              FROM code_pools cp WHERE cp.promotion_id = p_promotion_id FOR UPDATE;
            UPDATE code_pools AS cp SET fallback_grants = cp.fallback_grants + 1,
                   fallback_alert_armed = false
             WHERE cp.promotion_id = p_promotion_id;
            v_alert := coalesce(v_alert, false);
            IF v_alert THEN
                INSERT INTO code_pool_alerts (promotion_id, kind, remaining, total, raised_at)
                VALUES (p_promotion_id, 'FALLBACK_ACTIVE', 0, v_total, p_now);
            END IF;
        ELSE
            RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = 'OUT_OF_CODES|codes|';
        END IF;
        UPDATE grants SET promo_code = v_code WHERE id = v_id;
    END IF;

    -- The caller sent the rewards and the time: only the id (and a code) is news to it.
    RETURN QUERY SELECT 'GRANTED'::text, v_id, 'GRANTED'::text, NULL::jsonb, v_code, NULL::timestamptz, v_alert;
END;
$$;
