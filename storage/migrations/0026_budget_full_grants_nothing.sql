-- A budget that has reached its limit grants nothing more, not even a grant that charges 0
-- (an EXTERNAL reward sent without a value, or with "0"). Until now the condition
-- "used + amount <= limit" let a charge of 0 through a full budget, while GetPromotion showed
-- the cap reached and the availability BUDGET_EXHAUSTED ("no more grants"; seed 001: the
-- promotion pauses when its budget is reached): a code promotion whose system sends no values
-- was never stopped by its budget (tests/e2e/test_caps_budgets_audit.py). Now a budget window
-- also needs "used < limit" (core/cap_state.py's "reached" for a charge that is not known in
-- advance). Limits are positive (core/catalogue/promotions.py), so a new window's first grant
-- is unaffected. The body is 0023's (renamed promo_grant_charge by 0025) with only that
-- condition added in its two places; same signature, same answers otherwise.

CREATE OR REPLACE FUNCTION promo_grant_charge(
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
    v_charges   jsonb;
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

    SELECT coalesce(jsonb_agg(jsonb_build_object('scope', c.scope, 'period', c.period,
                                                 'start', c.start, 'amount', c.amount)
                              ORDER BY c.n), '[]'::jsonb)
      INTO v_charges
      FROM unnest(p_scopes, p_periods, p_starts, p_amounts) WITH ORDINALITY
           AS c (scope, period, start, amount, n);

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
        UPDATE cap_usage AS u SET used = u.used + 1, grants = u.grants + 1
         WHERE u.promotion_id = p_promotion_id AND u.scope = '#customers'
           AND u.period = 'LIFETIME' AND u.period_start = p_customers_start
           AND u.used + 1 <= p_customer_cap
        RETURNING u.grants INTO v_live;
        IF NOT FOUND THEN  -- the first customer, or the cap is reached
            INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used, grants)
            SELECT p_promotion_id, '#customers', 'LIFETIME', p_customers_start, 1, 1
            ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
               SET used = u.used + 1, grants = u.grants + 1
             WHERE u.used + 1 <= p_customer_cap
            RETURNING u.grants INTO v_live;
        END IF;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = 'CUSTOMER_CAP_REACHED|#customers|LIFETIME';
        END IF;
    END IF;

    -- Budget windows: their rows are contended by every grant of the promotion.
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        UPDATE cap_usage AS u SET used = u.used + p_amounts[i], grants = u.grants + 1
         WHERE u.promotion_id = p_promotion_id AND u.scope = p_scopes[i]
           AND u.period = p_periods[i] AND u.period_start = p_starts[i]
           AND (p_limits[i] IS NULL OR (u.used + p_amounts[i] <= p_limits[i]
                                        AND u.used < p_limits[i]))
        RETURNING u.grants INTO v_live;
        IF NOT FOUND THEN  -- a new window, or the cap is reached
            INSERT INTO cap_usage AS u (promotion_id, scope, period, period_start, used, grants)
            SELECT p_promotion_id, p_scopes[i], p_periods[i], p_starts[i], p_amounts[i], 1
             WHERE p_limits[i] IS NULL OR p_amounts[i] <= p_limits[i]
            ON CONFLICT (promotion_id, scope, period, period_start) DO UPDATE
               SET used = u.used + excluded.used, grants = u.grants + 1
             WHERE p_limits[i] IS NULL OR (u.used + excluded.used <= p_limits[i]
                                           AND u.used < p_limits[i])
            RETURNING u.grants INTO v_live;
        END IF;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'PC001',
                MESSAGE = 'BUDGET_CAP_REACHED|' || p_scopes[i] || '|' || p_periods[i];
        END IF;
    END LOOP;

    -- The code last: the pool's counter row is locked from here to commit.
    IF p_personalized THEN
        -- A customer holds at most one code of the pool: a live grant of this promotion
        -- (another campaign) with a pool code gives that code again. The customer's
        -- promotion_customers row, upserted above, is locked until commit, so two grants of
        -- one customer take turns here and the second sees the first's code.
        SELECT g.promo_code INTO v_code FROM grants g
         WHERE g.promotion_id = p_promotion_id AND g.customer_id = p_customer_id
           AND g.status = 'GRANTED' AND g.id <> v_id AND g.promo_code IS NOT NULL
           AND EXISTS (SELECT 1 FROM promo_codes c
                        WHERE c.promotion_id = p_promotion_id AND c.code = g.promo_code)
         ORDER BY g.id LIMIT 1;
    END IF;
    IF p_personalized AND v_code IS NULL THEN
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
            -- A pool that never had a code (total 0) raises nothing: nothing ran out.
            v_alert := coalesce(v_alert, false) AND v_total > 0;
            IF v_alert THEN
                INSERT INTO code_pool_alerts (promotion_id, kind, remaining, total, raised_at)
                VALUES (p_promotion_id, 'FALLBACK_ACTIVE', 0, v_total, p_now);
            END IF;
        ELSE
            RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = 'OUT_OF_CODES|codes|';
        END IF;
    END IF;
    IF p_personalized THEN
        UPDATE grants SET promo_code = v_code WHERE id = v_id;
    END IF;

    -- The caller sent the rewards and the time: only the id (and a code) is news to it.
    RETURN QUERY SELECT 'GRANTED'::text, v_id, 'GRANTED'::text, NULL::jsonb, v_code, NULL::timestamptz, v_alert;
END;
$$;
