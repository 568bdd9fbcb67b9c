-- The row a Pay decision writes, and deletes, for its customer's phone before it reads the
-- phone's recent prompts (payments.lock_phone): two decisions for two invoices of one phone,
-- in two processes, are then taken one after the other. Without it both could read "no prompt
-- in the last minute" and both push (Daraja's per-subscriber lock, our limit of three in ten
-- minutes). Empty at rest: a row lives only inside the deciding transaction.
CREATE TABLE push_locks (
  phone TEXT PRIMARY KEY
);
