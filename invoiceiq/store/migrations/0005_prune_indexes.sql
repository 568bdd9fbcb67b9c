-- `invoiceiq prune` (a daily timer) clears personal data in slices of 5,000 rows, each slice a
-- short write transaction beside the running daemon. Each slice looked for its rows by walking
-- every old row from the first, the ones pruned on earlier days (and by earlier slices) too:
-- a year of history made every slice hold SQLite's write lock for a walk of it, while webhooks
-- waited. These partial indexes hold only what is still to prune, so a slice reads its rows
-- and nothing else; a pruned row leaves its index.
CREATE INDEX message_log_unpruned ON message_log (created_at) WHERE payload IS NOT NULL;
CREATE INDEX inbox_unpruned ON inbox (received_at_ms) WHERE processed_at_ms IS NOT NULL AND CAST(payload AS TEXT) <> '{}';
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_ms);
