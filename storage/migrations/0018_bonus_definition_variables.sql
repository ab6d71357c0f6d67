-- Variables of dynamic bonus definitions (issue 7, seed 004 "Using variables with fixed values
-- and multi-currency support"): named amounts the formula may use, a fixed value or one value
-- per currency, e.g. [{"name": "max_bonus", "per_currency": {"EUR": "200", "USD": "250"}}]
-- (core.bonuses.definitions.DefinitionVariable.to_stored). The compiled formula
-- (formula_stored) already carries the values it reads, so batches keep evaluating from it;
-- this column is what GetBonusDefinition shows and UpdateBonusDefinition edits. Existing
-- definitions have none.

ALTER TABLE bonus_definitions ADD COLUMN variables jsonb NOT NULL DEFAULT '[]'::jsonb;
