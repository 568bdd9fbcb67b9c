-- An invoice's payments (payments.for_invoice, after every payment event and in each status
-- check): without this index SQLite walked every payment ever made, in the event loop; the
-- partial index payments_one_in_flight holds only the attempts in flight.
CREATE INDEX payments_invoice ON payments (invoice_id);
