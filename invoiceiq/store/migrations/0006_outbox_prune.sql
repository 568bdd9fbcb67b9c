-- `invoiceiq prune` now also empties the content (the message text) of sends that left the
-- outbox long ago. Like migration 0005's, this partial index holds only the rows still to
-- prune, so a slice reads its rows and never walks the history pruned on earlier days.
CREATE INDEX outbox_unpruned ON outbox (created_at_ms) WHERE status IN ('SENT','DELIVERED','READ','FAILED','CANCELLED') AND CAST(content AS TEXT) <> '{}';
