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
       d.attempts, d.created_at, d.attempts_before_schedule, d.schedule_started_at
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
                               status_code, error, response_excerpt, error_kind)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: update_delivery
UPDATE webhookd_deliveries
SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, last_status = ?, last_error = ?
WHERE id = ? AND state = 'pending';

-- name: pending_counts
SELECT endpoint_id, COUNT(*) FROM webhookd_deliveries WHERE state = 'pending' GROUP BY endpoint_id;

-- name: table_endpoints
SELECT id, url, secret, events, tenant, enabled, max_concurrency, headers, description,
       signature_schemes, previous_secret, previous_secret_expires_at, ca_bundle
FROM webhook_endpoints ORDER BY id;

-- name: rotate_secret
UPDATE webhook_endpoints
SET previous_secret = secret, secret = :secret, previous_secret_expires_at = :expires_at,
    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE id = :id;

-- name: list_deliveries
SELECT d.delivery_id, d.endpoint_id, e.event_id, e.event_type, e.tenant, d.state, d.attempts,
       d.created_at, d.updated_at, d.next_attempt_at, d.last_status, d.last_error, d.id,
       d.schedule_started_at, d.attempts_before_schedule
FROM webhookd_deliveries AS d JOIN webhookd_events AS e ON e.id = d.event_pk
WHERE (:state IS NULL OR d.state = :state)
  AND (:endpoint IS NULL OR d.endpoint_id = :endpoint)
  AND (:event_type IS NULL OR e.event_type = :event_type)
  AND (:event_id IS NULL OR e.event_id = :event_id)
  AND (:tenant IS NULL OR e.tenant = :tenant)
  AND (:delivery_id IS NULL OR d.delivery_id = :delivery_id)
  AND (:since IS NULL OR d.created_at >= :since)
  AND (:until IS NULL OR d.created_at < :until)
ORDER BY d.id DESC
LIMIT :limit;

-- name: list_attempts
SELECT attempt_no, started_at, duration_seconds, result, status_code, error, response_excerpt,
       error_kind
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

-- The circuit breaker (webhookd_endpoint_state) ---------------------------------------------

-- name: endpoint_states
SELECT endpoint_id, state, reason, since, consecutive_failures, failing_since, paused_until,
       cooldown_level, disabled_reason, updated_at
FROM webhookd_endpoint_state ORDER BY endpoint_id;

-- name: save_endpoint_state
INSERT INTO webhookd_endpoint_state (endpoint_id, state, reason, since, consecutive_failures,
                                     failing_since, paused_until, cooldown_level,
                                     disabled_reason, updated_at)
VALUES (:endpoint_id, :state, :reason, :since, :consecutive_failures, :failing_since,
        :paused_until, :cooldown_level, :disabled_reason, :updated_at)
ON CONFLICT (endpoint_id) DO UPDATE SET
    state = excluded.state, reason = excluded.reason, since = excluded.since,
    consecutive_failures = excluded.consecutive_failures, failing_since = excluded.failing_since,
    paused_until = excluded.paused_until, cooldown_level = excluded.cooldown_level,
    disabled_reason = excluded.disabled_reason, updated_at = excluded.updated_at;

-- name: disable_endpoint_row
-- The daemon disabled a table endpoint (410 Gone, or failing for too long): the application
-- sees it in its own table; the trigger moves endpoints_version.
UPDATE webhook_endpoints SET enabled = 0, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE id = :id AND enabled <> 0;

-- name: clear_endpoint_state
DELETE FROM webhookd_endpoint_state WHERE endpoint_id = :id
RETURNING endpoint_id, state, reason, since, consecutive_failures, failing_since, paused_until,
          cooldown_level, disabled_reason, updated_at;

-- name: bump_endpoints_version
UPDATE webhookd_state SET value = value + 1 WHERE key = 'endpoints_version';

-- Administration (`webhookd endpoints|deliveries|events|stats`) ------------------------------

-- name: create_endpoint
INSERT INTO webhook_endpoints (id, url, secret, events, tenant, enabled, max_concurrency, headers,
                               description, signature_schemes, previous_secret,
                               previous_secret_expires_at, ca_bundle)
