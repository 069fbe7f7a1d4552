-- Named queries of the PostgreSQL store. Each starts with a "-- name: NAME" line. Parameters
-- are written :name; the backend turns them into $1, $2, ... (a "::" cast is left alone).
-- Lease times are the database's clock (clock_timestamp()), because replicas' clocks differ;
-- next_attempt_at and the other times are the caller's, like on SQLite.

-- name: endpoints_version
SELECT value FROM webhookd_state WHERE key = 'endpoints_version';

-- name: changes
-- (A sequence not yet used says last_value 1 too: is_called tells them apart.)
SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM webhookd_changes;

-- Fan-out ---------------------------------------------------------------------------------------

-- name: claim_outbox
-- Rows not fanned out yet, oldest id first, locked for this fan-out transaction: a replica
-- fanning out at the same time skips them and takes the next ones. A row whose transaction
-- commits after later ids did is still NULL here, so it is read when it appears.
-- A payload over :max_payload bytes is not read (NULL), only its size (which needs no detoast).
SELECT id, event_type,
       CASE WHEN :max_payload::bigint IS NULL OR octet_length(payload) <= :max_payload::bigint
            THEN payload END,
       event_id, tenant, occurred_at, octet_length(payload)
FROM webhook_outbox WHERE processed_at IS NULL
ORDER BY id LIMIT :limit
FOR UPDATE SKIP LOCKED;

-- name: mark_processed
UPDATE webhook_outbox SET processed_at = :now WHERE id = ANY(:ids::bigint[]);

-- name: oldest_unprocessed
SELECT occurred_at FROM webhook_outbox WHERE processed_at IS NULL ORDER BY id LIMIT 1;

-- name: existing_event_ids
SELECT event_id FROM webhookd_events WHERE event_id = ANY(:ids::text[]);

-- name: insert_events
INSERT INTO webhookd_events (outbox_id, event_id, event_type, tenant, occurred_at, body,
                             created_at)
SELECT o, e, t, n, a, b, :now
FROM unnest(:outbox_ids::bigint[], :event_ids::text[], :event_types::text[], :tenants::text[],
            :occurred::text[], :bodies::bytea[]) AS x(o, e, t, n, a, b)
RETURNING id, event_id;

-- name: insert_deliveries
INSERT INTO webhookd_deliveries (delivery_id, event_pk, endpoint_id, state, attempts,
                                 next_attempt_at, created_at, updated_at)
SELECT d, e, p, 'pending', 0, :now, :now, :now
FROM unnest(:delivery_ids::text[], :event_pks::bigint[], :endpoint_ids::text[]) AS x(d, e, p);

-- name: insert_quarantine
INSERT INTO webhookd_quarantine (outbox_id, reason, detail, event_type, event_id,
                                 quarantined_at)
SELECT o, r, d, t, e, :now
FROM unnest(:outbox_ids::bigint[], :reasons::text[], :details::text[], :event_types::text[],
            :event_ids::text[]) AS x(o, r, d, t, e)
ON CONFLICT (outbox_id) DO UPDATE SET
    reason = excluded.reason, detail = excluded.detail, event_type = excluded.event_type,
    event_id = excluded.event_id, quarantined_at = excluded.quarantined_at;

-- name: notify_due
SELECT pg_notify('webhookd_due', :endpoints::text);

-- name: notify_outbox
SELECT pg_notify('webhookd_outbox', '');

-- Claiming and leases ---------------------------------------------------------------------------

-- name: claim_lock
-- Serialises the claims of one endpoint across replicas (until the transaction ends), so that
-- counting its live leases and taking new ones is one step.
SELECT pg_advisory_xact_lock(1751412845, hashtext(:endpoint::text));

-- name: claim_due
-- At most min(:limit, :cap - live leases) due deliveries that nobody holds a live lease on
-- (nor this backend: :held), leased to :owner until the database's now + :lease. Run after
-- claim_lock, in its transaction (a new statement: it sees the claims committed before it).
WITH t AS (
    SELECT extract(epoch FROM clock_timestamp())::float8 AS db_now
), live AS (
    SELECT COUNT(*) AS n FROM webhookd_deliveries, t
    WHERE endpoint_id = :endpoint AND state = 'pending' AND lease_until > t.db_now
), due AS (
    SELECT id FROM webhookd_deliveries, t
    WHERE endpoint_id = :endpoint AND state = 'pending' AND next_attempt_at <= :now::float8
      AND (lease_until IS NULL OR lease_until <= t.db_now)
      AND id <> ALL(:held::bigint[])
    ORDER BY next_attempt_at, id
    LIMIT GREATEST(0, LEAST(:limit::bigint,
                            COALESCE(:cap::bigint - (SELECT n FROM live), :limit::bigint)))
    FOR UPDATE OF webhookd_deliveries SKIP LOCKED
), claimed AS (
    UPDATE webhookd_deliveries AS d
    SET lease_owner = :owner, lease_until = t.db_now + :lease::float8
    FROM due, t WHERE d.id = due.id
    RETURNING d.id, d.delivery_id, d.endpoint_id, d.event_pk, d.attempts, d.created_at,
              d.attempts_before_schedule, d.schedule_started_at, d.next_attempt_at
)
SELECT c.id, c.delivery_id, c.endpoint_id, e.event_id, e.event_type, e.occurred_at, e.body,
       c.attempts, c.created_at, c.attempts_before_schedule, c.schedule_started_at
