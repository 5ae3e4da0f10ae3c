-- Server nodes sharing this database, each with a heartbeat; an agent's session belongs
-- to the node it is connected to. A node whose heartbeat stops leaves its agents offline.
CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    address    TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    last_beat  INTEGER NOT NULL
);

ALTER TABLE agents ADD COLUMN node_id TEXT;
