-- Named queries of the SQLite store. Each starts with a "-- name: NAME" line.

-- name: get_cursor
SELECT value FROM webhookd_state WHERE key = 'outbox_cursor';

-- name: advance_cursor
UPDATE webhookd_state SET value = :new WHERE key = 'outbox_cursor' AND value = :old;

-- name: endpoints_version
SELECT value FROM webhookd_state WHERE key = 'endpoints_version';

-- name: read_outbox
-- As bytes, so that text that is not valid UTF-8 is quarantined instead of failing the read.
-- A payload over :max_payload bytes is not read at all (NULL), only its size.
SELECT id, CAST(event_type AS BLOB),
       CASE WHEN :max_payload IS NULL OR length(CAST(payload AS BLOB)) <= :max_payload
            THEN CAST(payload AS BLOB) END,
       CAST(event_id AS BLOB), CAST(tenant AS BLOB), CAST(occurred_at AS BLOB),
       length(CAST(payload AS BLOB))
FROM webhook_outbox WHERE id > :after ORDER BY id LIMIT :limit;

-- name: oldest_unprocessed
SELECT CAST(occurred_at AS BLOB) FROM webhook_outbox WHERE id > :after ORDER BY id LIMIT 1;

-- name: existing_event_ids
SELECT event_id FROM webhookd_events WHERE event_id IN (SELECT value FROM json_each(:ids));

-- name: max_event_pk
SELECT COALESCE(MAX(id), 0) FROM webhookd_events;

-- name: insert_event
INSERT INTO webhookd_events (id, outbox_id, event_id, event_type, tenant, occurred_at, body,
                             created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_delivery
INSERT INTO webhookd_deliveries (delivery_id, event_pk, endpoint_id, state, attempts,
                                 next_attempt_at, created_at, updated_at)
VALUES (?, ?, ?, 'pending', 0, ?, ?, ?);

-- name: insert_quarantine
INSERT OR REPLACE INTO webhookd_quarantine (outbox_id, reason, detail, event_type, event_id,
                                            quarantined_at)
VALUES (?, ?, ?, ?, ?, ?);

-- name: claim_due
SELECT d.id, d.delivery_id, d.endpoint_id, e.event_id, e.event_type, e.occurred_at, e.body,
       d.attempts, d.created_at
FROM webhookd_deliveries AS d JOIN webhookd_events AS e ON e.id = d.event_pk
WHERE d.endpoint_id = :endpoint AND d.state = 'pending' AND d.next_attempt_at <= :now
  AND d.id NOT IN (SELECT value FROM json_each(:leased))
ORDER BY d.next_attempt_at, d.id
LIMIT :limit;

-- name: next_due
SELECT next_attempt_at FROM webhookd_deliveries
WHERE endpoint_id = :endpoint AND state = 'pending'
  AND id NOT IN (SELECT value FROM json_each(:leased))
ORDER BY next_attempt_at LIMIT 1;

-- name: insert_attempt
INSERT INTO webhookd_attempts (delivery_pk, attempt_no, started_at, duration_seconds, result,
                               status_code, error, response_excerpt)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: update_delivery
UPDATE webhookd_deliveries
SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, last_status = ?, last_error = ?
WHERE id = ? AND state = 'pending';

-- name: pending_counts
SELECT endpoint_id, COUNT(*) FROM webhookd_deliveries WHERE state = 'pending' GROUP BY endpoint_id;

-- name: table_endpoints
SELECT id, url, secret, events, tenant, enabled, max_concurrency, headers, description,
       signature_schemes, previous_secret, previous_secret_expires_at
FROM webhook_endpoints ORDER BY id;

-- name: rotate_secret
UPDATE webhook_endpoints
SET previous_secret = secret, secret = :secret, previous_secret_expires_at = :expires_at,
    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE id = :id;

-- name: list_deliveries
SELECT d.delivery_id, d.endpoint_id, e.event_id, e.event_type, e.tenant, d.state, d.attempts,
       d.created_at, d.updated_at, d.next_attempt_at, d.last_status, d.last_error, d.id
FROM webhookd_deliveries AS d JOIN webhookd_events AS e ON e.id = d.event_pk
WHERE (:state IS NULL OR d.state = :state)
  AND (:endpoint IS NULL OR d.endpoint_id = :endpoint)
  AND (:event_type IS NULL OR e.event_type = :event_type)
  AND (:event_id IS NULL OR e.event_id = :event_id)
  AND (:tenant IS NULL OR e.tenant = :tenant)
  AND (:delivery_id IS NULL OR d.delivery_id = :delivery_id)
ORDER BY d.id DESC
LIMIT :limit;

-- name: list_attempts
SELECT attempt_no, started_at, duration_seconds, result, status_code, error, response_excerpt
FROM webhookd_attempts WHERE delivery_pk = :pk ORDER BY attempt_no, id;

-- name: list_quarantine
SELECT outbox_id, reason, detail, event_type, event_id, quarantined_at
FROM webhookd_quarantine ORDER BY outbox_id DESC LIMIT :limit;

-- name: insert_test_event
-- `webhookd send-test`: an event that no outbox row produced (outbox_id stays NULL).
INSERT INTO webhookd_events (outbox_id, event_id, event_type, tenant, occurred_at, body,
                             created_at)
VALUES (NULL, :event_id, :event_type, :tenant, :occurred_at, :body, :now);

-- name: insert_test_delivery
-- Born in its final state: a test send is made once and never retried.
INSERT INTO webhookd_deliveries (delivery_id, event_pk, endpoint_id, state, attempts,
                                 next_attempt_at, created_at, updated_at, last_status, last_error)
VALUES (:delivery_id, :event_pk, :endpoint_id, :state, :attempts, NULL, :now, :now,
        :last_status, :last_error);
