-- The grant hot path, lighter for PostgreSQL.
--
-- 1. grants and promotion_customers no longer reference promotions by foreign key. Every grant
--    inserted a row into each, and each insert's foreign-key check took a KEY SHARE lock on the
--    one promotions row that every concurrent grant of the promotion shares: under load that is
--    a MultiXact per grant, measurable PostgreSQL CPU on the hottest call. Promotions are never
--    deleted (they are deactivated), and promo_grant reads the promotion row (status, version)
--    before inserting, so the reference is still checked where rows are written.
-- 2. promo_grant answers a new grant with its id only: the caller already holds the rewards,
--    code and time it sent, and no longer pays for encoding and decoding them again.

ALTER TABLE grants DROP CONSTRAINT IF EXISTS grants_promotion_id_fkey;
ALTER TABLE promotion_customers DROP CONSTRAINT IF EXISTS promotion_customers_promotion_id_fkey;

CREATE OR REPLACE FUNCTION promo_grant(
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

    IF v_status <> 'ACTIVE' THEN
        -- A retry, or a customer who already has this grant, still gets its answer.
        RETURN QUERY SELECT 'EXISTING'::text, g.id, g.status, g.rewards, g.promo_code, g.granted_at
            FROM grants g WHERE g.promotion_id = p_promotion_id
             AND (g.request_id = p_request_id OR (g.customer_id = p_customer_id
                  AND g.campaign_key = p_campaign_key AND g.status = 'GRANTED'))
             ORDER BY g.request_id = p_request_id DESC LIMIT 1;
        IF FOUND THEN RETURN; END IF;
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
        -- A retry (same request id), a customer who already has this grant, or a concurrent
        -- request that won: answer with that grant.
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

    -- The caller sent the rewards, the code and the time: only the id is news to it.
    RETURN QUERY SELECT 'GRANTED'::text, v_id, 'GRANTED'::text, NULL::jsonb, NULL::text, NULL::timestamptz;
END;
$$;

