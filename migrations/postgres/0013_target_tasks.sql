-- The task that says where each target of a rollout stands, kept on the target so that
-- counting or paging a rollout reads one column instead of searching its tasks per
-- target. Triggers keep it in the same transaction as every change of the tasks (and
-- of the targets), so it is never behind them.

ALTER TABLE rollout_targets ADD COLUMN task_id TEXT;

-- The one rule: the target's build failure in the rollout if it has one (final: the
-- version is never offered to it again, and a task started before the failure was known
-- is cancelled), else its newest task.
CREATE VIEW rollout_target_tasks AS
SELECT t.rollout_id, t.agent_id,
    (SELECT x.id FROM update_tasks x
     WHERE x.rollout_id = t.rollout_id AND x.agent_id = t.agent_id
     ORDER BY CASE WHEN x.failure_class = 'build' AND x.status <> 'succeeded' THEN 0 ELSE 1 END,
         x.created_at DESC, x.id DESC
     LIMIT 1) AS task_id
FROM rollout_targets t;

UPDATE rollout_targets SET task_id = (
    SELECT v.task_id FROM rollout_target_tasks v
    WHERE v.rollout_id = rollout_targets.rollout_id AND v.agent_id = rollout_targets.agent_id);

-- Locks the target first, then reads the tasks in a statement of its own: a transaction
-- that changed another task of the same target meanwhile has committed by then, so the
-- last writer sees every change.
CREATE FUNCTION rollout_target_decide(r TEXT, a TEXT) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM rollout_targets WHERE rollout_id = r AND agent_id = a FOR UPDATE;
    UPDATE rollout_targets SET task_id = (
        SELECT v.task_id FROM rollout_target_tasks v
        WHERE v.rollout_id = r AND v.agent_id = a)
    WHERE rollout_id = r AND agent_id = a;
END
$$;

CREATE FUNCTION update_tasks_decide() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.rollout_id IS NOT NULL THEN
        PERFORM rollout_target_decide(OLD.rollout_id, OLD.agent_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.rollout_id IS NOT NULL
       AND (TG_OP = 'INSERT' OR NEW.rollout_id IS DISTINCT FROM OLD.rollout_id
            OR NEW.agent_id IS DISTINCT FROM OLD.agent_id) THEN
        PERFORM rollout_target_decide(NEW.rollout_id, NEW.agent_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER update_tasks_insert_delete_decides AFTER INSERT OR DELETE ON update_tasks
FOR EACH ROW EXECUTE FUNCTION update_tasks_decide();

-- Progress reports rewrite a task's row often; only a change of what the rule reads counts.
CREATE TRIGGER update_tasks_update_decides
AFTER UPDATE OF status, failure_class, created_at, rollout_id, agent_id ON update_tasks
FOR EACH ROW
WHEN (OLD.status IS DISTINCT FROM NEW.status
      OR OLD.failure_class IS DISTINCT FROM NEW.failure_class
      OR OLD.created_at IS DISTINCT FROM NEW.created_at
      OR OLD.rollout_id IS DISTINCT FROM NEW.rollout_id
      OR OLD.agent_id IS DISTINCT FROM NEW.agent_id)
EXECUTE FUNCTION update_tasks_decide();

-- A target added after some of its tasks (none is, today) still starts out right.
CREATE FUNCTION rollout_targets_decide() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM update_tasks x
               WHERE x.rollout_id = NEW.rollout_id AND x.agent_id = NEW.agent_id) THEN
        PERFORM rollout_target_decide(NEW.rollout_id, NEW.agent_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER rollout_targets_decide AFTER INSERT ON rollout_targets
FOR EACH ROW EXECUTE FUNCTION rollout_targets_decide();

-- A page of a rollout's targets, by wave then agent, read in order.
CREATE INDEX rollout_targets_order ON rollout_targets (rollout_id, wave, agent_id);

-- A rollout's ended tasks by wave and failure class, counted from the index alone.
CREATE INDEX update_tasks_rollout_classes
    ON update_tasks (rollout_id, failure_class, wave, finished_at);
