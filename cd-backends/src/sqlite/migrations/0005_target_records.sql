-- Schema version 5: deployers' own history per target (what Terraform and
-- Ansible applied, for current() and rollback), in the store so every
-- machine sharing it agrees on what is live.

CREATE TABLE target_records (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    scope  TEXT NOT NULL,
    target TEXT NOT NULL,
    entry  TEXT NOT NULL,
    at     TEXT NOT NULL
);

CREATE INDEX target_records_by_key ON target_records (scope, target, seq);
