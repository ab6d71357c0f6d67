-- Customer-cap counters that drifted before migration 0020 are recounted once.
--
-- Before 0020, promo_revoke gave a customer slot back even for a grant made while the
-- promotion had no customer cap (so the slot had never been taken), and setting the cap again
-- kept the counter it had (the save inserted it ON CONFLICT DO NOTHING): the counter could end
-- below the customers holding a live grant, and the cap then let too many customers in
-- (DESIGN invariant 1; tests/integration/test_upgrade_audit.py). 0020 fixed the revoke and
-- later saves recount on edit, but counters already off stayed off. This sets every capped
-- promotion's counter to what storage.promotions._recount_caps counts: the customers holding a
-- live grant. Counters already right are not touched.

-- The counter rows first (a grant in flight holds its promotion's row until it commits), then
-- the count, in a statement of its own: it sees every grant committed before the lock was taken,
-- and a grant arriving later waits for this migration's commit (as _recount_caps does).
SELECT 1 FROM cap_usage u
  JOIN promotions p ON p.id = u.promotion_id AND p.customer_cap IS NOT NULL
 WHERE u.scope = '#customers'
 ORDER BY u.promotion_id
   FOR UPDATE OF u;

UPDATE cap_usage u
   SET used = live.customers, grants = live.customers
  FROM (SELECT p.id, count(c.customer_id) AS customers
          FROM promotions p
          LEFT JOIN promotion_customers c ON c.promotion_id = p.id AND c.live_grants > 0
         WHERE p.customer_cap IS NOT NULL
         GROUP BY p.id) live
 WHERE u.promotion_id = live.id AND u.scope = '#customers'
   AND (u.used <> live.customers OR u.grants <> live.customers);
