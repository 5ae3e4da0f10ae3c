-- The fleet's counts by platform and version (`GET /fleet`, `/metrics`) read this index
-- alone, in its order, instead of every agent's whole row and a sort.
CREATE INDEX agents_fleet ON agents (os, arch, version, paused, channel, site_id, node_id);