VALUES (:id, :url, :secret, :events, :tenant, :enabled, :max_concurrency, :headers, :description,
        :signature_schemes, :previous_secret, :previous_secret_expires_at, :ca_bundle)
ON CONFLICT (id) DO NOTHING;

-- name: update_endpoint
UPDATE webhook_endpoints
SET url = :url, secret = :secret, events = :events, tenant = :tenant, enabled = :enabled,
    max_concurrency = :max_concurrency, headers = :headers, description = :description,
    signature_schemes = :signature_schemes, previous_secret = :previous_secret,
    previous_secret_expires_at = :previous_secret_expires_at, ca_bundle = :ca_bundle,
    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE id = :id;

-- name: endpoint_exists
SELECT 1 FROM webhook_endpoints WHERE id = :id;

-- name: endpoint_pending
SELECT COUNT(*) FROM webhookd_deliveries WHERE endpoint_id = :id AND state = 'pending';

-- name: delete_endpoint
DELETE FROM webhook_endpoints WHERE id = :id;

-- name: endpoint_health_window
-- Per endpoint over the window: attempts, successes, and the nearest-rank 95th percentile of
-- the durations: the smallest duration that at least 95% of the durations are <= to.
-- (One window, one sort; webhookd_attempts_started covers the columns read from attempts.)
WITH w AS (
    SELECT d.endpoint_id AS endpoint_id, t.duration_seconds AS duration, t.result AS result,
           CUME_DIST() OVER (PARTITION BY d.endpoint_id ORDER BY t.duration_seconds) AS share
    FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
    WHERE t.started_at >= :since
)
SELECT endpoint_id, COUNT(*), SUM(result = 'success'),
       MIN(CASE WHEN share >= 0.95 THEN duration END)
FROM w GROUP BY endpoint_id;

-- name: endpoint_last_errors
-- SQLite takes the bare columns from the row that holds the MAX.
SELECT d.endpoint_id, t.error, t.status_code, MAX(t.started_at)
FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
WHERE t.result <> 'success'
GROUP BY d.endpoint_id;

-- name: requeue_deliveries
UPDATE webhookd_deliveries
SET state = 'pending', next_attempt_at = :now, schedule_started_at = :now,
    attempts_before_schedule = attempts, updated_at = :now
WHERE delivery_id IN (SELECT value FROM json_each(:ids))
  AND state IN (SELECT value FROM json_each(:states))
RETURNING delivery_id;

-- name: bump_requeued
INSERT INTO webhookd_state (key, value) VALUES ('deliveries_requeued', 1)
ON CONFLICT (key) DO UPDATE SET value = value + 1;

-- name: requeued_version
SELECT value FROM webhookd_state WHERE key = 'deliveries_requeued';

-- name: get_event
SELECT event_id, event_type, tenant, occurred_at, outbox_id, created_at
FROM webhookd_events WHERE event_id = :event_id;

-- name: quarantined_event
SELECT outbox_id, reason, detail, event_type, event_id, quarantined_at
FROM webhookd_quarantine WHERE event_id = :event_id ORDER BY outbox_id;

-- name: unprocessed_outbox_id
SELECT id FROM webhook_outbox WHERE event_id = :event_id AND id > :after;

-- name: stats_backlog
SELECT (SELECT COUNT(*) FROM webhook_outbox WHERE id > :after),
       (SELECT COUNT(*) FROM webhookd_deliveries WHERE state = 'pending'),
       (SELECT COUNT(*) FROM webhookd_deliveries
        WHERE state = 'pending' AND next_attempt_at <= :now),
       (SELECT COUNT(*) FROM webhookd_deliveries
        WHERE state = 'succeeded' AND updated_at >= :since),
       (SELECT COUNT(*) FROM webhookd_deliveries WHERE state = 'failed' AND updated_at >= :since),
       (SELECT COUNT(*) FROM webhookd_quarantine WHERE quarantined_at >= :since);

