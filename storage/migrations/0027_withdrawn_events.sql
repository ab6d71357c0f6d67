-- An event whose news went stale (a campaign cancelled before its clearance announcement was
-- delivered) is withdrawn: CancelCampaign cancels its pending deliveries and records why here,
-- and RedeliverEvent refuses to send it again (EVENT_WITHDRAWN). NULL: not withdrawn.

ALTER TABLE webhook_events ADD COLUMN withdrawn text;
