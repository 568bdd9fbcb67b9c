-- The outbox's ordering rule (store/outbox.claim_due): "an earlier unfinished row to the same
-- recipient with the same order key, or a plain one, holds this row back". Asked of the
-- (recipient, id) index, it walked every earlier unfinished row of the recipient for every
-- candidate: quadratic in a campaign's backlog (42,000 notices to one merchant stopped the
-- outbox for minutes, bench/). With the order key in the index each question is one seek.
CREATE INDEX outbox_order ON outbox (recipient, order_key, id) WHERE status IN ('PENDING','SENDING');
-- Unfinished rows oldest first: a claim walks them in order and stops at its LIMIT.
CREATE INDEX outbox_unfinished ON outbox (id) WHERE status IN ('PENDING','SENDING');
