-- Leases: work one node at a time should do (the sweep that times out tasks of agents
-- that vanished) is done by the node holding its lease, until the lease expires.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
