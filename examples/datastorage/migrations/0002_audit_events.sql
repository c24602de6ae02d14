-- 0002: the audit event store.
-- id is the idempotency key: clients may supply it, inserts use
-- ON CONFLICT (id) DO NOTHING (also when draining the dead-letter queue).
-- The CHECK constraints mirror the API validation as a last line of defence.

CREATE TABLE audit_events (
    id             uuid        PRIMARY KEY,
    event_type     text        NOT NULL
        CHECK (char_length(event_type) BETWEEN 1 AND 100 AND event_type ~ '^[a-z0-9_.:-]+$'),
    actor          text        NOT NULL CHECK (char_length(actor) BETWEEN 1 AND 200),
    correlation_id text        NOT NULL CHECK (char_length(correlation_id) BETWEEN 1 AND 100),
    occurred_at    timestamptz NOT NULL,
    payload        jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(payload) = 'object'),
    received_at    timestamptz NOT NULL DEFAULT now()
);

-- Listing is ordered by (occurred_at, id); each filter gets an index that also
-- serves that order, and keyset pagination uses the row comparison.
CREATE INDEX audit_events_occurred_at_idx    ON audit_events (occurred_at, id);
CREATE INDEX audit_events_correlation_id_idx ON audit_events (correlation_id, occurred_at, id);
CREATE INDEX audit_events_event_type_idx     ON audit_events (event_type, occurred_at, id);
CREATE INDEX audit_events_actor_idx          ON audit_events (actor, occurred_at, id);

INSERT INTO schema_version (version, name) VALUES (2, '0002_audit_events');
