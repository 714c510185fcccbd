-- Schema version 8: authenticated approvals.
-- Each decision keeps its unique id (a replay is refused by the unique
-- index) and its audit fields (via, token, release, pipeline, definition
-- hash) as JSON; approval gates store the request they make when they
-- first wait; API tokens are kept as HMAC-SHA256 hashes.

ALTER TABLE approvals ADD COLUMN decision_id TEXT;
ALTER TABLE approvals ADD COLUMN audit TEXT;
CREATE UNIQUE INDEX approvals_by_decision_id ON approvals (decision_id)
    WHERE decision_id IS NOT NULL;

CREATE TABLE approval_requests (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT NOT NULL,
    node       TEXT NOT NULL,
    record     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (run_id, node)
);

CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    record     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
