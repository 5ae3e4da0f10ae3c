-- Clients own sites; sites own agents. Channels set at any level resolve agent -> site -> client.
-- Timestamps are Unix milliseconds.
CREATE TABLE clients (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    channel    TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE sites (
    id         TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL REFERENCES clients (id),
    name       TEXT NOT NULL,
    channel    TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (client_id, name)
);

-- Tokens are stored as SHA-256 hex of the token; the token itself is never stored.
CREATE TABLE enrollment_tokens (
    id         TEXT PRIMARY KEY,
    site_id    TEXT NOT NULL REFERENCES sites (id),
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- One row per machine and site: re-enrolling from the same machine re-binds the row.
CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    site_id     TEXT NOT NULL REFERENCES sites (id),
    fingerprint TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    hostname    TEXT NOT NULL,
    version     TEXT NOT NULL,
    os          TEXT NOT NULL,
    arch        TEXT NOT NULL,
    channel     TEXT,
    paused      BOOLEAN NOT NULL DEFAULT FALSE,
    auto_update BOOLEAN NOT NULL DEFAULT TRUE,
    enrolled_at BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    UNIQUE (site_id, fingerprint)
);

CREATE INDEX agents_site ON agents (site_id);
