-- Server nodes sharing this database, each with a heartbeat; an agent's session belongs
-- to the node it is connected to. A node whose heartbeat stops leaves its agents offline.
CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    address    TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_beat  BIGINT NOT NULL
);

ALTER TABLE agents ADD COLUMN node_id TEXT;
