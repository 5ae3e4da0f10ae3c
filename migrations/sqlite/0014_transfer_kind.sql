-- Per task: what crossed the wire as the agent reported it: the build ('full') or the
-- server's compressed copy ('compressed'), and how many bytes that is. Absent from
-- tasks older than compressed transfer, and from agents that do not say (read as full,
-- the build's size).
ALTER TABLE update_tasks ADD COLUMN transfer_kind TEXT;
ALTER TABLE update_tasks ADD COLUMN transfer_bytes BIGINT;
