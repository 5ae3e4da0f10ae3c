-- Everything the stage of a target depends on, kept on the target, so that counting a
-- rollout reads its targets alone instead of joining each one to its agent, site,
-- client and task. Triggers keep the copies in the same transaction as every change of
-- what they copy, so they are never behind it:
--   task_status, task_class  the target's task (`task_id`, migration 0013);
--   os, arch, paused, auto_update  its agent's;
--   channel  the channel it resolves to (agent, else site, else client, else stable);
--   maintenance_window  the maintenance window that applies (site, else client).

ALTER TABLE rollout_targets ADD COLUMN task_status TEXT;
ALTER TABLE rollout_targets ADD COLUMN task_class TEXT;
ALTER TABLE rollout_targets ADD COLUMN os TEXT NOT NULL DEFAULT '';
ALTER TABLE rollout_targets ADD COLUMN arch TEXT NOT NULL DEFAULT '';
ALTER TABLE rollout_targets ADD COLUMN channel TEXT NOT NULL DEFAULT 'stable';
ALTER TABLE rollout_targets ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollout_targets ADD COLUMN auto_update INTEGER NOT NULL DEFAULT 1;
ALTER TABLE rollout_targets ADD COLUMN maintenance_window TEXT;

-- The agent facts of every target of the agents the WHERE of each statement names.
CREATE VIEW rollout_target_agents AS
SELECT a.id AS agent_id, a.os, a.arch, COALESCE(a.channel, s.channel, c.channel, 'stable') AS channel,
    a.paused, a.auto_update, COALESCE(s.maintenance_window, c.maintenance_window) AS maintenance_window
FROM agents a JOIN sites s ON s.id = a.site_id JOIN clients c ON c.id = s.client_id;

UPDATE rollout_targets SET (os, arch, channel, paused, auto_update, maintenance_window) = (
    SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
    FROM rollout_target_agents f WHERE f.agent_id = rollout_targets.agent_id);
UPDATE rollout_targets SET (task_status, task_class) = (
    SELECT x.status, x.failure_class FROM update_tasks x WHERE x.id = rollout_targets.task_id);

-- The task's status and class follow `task_id` and the task itself.
CREATE TRIGGER rollout_targets_task_facts AFTER UPDATE OF task_id ON rollout_targets
BEGIN
    UPDATE rollout_targets SET (task_status, task_class) = (
        SELECT x.status, x.failure_class FROM update_tasks x WHERE x.id = NEW.task_id)
    WHERE rollout_id = NEW.rollout_id AND agent_id = NEW.agent_id;
END;

CREATE TRIGGER rollout_targets_agent_facts AFTER INSERT ON rollout_targets
BEGIN
    UPDATE rollout_targets SET (os, arch, channel, paused, auto_update, maintenance_window) = (
        SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
        FROM rollout_target_agents f WHERE f.agent_id = NEW.agent_id)
    WHERE rollout_id = NEW.rollout_id AND agent_id = NEW.agent_id;
END;

CREATE TRIGGER agents_target_facts
AFTER UPDATE OF os, arch, channel, paused, auto_update, site_id ON agents
WHEN OLD.os IS NOT NEW.os OR OLD.arch IS NOT NEW.arch OR OLD.channel IS NOT NEW.channel
    OR OLD.paused IS NOT NEW.paused OR OLD.auto_update IS NOT NEW.auto_update
    OR OLD.site_id IS NOT NEW.site_id
BEGIN
    UPDATE rollout_targets SET (os, arch, channel, paused, auto_update, maintenance_window) = (
        SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
        FROM rollout_target_agents f WHERE f.agent_id = NEW.id)
    WHERE agent_id = NEW.id;
END;

CREATE TRIGGER sites_target_facts
AFTER UPDATE OF channel, maintenance_window, client_id ON sites
WHEN OLD.channel IS NOT NEW.channel OR OLD.maintenance_window IS NOT NEW.maintenance_window
    OR OLD.client_id IS NOT NEW.client_id
BEGIN
    UPDATE rollout_targets SET (channel, maintenance_window) = (
        SELECT f.channel, f.maintenance_window FROM rollout_target_agents f
        WHERE f.agent_id = rollout_targets.agent_id)
    WHERE agent_id IN (SELECT id FROM agents WHERE site_id = NEW.id);
END;

CREATE TRIGGER clients_target_facts
AFTER UPDATE OF channel, maintenance_window ON clients
WHEN OLD.channel IS NOT NEW.channel OR OLD.maintenance_window IS NOT NEW.maintenance_window
BEGIN
    UPDATE rollout_targets SET (channel, maintenance_window) = (
        SELECT f.channel, f.maintenance_window FROM rollout_target_agents f
        WHERE f.agent_id = rollout_targets.agent_id)
    WHERE agent_id IN (SELECT a.id FROM agents a JOIN sites s ON s.id = a.site_id
                       WHERE s.client_id = NEW.id);
END;

-- A rollout counted from this index alone, in its grouping's order.
CREATE INDEX rollout_targets_facts ON rollout_targets
    (rollout_id, wave, os, arch, channel, paused, auto_update, task_status, task_class, maintenance_window);
