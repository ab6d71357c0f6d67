-- Which revision of its definition a calculation request's transaction period came from.
--
-- A request without a period of its own (an API request without one, a schedule run using the
-- definition's period) stores the window the definition's period gave at request time, in the
-- customer's time zone. When the definition's period is edited (a new revision), a request
-- still pending, and every result recalculated, must read the new period as of the same
-- request time: storage.bonuses re-resolves the period when period_revision differs from the
-- definition's current revision. NULL: the request brought its own window (an explicit period,
-- an automation rule's or a schedule's window), which an edit of the definition does not move.
-- Existing requests keep the window they stored (NULL).

ALTER TABLE bonus_requests ADD COLUMN period_revision bigint;
