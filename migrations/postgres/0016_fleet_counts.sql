-- The fleet's counts by platform and version (`GET /fleet`) group the agents from this
-- index alone, in its order, before looking at the few sites, clients and nodes.
CREATE INDEX agents_fleet ON agents (os, arch, version, site_id, channel, paused, node_id);
