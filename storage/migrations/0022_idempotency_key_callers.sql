-- Who made each request (the API key's configured name, server.auth.Principal): a request id
-- stays one request for everyone, but its stored answer is replayed only to the caller that
-- made it. Another caller reusing the id is REQUEST_ID_REUSED, even with the same input: the
-- answer can hold what only the first caller may see (a generated listener secret). Rows
-- stored before this migration get caller '' and still answer a retry from any caller, so no
-- call in flight during an upgrade runs twice or fails.
ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT '';
COMMENT ON COLUMN idempotency_keys.caller IS
    'the API key name that made the request; empty: stored before migration 0022 (any caller)';
