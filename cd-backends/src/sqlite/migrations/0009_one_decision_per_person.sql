-- Schema version 9: one audited decision per person per gate, enforced by
-- the database (two concurrent decisions by the same person cannot both
-- be written).

CREATE UNIQUE INDEX approvals_one_per_person ON approvals (run_id, node, approver)
    WHERE decision_id IS NOT NULL;
