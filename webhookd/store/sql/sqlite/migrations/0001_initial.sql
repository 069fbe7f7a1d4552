-- webhookd schema 1: the outbox contract, endpoints, events, deliveries, attempts, quarantine.

-- The application INSERTs here (DESIGN.md, "Outbox contract"). Ids are assigned in commit order
-- because SQLite has a single writer, so webhookd can follow the table with a cursor.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    event_id    TEXT UNIQUE,
    tenant      TEXT,
    occurred_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Endpoints managed by the application or by `webhookd endpoints ...`.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id              TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    secret          TEXT NOT NULL,
    events          TEXT NOT NULL DEFAULT '*',
    tenant          TEXT,
    enabled         INTEGER NOT NULL DEFAULT 1,
    max_concurrency INTEGER,
    headers         TEXT,
    description     TEXT NOT NULL DEFAULT '',
    -- 'seed', 'standard' or both ('seed,standard'): which signature headers are sent.
    signature_schemes TEXT NOT NULL DEFAULT 'seed',
    -- Set by `webhookd endpoints rotate-secret`: the old secret still signs until it expires.
    previous_secret            TEXT,
    previous_secret_expires_at TEXT,
    -- Absolute path of a PEM file: the CAs trusted for this endpoint's TLS instead of the
    -- system's (NULL: delivery.ca_bundle, else the system's).
    ca_bundle       TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- The daemon's bookkeeping: the outbox cursor and a counter bumped by every endpoint change.
CREATE TABLE IF NOT EXISTS webhookd_state (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO webhookd_state (key, value) VALUES ('outbox_cursor', 0);
INSERT OR IGNORE INTO webhookd_state (key, value) VALUES ('endpoints_version', 0);
-- Bumped by `webhookd deliveries retry`, so that a running daemon wakes its endpoint workers.
INSERT OR IGNORE INTO webhookd_state (key, value) VALUES ('deliveries_requeued', 0);

CREATE TRIGGER IF NOT EXISTS webhook_endpoints_inserted AFTER INSERT ON webhook_endpoints
BEGIN
    UPDATE webhookd_state SET value = value + 1 WHERE key = 'endpoints_version';
END;
CREATE TRIGGER IF NOT EXISTS webhook_endpoints_updated AFTER UPDATE ON webhook_endpoints
BEGIN
    UPDATE webhookd_state SET value = value + 1 WHERE key = 'endpoints_version';
END;
CREATE TRIGGER IF NOT EXISTS webhook_endpoints_deleted AFTER DELETE ON webhook_endpoints
BEGIN
    UPDATE webhookd_state SET value = value + 1 WHERE key = 'endpoints_version';
END;

-- One row per fanned-out event, with the exact body every delivery of it sends.
-- outbox_id is NULL for test events sent by `webhookd send-test`.
CREATE TABLE IF NOT EXISTS webhookd_events (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER UNIQUE,
    event_id    TEXT NOT NULL UNIQUE,
    event_type  TEXT NOT NULL,
    tenant      TEXT,
    occurred_at TEXT NOT NULL,
    body        BLOB NOT NULL,
    created_at  REAL NOT NULL
);
-- Retention: where the events fanned out since a given time begin.
CREATE INDEX IF NOT EXISTS webhookd_events_created ON webhookd_events (created_at);

-- One row per event x endpoint. Times are Unix seconds.
CREATE TABLE IF NOT EXISTS webhookd_deliveries (
    id              INTEGER PRIMARY KEY,
    delivery_id     TEXT NOT NULL UNIQUE,
    event_pk        INTEGER NOT NULL REFERENCES webhookd_events (id),
    endpoint_id     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'succeeded', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    -- `webhookd deliveries retry` starts a fresh retry schedule: the attempt budget
    -- (retry.max_attempts) counts from attempts_before_schedule and the age budget
    -- (retry.max_age_seconds) from schedule_started_at (NULL: created_at, never retried).
    schedule_started_at      REAL,
    attempts_before_schedule INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS webhookd_deliveries_due
    ON webhookd_deliveries (endpoint_id, next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhookd_deliveries_event ON webhookd_deliveries (event_pk);
CREATE INDEX IF NOT EXISTS webhookd_deliveries_updated ON webhookd_deliveries (updated_at);
-- Retention: the oldest succeeded (or failed) deliveries first.
CREATE INDEX IF NOT EXISTS webhookd_deliveries_final ON webhookd_deliveries (state, updated_at);

CREATE TABLE IF NOT EXISTS webhookd_attempts (
    id               INTEGER PRIMARY KEY,
    delivery_pk      INTEGER NOT NULL REFERENCES webhookd_deliveries (id),
    attempt_no       INTEGER NOT NULL,
    started_at       REAL NOT NULL,
    duration_seconds REAL NOT NULL,
    result           TEXT NOT NULL,
    status_code      INTEGER,
    error            TEXT,
    response_excerpt TEXT,
    -- What exactly failed: connect_timeout, read_timeout, connection_refused, connection_reset,
    -- connection_closed, dns, tls, protocol, network, redirect, gone, rate_limited, http_status.
    error_kind       TEXT
);
CREATE INDEX IF NOT EXISTS webhookd_attempts_delivery ON webhookd_attempts (delivery_pk, attempt_no);
-- Health and stats over a recent window (`webhookd endpoints list`, `webhookd stats`): covers
-- what those read, so a window of 100k attempts is read from the index alone.
CREATE INDEX IF NOT EXISTS webhookd_attempts_started
    ON webhookd_attempts (started_at, delivery_pk, duration_seconds, result);

-- Outbox rows that break the contract, with the reason; they never block the rows behind them.
CREATE TABLE IF NOT EXISTS webhookd_quarantine (
    outbox_id      INTEGER PRIMARY KEY,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    event_type     TEXT,
    event_id       TEXT,
    quarantined_at REAL NOT NULL
);
-- Retention: the oldest quarantine rows first, and where the recent fan-outs begin.
CREATE INDEX IF NOT EXISTS webhookd_quarantine_time ON webhookd_quarantine (quarantined_at);

-- The daemon's own view of each endpoint's health (the circuit breaker), kept across restarts.
-- No row: ok. `webhookd endpoints enable` deletes the row (and moves endpoints_version), which
-- a running daemon takes as "start afresh".
CREATE TABLE IF NOT EXISTS webhookd_endpoint_state (
    endpoint_id          TEXT PRIMARY KEY,
    state                TEXT NOT NULL CHECK (state IN ('ok', 'backing_off', 'disabled')),
    reason               TEXT,
    since                REAL NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    failing_since        REAL,
    -- Backing off: no attempt before this; then one probe at a time.
    paused_until         REAL,
    -- Failed probes since the breaker opened: the exponent of the cool-down.
    cooldown_level       INTEGER NOT NULL DEFAULT 0,
    disabled_reason      TEXT,
    updated_at           REAL NOT NULL
);
