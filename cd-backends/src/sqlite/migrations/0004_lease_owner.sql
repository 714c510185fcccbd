-- Schema version 4: a lease records the process that owns it (host and
-- boot id, pid namespace, pid and start time), so that another process on
-- the same machine can prove the owner gone and take the lease at once
-- instead of waiting for its ttl; and runs may end `abandoned`.

ALTER TABLE locks ADD COLUMN owner_host TEXT;
ALTER TABLE locks ADD COLUMN owner_process TEXT;
