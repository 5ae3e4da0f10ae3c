-- Fewer writes and trigger calls per rollout target (see the SQLite migration of the
-- same name). The statement that inserts targets now reads their agent facts itself
-- (`store::rollouts::INSERT_TARGETS`), after taking the facts lock of migration 0015 in
-- a statement of its own (`Dialect::TARGET_FACTS_LOCK`), so it reads every change of an
-- agent, site or client committed before and any later one waits for it and then sees
-- the new targets. The trigger that read them again for each row, under the same lock,
-- goes. (The task a target keeps was already written in one update here,
-- `rollout_target_decide`.)

DROP TRIGGER rollout_targets_agent_facts ON rollout_targets;
DROP FUNCTION rollout_targets_agent_facts();

-- A target added after some of its tasks (none is, today) still starts out right: now
-- checked once for each statement's new targets rather than by a call for each row.
DROP TRIGGER rollout_targets_decide ON rollout_targets;
DROP FUNCTION rollout_targets_decide();

CREATE FUNCTION rollout_targets_decide_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rollout_target_decide(n.rollout_id, n.agent_id)
    FROM added n
    WHERE EXISTS (SELECT 1 FROM update_tasks x
                  WHERE x.rollout_id = n.rollout_id AND x.agent_id = n.agent_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER rollout_targets_decide AFTER INSERT ON rollout_targets
REFERENCING NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION rollout_targets_decide_added();