FROM claimed AS c JOIN webhookd_events AS e ON e.id = c.event_pk
ORDER BY c.next_attempt_at, c.id;

-- name: next_due
-- The earliest due time of a delivery nobody holds, the earliest end of a live lease that
-- another replica holds (when it expires, this one may take the delivery), and the database's
-- now (the lease end is in its clock).
SELECT MIN(d.next_attempt_at) FILTER (
           WHERE (d.lease_until IS NULL OR d.lease_until <= t.db_now)
             AND d.id <> ALL(:held::bigint[])),
       MIN(d.lease_until) FILTER (
           WHERE d.lease_until > t.db_now AND d.lease_owner IS DISTINCT FROM :owner::text),
       MAX(t.db_now)
FROM webhookd_deliveries AS d
CROSS JOIN (SELECT extract(epoch FROM clock_timestamp())::float8 AS db_now) AS t
WHERE d.endpoint_id = :endpoint AND d.state = 'pending';

-- name: renew_leases
UPDATE webhookd_deliveries
SET lease_until = extract(epoch FROM clock_timestamp())::float8 + :lease::float8
WHERE id = ANY(:pks::bigint[]) AND lease_owner = :owner AND state = 'pending'
RETURNING id;

-- name: release_leases
UPDATE webhookd_deliveries SET lease_owner = NULL, lease_until = NULL
WHERE id = ANY(:pks::bigint[]) AND lease_owner = :owner;

-- name: release_all_leases
UPDATE webhookd_deliveries SET lease_owner = NULL, lease_until = NULL
WHERE lease_owner = :owner AND state = 'pending';

-- name: record
-- Completion is accepted only from the lease holder: a delivery whose lease this backend lost
-- (it expired and another replica claimed it) gets neither the attempt nor the new state.
WITH o AS (
    SELECT * FROM unnest(:pks::bigint[], :attempt_nos::int[], :started::float8[],
                         :durations::float8[], :results::text[], :statuses::int[],
                         :errors::text[], :excerpts::text[], :kinds::text[], :states::text[],
                         :next_at::float8[])
        AS x(pk, attempt_no, started_at, duration, result, status, error, excerpt, kind, state,
             next_at)
), upd AS (
    UPDATE webhookd_deliveries AS d
    SET state = o.state, attempts = o.attempt_no, next_attempt_at = o.next_at,
        updated_at = :now, last_status = o.status, last_error = o.error,
        lease_owner = NULL, lease_until = NULL
    FROM o
    WHERE d.id = o.pk AND d.state = 'pending' AND d.lease_owner = :owner
    RETURNING d.id
), ins AS (
    INSERT INTO webhookd_attempts (delivery_pk, attempt_no, started_at, duration_seconds, result,
                                   status_code, error, response_excerpt, error_kind)
    SELECT o.pk, o.attempt_no, o.started_at, o.duration, o.result, o.status, o.error, o.excerpt,
           o.kind
    FROM o JOIN upd ON upd.id = o.pk
)
SELECT id FROM upd;

-- name: pending_counts
SELECT endpoint_id, COUNT(*) FROM webhookd_deliveries WHERE state = 'pending' GROUP BY endpoint_id;

-- name: insert_test_event
INSERT INTO webhookd_events (outbox_id, event_id, event_type, tenant, occurred_at, body,
                             created_at)
VALUES (NULL, :event_id, :event_type, :tenant, :occurred_at, :body, :now)
RETURNING id;

-- name: insert_test_delivery
INSERT INTO webhookd_deliveries (delivery_id, event_pk, endpoint_id, state, attempts,
                                 next_attempt_at, created_at, updated_at, last_status, last_error)
VALUES (:delivery_id, :event_pk, :endpoint_id, :state, :attempts, NULL, :now, :now,
        :last_status, :last_error)
RETURNING id;

