-- Rollouts become records with their own targets and waves. The per-build table that was
-- called `rollouts` keeps only what belongs to a build (first seen, promoted); its halt
-- columns are no longer read: a halt belongs to a rollout now.
ALTER TABLE rollouts RENAME TO builds;

-- One staged operation moving a set of agents to one version.
CREATE TABLE rollouts (
    id           TEXT PRIMARY KEY,
    version      TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('beta', 'promote', 'rollback', 'targeted')),
    -- "os/arch" pairs, comma-separated, sorted.
    platforms    TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'waiting', 'paused', 'halted',
                     'completed', 'aborted', 'superseded')),
    -- The plan as JSON: waves with their shares, bake times and thresholds.
    plan         TEXT NOT NULL,
    -- The highest wave started; waves 0..=current_wave are open to their agents.
    current_wave BIGINT NOT NULL DEFAULT 0,
    -- Build failures finished before this moment no longer count toward a halt.
    resumed_at   BIGINT NOT NULL,
    -- Why it is halted, aborted or superseded.
    reason       TEXT,
    started_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

CREATE INDEX rollouts_version ON rollouts (version, created_at);

-- The agents a rollout moves, each in one wave.
CREATE TABLE rollout_targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    agent_id   TEXT NOT NULL REFERENCES agents (id),
    wave       BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, agent_id)
);

CREATE INDEX rollout_targets_agent ON rollout_targets (agent_id);

-- When each wave started and when it met its thresholds (its bake counts from then).
CREATE TABLE rollout_waves (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    wave       BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    passed_at  BIGINT,
    PRIMARY KEY (rollout_id, wave)
);

-- The timeline: every state change, with who and why.
CREATE TABLE rollout_events (
    id         BIGSERIAL PRIMARY KEY,
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    at         BIGINT NOT NULL,
    state      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    detail     TEXT
);

CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);

-- Every task belongs to one rollout and wave; an ended task that did not succeed has a
-- failure class. Tasks made before rollouts were records belong to none.
ALTER TABLE update_tasks ADD COLUMN rollout_id TEXT REFERENCES rollouts (id);
ALTER TABLE update_tasks ADD COLUMN wave BIGINT;
ALTER TABLE update_tasks ADD COLUMN failure_class TEXT
    CHECK (failure_class IN ('build', 'environment', 'transient'));
ALTER TABLE update_tasks ADD COLUMN finished_at BIGINT;
UPDATE update_tasks SET failure_class = 'build', finished_at = updated_at
    WHERE status IN ('failed', 'rolled_back', 'timed_out');
UPDATE update_tasks SET failure_class = 'transient', finished_at = updated_at
    WHERE status = 'cancelled';
UPDATE update_tasks SET finished_at = updated_at WHERE status = 'succeeded';

CREATE INDEX update_tasks_rollout ON update_tasks (rollout_id, agent_id);

-- Since when the agent's current session has been up: a success counts once the new
-- version stayed connected through the success bake.
ALTER TABLE agents ADD COLUMN connected_at BIGINT;