-- name: stats_attempts
SELECT COUNT(*), COALESCE(SUM(result = 'success'), 0)
FROM webhookd_attempts WHERE started_at >= :since;

-- name: stats_failures_by_endpoint
SELECT d.endpoint_id, COUNT(*) AS failures
FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
WHERE t.started_at >= :since AND t.result <> 'success'
GROUP BY d.endpoint_id
ORDER BY failures DESC, d.endpoint_id
LIMIT :top;

-- Retention (webhookd.retention). The rows to delete are found outside any transaction (a pass
-- with nothing to delete takes no lock at all), then deleted in one short write transaction
-- that checks the conditions again. ----------------------------------------------------------

-- name: prunable_deliveries
-- The oldest deliveries in a final state, by the (state, updated_at) index.
SELECT id FROM webhookd_deliveries
WHERE state = :state AND updated_at < :before
ORDER BY updated_at, id
LIMIT :limit;

-- name: delete_attempts_of
DELETE FROM webhookd_attempts WHERE delivery_pk IN (
    SELECT id FROM webhookd_deliveries
    WHERE id IN (SELECT value FROM json_each(:pks)) AND state = :state AND updated_at < :before);

-- name: delete_deliveries
-- `webhookd deliveries retry` may have made one pending again since it was found.
DELETE FROM webhookd_deliveries
WHERE id IN (SELECT value FROM json_each(:pks)) AND state = :state AND updated_at < :before;

-- name: prunable_events
-- Events older than :before with no deliveries left, in pk order after :after. Event pks grow
-- with created_at, so the scan stops at the first event fanned out since :before (found by
-- the created_at index) instead of reading every recent event; created_at is checked anyway.
SELECT e.id FROM webhookd_events AS e
WHERE e.id > :after
  AND e.id < COALESCE((SELECT y.id FROM webhookd_events AS y WHERE y.created_at >= :before
                       ORDER BY y.created_at, y.id LIMIT 1), 9223372036854775807)
  AND e.created_at < :before
  AND NOT EXISTS (SELECT 1 FROM webhookd_deliveries AS d WHERE d.event_pk = e.id)
ORDER BY e.id
LIMIT :limit;

-- name: delete_events
DELETE FROM webhookd_events
WHERE id IN (SELECT value FROM json_each(:pks))
  AND created_at < :before
  AND NOT EXISTS (SELECT 1 FROM webhookd_deliveries AS d
                  WHERE d.event_pk = webhookd_events.id);

-- name: prunable_outbox
-- Outbox rows are fanned out in id order, so the rows fanned out before :before are those below
-- the first row fanned out since (an event's or a quarantine row's outbox_id), and never a row
-- past the cursor. The application's AUTOINCREMENT keeps ids from being reused after deletes.
SELECT id FROM webhook_outbox
WHERE id <= (SELECT value FROM webhookd_state WHERE key = 'outbox_cursor')
  AND id < COALESCE(
      (SELECT MIN(first_recent) FROM (
           SELECT (SELECT outbox_id FROM webhookd_events
                   WHERE created_at >= :before AND outbox_id IS NOT NULL
                   ORDER BY created_at, id LIMIT 1) AS first_recent
           UNION ALL
           SELECT (SELECT outbox_id FROM webhookd_quarantine
                   WHERE quarantined_at >= :before
                   ORDER BY quarantined_at, outbox_id LIMIT 1))),
      9223372036854775807)
ORDER BY id
LIMIT :limit;

-- name: delete_outbox
DELETE FROM webhook_outbox
WHERE id IN (SELECT value FROM json_each(:pks))
  AND id <= (SELECT value FROM webhookd_state WHERE key = 'outbox_cursor');

-- name: prunable_quarantine
SELECT outbox_id FROM webhookd_quarantine
WHERE quarantined_at < :before
ORDER BY quarantined_at, outbox_id
LIMIT :limit;

-- name: delete_quarantine
DELETE FROM webhookd_quarantine
WHERE outbox_id IN (SELECT value FROM json_each(:pks)) AND quarantined_at < :before;
