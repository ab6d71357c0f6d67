-- A promotion's TIERED and CALCULATED rewards are stored as their source (in rewards) and, from
-- now on, as the validated, versioned form the compiler produced when the promotion was saved
-- (CompiledFormula.to_stored(), by reward type). Loading a promotion then needs no parsing, and
-- a formula saved under an older language version is recompiled from its source.
-- Rows written before this migration have '{}' and are compiled from source as before.
ALTER TABLE promotions ADD COLUMN formulas jsonb NOT NULL DEFAULT '{}'::jsonb;
