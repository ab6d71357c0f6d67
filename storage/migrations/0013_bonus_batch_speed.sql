-- The dynamic-bonus batch, lighter for PostgreSQL (bench/dynamic_batch.py, issue 7).
--
-- bonus_results no longer references bonus_requests, bonus_definitions and bonus_batches by
-- foreign key. A batch inserts 100,000 results at a time, and each row's three foreign-key
-- checks (one trigger and one index probe with a KEY SHARE lock each) were about half of the
-- database's cost of writing a result. The references are still guaranteed where the rows are
-- written: storage.bonuses writes a result only for a request it has just claimed (UPDATE ...
-- SET status = 'DONE' RETURNING id, same transaction), of the definition and batch it holds
-- the lock of. Definitions are never deleted; requests are deleted only by the purge, and only
-- once they have no result (so ON DELETE CASCADE never fired); the purge now clears batch_pk
-- itself when it deletes old batches (what ON DELETE SET NULL did).

ALTER TABLE bonus_results DROP CONSTRAINT IF EXISTS bonus_results_request_pk_fkey;
ALTER TABLE bonus_results DROP CONSTRAINT IF EXISTS bonus_results_definition_pk_fkey;
ALTER TABLE bonus_results DROP CONSTRAINT IF EXISTS bonus_results_batch_pk_fkey;
