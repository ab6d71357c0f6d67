"""Dynamic bonuses (seed 004): definitions, the result status machine, batching windows and
message templates. Pure domain code: the batch itself (SQL, outbox) lives in storage/bonuses.py
and workers/bonuses.py."""