-- name: insert_attempt
INSERT INTO webhookd_attempts (delivery_pk, attempt_no, started_at, duration_seconds, result,
                               status_code, error, response_excerpt, error_kind)
VALUES (:pk, :attempt_no, :started_at, :duration, :result, :status, :error, :excerpt, :kind);

-- Endpoints -------------------------------------------------------------------------------------

-- name: table_endpoints
SELECT id, url, secret, events, tenant, enabled, max_concurrency, headers, description,
       signature_schemes, previous_secret, previous_secret_expires_at, ca_bundle
FROM webhook_endpoints ORDER BY id;

-- name: rotate_secret
UPDATE webhook_endpoints
SET previous_secret = secret, secret = :secret, previous_secret_expires_at = :expires_at,
    updated_at = webhookd_iso_now()
WHERE id = :id;

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
UPDATE webhook_endpoints SET enabled = 0, updated_at = webhookd_iso_now()
WHERE id = :id AND enabled <> 0;

-- name: clear_endpoint_state
DELETE FROM webhookd_endpoint_state WHERE endpoint_id = :id
RETURNING endpoint_id, state, reason, since, consecutive_failures, failing_since, paused_until,
          cooldown_level, disabled_reason, updated_at;

-- name: bump_endpoints_version
UPDATE webhookd_state SET value = value + 1 WHERE key = 'endpoints_version';

-- Listing -----------------------------------------------------------------------------------------

-- name: list_deliveries
SELECT d.delivery_id, d.endpoint_id, e.event_id, e.event_type, e.tenant, d.state, d.attempts,
       d.created_at, d.updated_at, d.next_attempt_at, d.last_status, d.last_error, d.id,
       d.schedule_started_at, d.attempts_before_schedule
FROM webhookd_deliveries AS d JOIN webhookd_events AS e ON e.id = d.event_pk
WHERE (:state::text IS NULL OR d.state = :state::text)
  AND (:endpoint::text IS NULL OR d.endpoint_id = :endpoint::text)
  AND (:event_type::text IS NULL OR e.event_type = :event_type::text)
  AND (:event_id::text IS NULL OR e.event_id = :event_id::text)
  AND (:tenant::text IS NULL OR e.tenant = :tenant::text)
  AND (:delivery_id::text IS NULL OR d.delivery_id = :delivery_id::text)
  AND (:since::float8 IS NULL OR d.created_at >= :since::float8)
  AND (:until::float8 IS NULL OR d.created_at < :until::float8)
ORDER BY d.id DESC
LIMIT CASE WHEN :limit::bigint < 0 THEN NULL ELSE :limit::bigint END;

-- name: find_delivery
SELECT id FROM webhookd_deliveries WHERE delivery_id = :delivery_id;

-- name: list_attempts
SELECT attempt_no, started_at, duration_seconds, result, status_code, error, response_excerpt,
       error_kind
FROM webhookd_attempts WHERE delivery_pk = :pk ORDER BY attempt_no, id;

-- name: list_quarantine
SELECT outbox_id, reason, detail, event_type, event_id, quarantined_at
FROM webhookd_quarantine ORDER BY outbox_id DESC
LIMIT CASE WHEN :limit::bigint < 0 THEN NULL ELSE :limit::bigint END;

-- Administration ------------------------------------------------------------------------------

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
    updated_at = webhookd_iso_now()
WHERE id = :id;

-- name: endpoint_exists
-- Locked: the pending count and the delete that follow see no endpoint change in between.
SELECT 1 FROM webhook_endpoints WHERE id = :id FOR UPDATE;

-- name: endpoint_pending
SELECT COUNT(*) FROM webhookd_deliveries WHERE endpoint_id = :id AND state = 'pending';

-- name: delete_endpoint
DELETE FROM webhook_endpoints WHERE id = :id;

-- name: endpoint_health_window
WITH w AS (
    SELECT d.endpoint_id AS endpoint_id, t.duration_seconds AS duration, t.result AS result,
           CUME_DIST() OVER (PARTITION BY d.endpoint_id ORDER BY t.duration_seconds) AS share
    FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
    WHERE t.started_at >= :since
)
SELECT endpoint_id, COUNT(*), COUNT(*) FILTER (WHERE result = 'success'),
       MIN(CASE WHEN share >= 0.95 THEN duration END)
FROM w GROUP BY endpoint_id;

-- name: endpoint_last_errors
SELECT DISTINCT ON (d.endpoint_id) d.endpoint_id, t.error, t.status_code, t.started_at
FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
WHERE t.result <> 'success'
ORDER BY d.endpoint_id, t.started_at DESC, t.id DESC;

