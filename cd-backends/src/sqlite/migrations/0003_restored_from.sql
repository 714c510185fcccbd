-- Schema version 3: a release record made by a restore names the record it
-- restored (so a second restore goes further back, not to the same release).

ALTER TABLE releases ADD COLUMN restored_from TEXT;
