-- Dead outbox jobs (out of attempts) are an operator's to look at: JobService.ListJobs lists
-- them and RetryJob runs one again, and the workers' metrics count them per kind
-- (promo_outbox_dead_jobs) on every scrape. Dead rows are few, but they sit among the done
-- rows kept for PROMO_OUTBOX_JOB_RETENTION_DAYS: a partial index keeps those reads off the
-- table.
CREATE INDEX outbox_jobs_dead ON outbox_jobs (kind, id) WHERE status = 'dead';
