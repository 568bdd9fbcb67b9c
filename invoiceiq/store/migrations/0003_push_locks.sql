-- One row per customer phone that was ever asked for an STK push: the row a Pay decision locks
-- (payments.lock_phone) before it reads the phone's recent prompts, so that two decisions for
-- two invoices of one phone, in two processes, are taken one after the other. Without it both
-- could read "no prompt in the last minute" and both push (Daraja's per-subscriber lock, our
-- limit of three in ten minutes).
CREATE TABLE push_locks (
  phone TEXT PRIMARY KEY
);
