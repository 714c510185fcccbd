-- Schema version 2: an audit trail of broken locks (`cdctl unlock --force
-- --reason ...`), and runs listed per environment.

CREATE TABLE lock_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    environment TEXT NOT NULL,
    action      TEXT NOT NULL,
    holder      TEXT,
    run_id      TEXT,
    message     TEXT,
    actor       TEXT NOT NULL,
    reason      TEXT,
    at          TEXT NOT NULL
);
CREATE INDEX lock_audit_by_env ON lock_audit (environment, id);

CREATE INDEX runs_by_env ON runs (environment, started_at);
