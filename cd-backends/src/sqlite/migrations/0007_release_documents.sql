-- Schema version 7: documents kept with a release version (SBOMs).
-- Appended; the latest of a kind for a version is the one read.

CREATE TABLE release_documents (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    kind    TEXT NOT NULL,
    record  TEXT NOT NULL,
    content TEXT NOT NULL,
    at      TEXT NOT NULL
);

CREATE INDEX release_documents_by_version ON release_documents (version, kind, seq);
