-- Periodic counts of agents per platform and version: version adoption over time.
CREATE TABLE version_snapshots (
    at      INTEGER NOT NULL,
    os      TEXT NOT NULL,
    arch    TEXT NOT NULL,
    version TEXT NOT NULL,
    agents  INTEGER NOT NULL,
    PRIMARY KEY (at, os, arch, version)
);
