-- The currency of an automation rule's qualification minimum (seed 004: "a minimum deposit of
-- 100 EUR"): only events in it qualify. NULL (every rule saved before): the minimum amount is in
-- each customer's own currency, and an event in another currency does not meet it (see
-- core.bonuses.rules).
ALTER TABLE bonus_rules ADD COLUMN qualification_currency text;
