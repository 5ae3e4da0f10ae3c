-- One record per version and platform: when it was first seen, promoted, halted.
CREATE TABLE rollouts (
    version     TEXT NOT NULL,
    os          TEXT NOT NULL,
    arch        TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    promoted_at BIGINT,
    halted_at   BIGINT,
    halt_reason TEXT,
    PRIMARY KEY (version, os, arch)
);

-- Who did what, when, to what, and how it ended.
CREATE TABLE audit_log (
    id      BIGSERIAL PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    detail  TEXT,
    result  TEXT NOT NULL
);

CREATE INDEX audit_log_action ON audit_log (action, id);

-- Enrollment tokens may expire and may be limited to a number of uses.
ALTER TABLE enrollment_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE enrollment_tokens ADD COLUMN max_uses BIGINT;
ALTER TABLE enrollment_tokens ADD COLUMN uses BIGINT NOT NULL DEFAULT 0;
