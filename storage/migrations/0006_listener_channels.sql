-- Listener channels: a listener receives its events as a signed webhook POST (as before) or as
-- an alert e-mail to a list of recipients. Existing listeners are webhooks; the defaults keep
-- them so, and every query written before this migration still sees the same rows.

ALTER TABLE webhook_listeners
    ADD COLUMN channel          text   NOT NULL DEFAULT 'WEBHOOK'
                                CHECK (channel IN ('WEBHOOK', 'EMAIL')),
    -- EMAIL only: 1-20 addresses (validated by the API, core.events.validate_email_recipients).
    ADD COLUMN email_recipients text[] NOT NULL DEFAULT '{}';

-- An e-mail listener has no URL and no signing secret: both are stored empty.
ALTER TABLE webhook_listeners
    ADD CONSTRAINT webhook_listeners_channel_fields CHECK (
        (channel = 'WEBHOOK' AND url <> '' AND cardinality(email_recipients) = 0)
        OR (channel = 'EMAIL' AND url = '' AND secret = ''
            AND cardinality(email_recipients) BETWEEN 1 AND 20));
