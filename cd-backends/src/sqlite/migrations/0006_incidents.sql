-- Schema version 6: incidents (opened, acknowledged, resolved) and one
-- record per notification delivery attempt.

CREATE TABLE incidents (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT NOT NULL UNIQUE,
    status    TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    record    TEXT NOT NULL
);

CREATE INDEX incidents_by_status ON incidents (status, seq);

CREATE TABLE deliveries (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    record  TEXT NOT NULL,
    at      TEXT NOT NULL
);

CREATE INDEX deliveries_by_subject ON deliveries (subject, seq);