-- name: requeue_deliveries
UPDATE webhookd_deliveries
SET state = 'pending', next_attempt_at = :now, schedule_started_at = :now,
    attempts_before_schedule = attempts, updated_at = :now,
    lease_owner = NULL, lease_until = NULL
WHERE delivery_id = ANY(:ids::text[]) AND state = ANY(:states::text[])
RETURNING delivery_id, endpoint_id;

-- name: bump_requeued
INSERT INTO webhookd_state (key, value) VALUES ('deliveries_requeued', 1)
ON CONFLICT (key) DO UPDATE SET value = webhookd_state.value + 1;

-- name: requeued_version
SELECT value FROM webhookd_state WHERE key = 'deliveries_requeued';

-- name: get_event
SELECT event_id, event_type, tenant, occurred_at, outbox_id, created_at
FROM webhookd_events WHERE event_id = :event_id;

-- name: quarantined_event
SELECT outbox_id, reason, detail, event_type, event_id, quarantined_at
FROM webhookd_quarantine WHERE event_id = :event_id ORDER BY outbox_id;

-- name: unprocessed_outbox_id
SELECT id FROM webhook_outbox WHERE event_id = :event_id AND processed_at IS NULL;

-- name: stats_backlog
SELECT (SELECT COUNT(*) FROM webhook_outbox WHERE processed_at IS NULL),
       (SELECT COUNT(*) FROM webhookd_deliveries WHERE state = 'pending'),
       (SELECT COUNT(*) FROM webhookd_deliveries
        WHERE state = 'pending' AND next_attempt_at <= :now::float8),
       (SELECT COUNT(*) FROM webhookd_deliveries
        WHERE state = 'succeeded' AND updated_at >= :since::float8),
       (SELECT COUNT(*) FROM webhookd_deliveries
        WHERE state = 'failed' AND updated_at >= :since::float8),
       (SELECT COUNT(*) FROM webhookd_quarantine WHERE quarantined_at >= :since::float8);

-- name: stats_attempts
SELECT COUNT(*), COUNT(*) FILTER (WHERE result = 'success')
FROM webhookd_attempts WHERE started_at >= :since;

-- name: stats_failures_by_endpoint
SELECT d.endpoint_id, COUNT(*) AS failures
FROM webhookd_attempts AS t JOIN webhookd_deliveries AS d ON d.id = t.delivery_pk
WHERE t.started_at >= :since AND t.result <> 'success'
GROUP BY d.endpoint_id
ORDER BY failures DESC, d.endpoint_id
LIMIT :top;

-- Retention: one short transaction per batch; rows another replica is pruning are skipped. ------

-- name: prune_deliveries
WITH doomed AS (
    SELECT id FROM webhookd_deliveries
    WHERE state = :state AND updated_at < :before
    ORDER BY updated_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), attempts AS (
    DELETE FROM webhookd_attempts WHERE delivery_pk IN (SELECT id FROM doomed) RETURNING 1
), deliveries AS (
    DELETE FROM webhookd_deliveries WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT (SELECT COUNT(*) FROM deliveries), (SELECT COUNT(*) FROM attempts);

-- name: prune_events
-- Events older than :before with no deliveries left, in pk order after :after (see the SQLite
-- query: the scan stops at the first event fanned out since :before).
WITH found AS (
    SELECT e.id FROM webhookd_events AS e
    WHERE e.id > :after
      AND e.id < COALESCE((SELECT y.id FROM webhookd_events AS y WHERE y.created_at >= :before
                           ORDER BY y.created_at, y.id LIMIT 1), 9223372036854775807)
      AND e.created_at < :before
      AND NOT EXISTS (SELECT 1 FROM webhookd_deliveries AS d WHERE d.event_pk = e.id)
    ORDER BY e.id
    LIMIT :limit
), deleted AS (
    DELETE FROM webhookd_events AS e
    WHERE e.id IN (SELECT id FROM found)
      AND NOT EXISTS (SELECT 1 FROM webhookd_deliveries AS d WHERE d.event_pk = e.id)
    RETURNING 1
)
SELECT (SELECT COUNT(*) FROM deleted), (SELECT COUNT(*) FROM found), (SELECT MAX(id) FROM found);

-- name: prune_outbox
-- Only rows fanned out (processed_at set) before :before, oldest first.
WITH doomed AS (
    SELECT id FROM webhook_outbox
    WHERE processed_at < :before
    ORDER BY processed_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM doomed);

-- name: prune_quarantine
WITH doomed AS (
    SELECT outbox_id FROM webhookd_quarantine
    WHERE quarantined_at < :before
    ORDER BY quarantined_at, outbox_id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
DELETE FROM webhookd_quarantine WHERE outbox_id IN (SELECT outbox_id FROM doomed);
