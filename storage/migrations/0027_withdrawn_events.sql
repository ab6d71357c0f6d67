-- An event whose news went stale (a campaign cancelled before its clearance announcement was
-- delivered) is withdrawn: CancelCampaign cancels its pending deliveries and records why here,
-- and RedeliverEvent refuses to send it again (EVENT_WITHDRAWN). NULL: not withdrawn.

ALTER TABLE webhook_events ADD COLUMN withdrawn text;

-- Campaigns cancelled before this migration: their announcements are withdrawn too (the code of
-- then cancelled the pending deliveries but had nowhere to mark the event).
UPDATE webhook_events e SET withdrawn = 'campaign cancelled'
  FROM campaigns c
 WHERE c.status = 'CANCELLED' AND e.dedup_key = 'campaign:' || c.id || ':clearance';
