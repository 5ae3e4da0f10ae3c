-- A fingerprint conflict: an enrollment refused because the machine's record in its
-- site was live (online, or seen recently). The newest one, how many since the
-- conflict began, and the hostname the refused machine gave.
ALTER TABLE agents ADD COLUMN conflict_at INTEGER;
ALTER TABLE agents ADD COLUMN conflict_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN conflict_hostname TEXT;

-- Dashboard sessions: the cookie holds a random id, stored only as its SHA-256 hex.
-- A session lasts until it expires, its user logs out, or its API token is revoked.
CREATE TABLE dashboard_sessions (
    id_hash    TEXT PRIMARY KEY,
    token_id   TEXT NOT NULL REFERENCES api_tokens (id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE INDEX dashboard_sessions_token ON dashboard_sessions (token_id);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
