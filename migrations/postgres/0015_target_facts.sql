-- Everything the stage of a target depends on, kept on the target, so that counting a
-- rollout reads its targets alone instead of joining each one to its agent, site,
-- client and task. Triggers keep the copies in the same transaction as every change of
-- what they copy, so they are never behind it:
--   task_status, task_class  the target's task (`task_id`, migration 0013);
--   os, arch, paused, auto_update  its agent's;
--   channel  the channel it resolves to (agent, else site, else client, else stable);
--   maintenance_window  the maintenance window that applies (site, else client).

ALTER TABLE rollout_targets
    ADD COLUMN task_status TEXT,
    ADD COLUMN task_class TEXT,
    ADD COLUMN os TEXT NOT NULL DEFAULT '',
    ADD COLUMN arch TEXT NOT NULL DEFAULT '',
    ADD COLUMN channel TEXT NOT NULL DEFAULT 'stable',
    ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN auto_update BOOLEAN NOT NULL DEFAULT TRUE,
    ADD COLUMN maintenance_window TEXT;

-- The agent facts of the targets of each agent.
CREATE VIEW rollout_target_agents AS
SELECT a.id AS agent_id, a.os, a.arch,
    COALESCE(a.channel, s.channel, c.channel, 'stable') AS channel, a.paused, a.auto_update,
    COALESCE(s.maintenance_window, c.maintenance_window) AS maintenance_window
FROM agents a JOIN sites s ON s.id = a.site_id JOIN clients c ON c.id = s.client_id;

UPDATE rollout_targets t SET (os, arch, channel, paused, auto_update, maintenance_window) = (
    SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
    FROM rollout_target_agents f WHERE f.agent_id = t.agent_id);
UPDATE rollout_targets t SET (task_status, task_class) = (
    SELECT x.status, x.failure_class FROM update_tasks x WHERE x.id = t.task_id);

-- The target's task, with its status and class, from the one rule (migration 0013).
CREATE OR REPLACE FUNCTION rollout_target_decide(r TEXT, a TEXT) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM rollout_targets WHERE rollout_id = r AND agent_id = a FOR UPDATE;
    UPDATE rollout_targets SET (task_id, task_status, task_class) = (
        SELECT x.id, x.status, x.failure_class FROM update_tasks x
        WHERE x.id = (SELECT v.task_id FROM rollout_target_tasks v
                      WHERE v.rollout_id = r AND v.agent_id = a))
    WHERE rollout_id = r AND agent_id = a;
END
$$;

-- Who copies agent facts to targets takes this lock first (held to the end of its
-- transaction) and then reads, in a statement of its own: a target inserted while an
-- agent's facts change is copied after that change commits, or sees its facts changed
-- after the insert commits. Those changes are operators' (and rollouts starting), rare
-- enough to take turns.
CREATE FUNCTION rollout_targets_facts_lock() RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(7345001015)
$$;

CREATE FUNCTION rollout_targets_agent_facts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_targets_facts_lock();
    SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
    INTO NEW.os, NEW.arch, NEW.channel, NEW.paused, NEW.auto_update, NEW.maintenance_window
    FROM rollout_target_agents f WHERE f.agent_id = NEW.agent_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER rollout_targets_agent_facts BEFORE INSERT ON rollout_targets
FOR EACH ROW EXECUTE FUNCTION rollout_targets_agent_facts();

-- Copies the facts again to the targets of `agents`, after the lock: a transaction
-- that changed other facts of theirs meanwhile has committed by then, so the last
-- writer copies every change.
CREATE FUNCTION rollout_targets_refresh_facts(agents TEXT[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_targets_facts_lock();
    UPDATE rollout_targets t
    SET (os, arch, channel, paused, auto_update, maintenance_window) = (
        SELECT f.os, f.arch, f.channel, f.paused, f.auto_update, f.maintenance_window
        FROM rollout_target_agents f WHERE f.agent_id = t.agent_id)
    WHERE t.agent_id = ANY (agents);
END
$$;

CREATE FUNCTION agents_target_facts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_targets_refresh_facts(ARRAY[NEW.id]);
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_target_facts
AFTER UPDATE OF os, arch, channel, paused, auto_update, site_id ON agents
FOR EACH ROW
WHEN (OLD.os IS DISTINCT FROM NEW.os OR OLD.arch IS DISTINCT FROM NEW.arch
      OR OLD.channel IS DISTINCT FROM NEW.channel OR OLD.paused IS DISTINCT FROM NEW.paused
      OR OLD.auto_update IS DISTINCT FROM NEW.auto_update
      OR OLD.site_id IS DISTINCT FROM NEW.site_id)
EXECUTE FUNCTION agents_target_facts();

CREATE FUNCTION sites_target_facts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_targets_refresh_facts(ARRAY(SELECT id FROM agents WHERE site_id = NEW.id));
    RETURN NULL;
END
$$;

CREATE TRIGGER sites_target_facts
AFTER UPDATE OF channel, maintenance_window, client_id ON sites
FOR EACH ROW
WHEN (OLD.channel IS DISTINCT FROM NEW.channel
      OR OLD.maintenance_window IS DISTINCT FROM NEW.maintenance_window
      OR OLD.client_id IS DISTINCT FROM NEW.client_id)
EXECUTE FUNCTION sites_target_facts();

CREATE FUNCTION clients_target_facts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_targets_refresh_facts(ARRAY(
        SELECT a.id FROM agents a JOIN sites s ON s.id = a.site_id WHERE s.client_id = NEW.id));
    RETURN NULL;
END
$$;

CREATE TRIGGER clients_target_facts
AFTER UPDATE OF channel, maintenance_window ON clients
FOR EACH ROW
WHEN (OLD.channel IS DISTINCT FROM NEW.channel
      OR OLD.maintenance_window IS DISTINCT FROM NEW.maintenance_window)
EXECUTE FUNCTION clients_target_facts();

-- A rollout counted from this index alone, in its grouping's order.
CREATE INDEX rollout_targets_facts ON rollout_targets
    (rollout_id, wave, os, arch, channel, paused, auto_update, task_status, task_class,
     maintenance_window);
