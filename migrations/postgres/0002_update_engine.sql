-- Update tasks: one row per decision to move an agent to a version.
CREATE TABLE update_tasks (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents (id),
    from_version   TEXT NOT NULL,
    to_version     TEXT NOT NULL,
    os             TEXT NOT NULL,
    arch           TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('update', 'forced', 'rollback')),
    status         TEXT NOT NULL CHECK (status IN ('queued', 'dispatched', 'downloading',
                       'verifying', 'installing', 'restarting', 'succeeded', 'failed',
                       'rolled_back', 'cancelled', 'timed_out')),
    attempts       BIGINT NOT NULL DEFAULT 0,
    error          TEXT,
    bytes_done     BIGINT NOT NULL DEFAULT 0,
    bytes_total    BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    dispatched_at  BIGINT,
    progress_at    BIGINT,
    -- SQLite's implicit rowid: insertion order, for tasks created in the same millisecond.
    seq            BIGINT GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX update_tasks_agent ON update_tasks (agent_id, created_at);

-- At most one unfinished task per agent, whichever node or request creates it.
CREATE UNIQUE INDEX update_tasks_one_active ON update_tasks (agent_id)
    WHERE status IN ('queued', 'dispatched', 'downloading', 'verifying', 'installing', 'restarting');

-- Versions an operator blocked; never offered while listed.
CREATE TABLE version_blocks (
    version    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Server-wide switches, e.g. updates_enabled.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
