-- Schema version 1 of the cd SQLite store.
-- Never edit this file once released: add a new migration instead.
-- Timestamps are UTC RFC 3339 text with nine fractional digits, so that text
-- order is time order. JSON columns hold serde_json text.

CREATE TABLE runs (
    id              TEXT PRIMARY KEY,
    pipeline        TEXT NOT NULL,
    definition_hash TEXT NOT NULL,
    version         TEXT NOT NULL,
    release         TEXT NOT NULL,
    environment     TEXT NOT NULL,
    status          TEXT NOT NULL,
    started_by      TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    finished_at     TEXT
);
CREATE INDEX runs_by_start ON runs (started_at);

CREATE TABLE nodes (
    run_id      TEXT NOT NULL,
    node        TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    output      TEXT,
    error       TEXT,
    started_at  TEXT,
    finished_at TEXT,
    recheck_at  TEXT,
    PRIMARY KEY (run_id, node)
) WITHOUT ROWID;

CREATE TABLE events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    at     TEXT NOT NULL,
    node   TEXT,
    kind   TEXT NOT NULL,
    body   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE approvals (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   TEXT NOT NULL,
    node     TEXT NOT NULL,
    approver TEXT NOT NULL,
    decision TEXT NOT NULL,
    comment  TEXT,
    at       TEXT NOT NULL
);
CREATE INDEX approvals_by_gate ON approvals (run_id, node, id);

CREATE TABLE locks (
    environment TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    run_id      TEXT,
    message     TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    renewed_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);

CREATE TABLE lock_waiters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    environment TEXT NOT NULL,
    holder      TEXT NOT NULL,
    first_at    TEXT NOT NULL,
    last_at     TEXT NOT NULL,
    UNIQUE (environment, holder)
);

CREATE TABLE releases (
    id          TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    version     TEXT NOT NULL,
    release     TEXT NOT NULL,
    revisions   TEXT NOT NULL,
    status      TEXT NOT NULL,
    run_id      TEXT,
    actor       TEXT NOT NULL,
    at          TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX releases_by_env ON releases (environment, at);
