-- promo_grant_batch: several GetReward grants in one round trip and one transaction.
--
-- Why: every grant of a promotion charges the same few counter rows (its customer cap and its
-- budget windows), so concurrent grants queue on those rows' locks, and each pays its own
-- commit, its own lock wait and its own re-check of the counter row it waited for. The server
-- (server/grant_batcher.py) gathers the grants of one promotion that arrive while an earlier
-- batch is in the database and sends them here together: the counter rows are locked once per
-- batch, and one commit covers them all.
--
-- Each grant runs the unchanged promo_grant in a subtransaction of its own (a plpgsql block
-- with an EXCEPTION clause), in the order given, so each is still all or nothing: a grant that
-- would exceed a cap (promo_grant raises SQLSTATE PC001) is rolled back alone and answered with
-- its reason, and the grants after it see exactly the counters the ones before it left, as if
-- they had come one after the other. A retry or a repeat customer later in the same batch sees
-- the earlier grant (same transaction) and gets it back as EXISTING. Any other error aborts the
-- whole batch; the caller then sends each grant on its own.
--
-- Arguments: one array element per grant for every promo_grant argument except the charges,
-- which are flattened: grant i's charges are elements p_charge_from[i] .. p_charge_to[i] of the
-- five charge arrays (from > to: no charges). Keep batches under 64 grants: PostgreSQL tracks
-- at most 64 subtransactions per transaction in shared memory before other sessions' snapshots
-- get slower.

CREATE FUNCTION promo_grant_batch(
    p_promotion_ids bigint[], p_versions integer[], p_customer_ids text[], p_campaign_keys text[],
    p_request_ids text[], p_rewards text[], p_promo_codes text[], p_nows timestamptz[],
    p_customer_caps integer[], p_customers_starts timestamptz[],
    p_charge_from integer[], p_charge_to integer[],
    p_scopes text[], p_periods text[], p_starts timestamptz[], p_amounts numeric[],
    p_limits numeric[], p_personalized boolean[], p_fallback_codes text[]
) RETURNS TABLE (n integer, outcome text, grant_id bigint, grant_status text, rewards jsonb,
                 promo_code text, granted_at timestamptz, alert boolean, refusal text)
LANGUAGE plpgsql AS $$
DECLARE
    i  integer;
    f  integer;
    t  integer;
    r  record;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_promotion_ids, 1), 0) LOOP
        f := p_charge_from[i];
        t := p_charge_to[i];
        BEGIN
            SELECT * INTO r FROM promo_grant(
                p_promotion_ids[i], p_versions[i], p_customer_ids[i], p_campaign_keys[i],
                p_request_ids[i], p_rewards[i]::jsonb, p_promo_codes[i], p_nows[i],
                p_customer_caps[i], p_customers_starts[i],
                coalesce(p_scopes[f:t], '{}'), coalesce(p_periods[f:t], '{}'),
                coalesce(p_starts[f:t], '{}'), coalesce(p_amounts[f:t], '{}'),
                coalesce(p_limits[f:t], '{}'), p_personalized[i], p_fallback_codes[i]);
            RETURN QUERY SELECT i, r.outcome, r.grant_id, r.grant_status, r.rewards,
                                r.promo_code, r.granted_at, r.alert, NULL::text;
        EXCEPTION WHEN SQLSTATE 'PC001' THEN
            RETURN QUERY SELECT i, NULL::text, NULL::bigint, NULL::text, NULL::jsonb,
                                NULL::text, NULL::timestamptz, false, SQLERRM;
        END;
    END LOOP;
END;
$$;
