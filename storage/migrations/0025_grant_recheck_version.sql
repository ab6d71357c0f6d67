-- A grant never outlives an edit of the caps it was charged against (DESIGN invariant 1).
-- promo_grant read the promotion's version once, first; UpdatePromotion recounts the
-- counters after locking them (storage/promotions.py _recount_caps), so a grant that had read
-- the old version and then waited on a locked counter went on after the edit committed and
-- charged it against the old limit (a customer cap cut from 1000 to 30 during a burst ended
-- at 104 live customers against 102 counted: tests/e2e/test_concurrency_audit.py). Now a new
-- grant reads the version again after everything else (a statement of its own: a fresh
-- snapshot, after any counter lock it waited for) and, when an edit has committed meanwhile,
-- undoes everything with the refusal "STALE" (SQLSTATE PC001, as the cap refusals, so
-- promo_grant_batch and the caller already handle it): the caller reloads the promotion and
-- tries again against the new limits. A grant whose charges came before the edit's lock holds
-- the counter until it commits, so the edit's recount waits for it and counts it.
--
-- The body of 0023 stays as it is, renamed promo_grant_charge; promo_grant wraps it with the
-- same signature and answers (promo_grant_batch calls promo_grant, so it gets the check too).

ALTER FUNCTION promo_grant(bigint, integer, text, text, text, jsonb, text, timestamptz, integer,
                           timestamptz, text[], text[], timestamptz[], numeric[], numeric[],
                           boolean, text)
    RENAME TO promo_grant_charge;

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
    r record;
BEGIN
    SELECT * INTO r FROM promo_grant_charge(
        p_promotion_id, p_version, p_customer_id, p_campaign_key, p_request_id, p_rewards,
        p_promo_code, p_now, p_customer_cap, p_customers_start, p_scopes, p_periods, p_starts,
        p_amounts, p_limits, p_personalized, p_fallback_code);
    -- An edit committed since the first read: the charges were made against its old limits.
    IF r.outcome = 'GRANTED' AND (SELECT p.version FROM promotions p
                                   WHERE p.id = p_promotion_id) IS DISTINCT FROM p_version THEN
        RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = 'STALE||';
    END IF;
    RETURN QUERY SELECT r.outcome, r.grant_id, r.grant_status, r.rewards, r.promo_code,
                        r.granted_at, r.alert;
END;
$$;
