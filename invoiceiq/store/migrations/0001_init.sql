-- InvoiceIQ schema, version 1.
-- Runs on SQLite and PostgreSQL: {{SERIAL}} becomes the dialect's auto-increment primary key
-- column. Times we compute with are integer milliseconds (*_ms, from the daemon's clock); the
-- brief's TIMESTAMP columns keep their CURRENT_TIMESTAMP defaults for humans reading the rows.

-- The brief's three tables (section 5), exactly as written: same columns, same CHECKs.
CREATE TABLE invoices (
  id TEXT PRIMARY KEY,
  customer_name TEXT,
  msisdn TEXT NOT NULL,
  amount_cents INTEGER NOT NULL,
  currency TEXT NOT NULL DEFAULT 'KES',
  description TEXT,
  status TEXT NOT NULL CHECK (status IN ('PENDING','SENT','PAID','CANCELLED','FAILED')),
  pay_ref TEXT,
  pay_link TEXT,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE payments (
  id TEXT PRIMARY KEY,
  invoice_id TEXT NOT NULL REFERENCES invoices(id),
  method TEXT NOT NULL CHECK (method IN ('MPESA_STK')),
  status TEXT NOT NULL CHECK (status IN ('INITIATED','SUCCESS','FAILED','EXPIRED')),
  mpesa_receipt TEXT,
  amount_cents INTEGER NOT NULL,
  raw_request JSON,
  raw_callback JSON,
  idempotency_key TEXT UNIQUE,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE message_log (
  id TEXT PRIMARY KEY,
  invoice_id TEXT REFERENCES invoices(id),
  channel TEXT NOT NULL CHECK (channel IN ('WHATSAPP','SMS')),
  direction TEXT NOT NULL CHECK (direction IN ('IN','OUT')),
  event TEXT,
  payload JSON,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Never twice: at most one STK attempt in flight per invoice, whatever the number of processes.
CREATE UNIQUE INDEX payments_one_in_flight ON payments (invoice_id) WHERE status = 'INITIATED';
-- A receipt number is money received once; the same receipt can never pay a second invoice.
CREATE UNIQUE INDEX payments_receipt ON payments (mpesa_receipt) WHERE mpesa_receipt IS NOT NULL;
CREATE INDEX invoices_status ON invoices (status);
CREATE INDEX invoices_msisdn ON invoices (msisdn);
CREATE INDEX message_log_invoice ON message_log (invoice_id);
CREATE INDEX message_log_created ON message_log (created_at);

-- What the brief's tables do not hold, kept beside them (1:1) so that they stay as written.
CREATE TABLE invoice_tracking (
  invoice_id TEXT PRIMARY KEY REFERENCES invoices(id),
  pay_token TEXT NOT NULL UNIQUE,
  created_at_ms BIGINT NOT NULL,
  sent_at_ms BIGINT,
  paid_at_ms BIGINT,
  cancelled_at_ms BIGINT,
  channel TEXT CHECK (channel IN ('WHATSAPP','SMS')),
  delivery_state TEXT,
  last_reminder_at_ms BIGINT,
  source TEXT NOT NULL DEFAULT 'chat'
);

CREATE TABLE stk_attempts (
  payment_id TEXT PRIMARY KEY REFERENCES payments(id),
  invoice_id TEXT NOT NULL REFERENCES invoices(id),
  phone TEXT NOT NULL,
  requested_at_ms BIGINT NOT NULL,
  checkout_request_id TEXT UNIQUE,
  merchant_request_id TEXT,
  result_code INTEGER,
  result_desc TEXT,
  next_check_at_ms BIGINT,
  queries INTEGER NOT NULL DEFAULT 0,
  expire_at_ms BIGINT NOT NULL,
  resolved_at_ms BIGINT,
  source TEXT NOT NULL
);
CREATE INDEX stk_attempts_phone ON stk_attempts (phone, requested_at_ms);
CREATE INDEX stk_attempts_check ON stk_attempts (next_check_at_ms);

-- Customers: name <-> msisdn for `invoice <name> ...`, and the WhatsApp 24-hour window.
CREATE TABLE customers (
  msisdn TEXT PRIMARY KEY,
  name TEXT,
  name_key TEXT,
  last_inbound_at_ms BIGINT,
  created_at_ms BIGINT NOT NULL
);
CREATE INDEX customers_name_key ON customers (name_key);

-- Durable before acknowledged: every provider event (and internal request) lands here, deduped
-- by its id, before the HTTP answer; the owning actor marks it processed in the same
-- transaction as the state change it causes, so a crash in between only delays it.
CREATE TABLE inbox (
  seq {{SERIAL}},
  source TEXT NOT NULL,
  event_id TEXT NOT NULL,
  actor TEXT NOT NULL,
  actor_key TEXT NOT NULL,
  kind TEXT NOT NULL,
  payload JSON NOT NULL,
  received_at_ms BIGINT NOT NULL,
  processed_at_ms BIGINT,
  failures INTEGER NOT NULL DEFAULT 0,
  dead INTEGER NOT NULL DEFAULT 0,
  UNIQUE (source, event_id)
);
CREATE INDEX inbox_pending ON inbox (actor, actor_key, seq) WHERE processed_at_ms IS NULL;

-- Conversation state (the pure state machine's, as JSON) and its next due timer. `version`
-- makes a step a compare-and-set, so two processes never interleave one conversation.
CREATE TABLE conversations (
  conv_key TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('merchant','customer')),
  state JSON NOT NULL,
  version BIGINT NOT NULL DEFAULT 0,
  due_at_ms BIGINT,
  updated_at_ms BIGINT NOT NULL
);
CREATE INDEX conversations_due ON conversations (due_at_ms) WHERE due_at_ms IS NOT NULL;

-- Every send is a row here before it is attempted. Rows go out in order per recipient.
CREATE TABLE outbox (
  id {{SERIAL}},
  recipient TEXT NOT NULL,
  -- Rows with one order_key go out one after the other, oldest first: by default the key is
  -- the recipient; the merchant's notices are keyed per invoice (see store/outbox.py).
  order_key TEXT NOT NULL,
  channel TEXT NOT NULL CHECK (channel IN ('WHATSAPP','SMS')),
  kind TEXT NOT NULL,
  invoice_id TEXT REFERENCES invoices(id),
  content JSON NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('PENDING','SENDING','SENT','DELIVERED','READ','FAILED','CANCELLED')),
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at_ms BIGINT NOT NULL,
  claimed_until_ms BIGINT,
  claimed_by TEXT,
  last_error TEXT,
  provider_message_id TEXT,
  sent_form TEXT,
  dedupe_key TEXT UNIQUE,
  fallback_of BIGINT,
  created_at_ms BIGINT NOT NULL,
  sent_at_ms BIGINT,
  updated_at_ms BIGINT NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at_ms) WHERE status IN ('PENDING','SENDING');
CREATE INDEX outbox_recipient ON outbox (recipient, id) WHERE status IN ('PENDING','SENDING');
CREATE UNIQUE INDEX outbox_provider_id ON outbox (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX outbox_invoice ON outbox (invoice_id);

-- Idempotency-Key on the internal API: the first response for (scope, key) is replayed.
CREATE TABLE idempotency_keys (
  scope TEXT NOT NULL,
  idem_key TEXT NOT NULL,
  request_hash TEXT NOT NULL,
  status_code INTEGER NOT NULL,
  response_body TEXT NOT NULL,
  created_at_ms BIGINT NOT NULL,
  PRIMARY KEY (scope, idem_key)
);

-- Atomic counters (invoice numbers) and small facts (the callback secret).
CREATE TABLE counters (
  name TEXT PRIMARY KEY,
  value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('invoice', 1000);

CREATE TABLE meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
