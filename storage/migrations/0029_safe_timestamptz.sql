-- A cast that cannot fail, for reading outbox payloads in bulk statements: the hourly purge
-- looks into dead bonus.batch payloads (storage/retention.py), and one payload that does not
-- parse (a hand-written row, a bug) must not make the whole purge fail every hour.

CREATE FUNCTION promo_try_timestamptz(p_value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
