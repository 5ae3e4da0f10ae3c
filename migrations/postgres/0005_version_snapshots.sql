-- Periodic counts of agents per platform and version: version adoption over time.
CREATE TABLE version_snapshots (
    at      BIGINT NOT NULL,
    os      TEXT NOT NULL,
    arch    TEXT NOT NULL,
    version TEXT NOT NULL,
    agents  BIGINT NOT NULL,
    PRIMARY KEY (at, os, arch, version)
);
