-- Fewer writes per rollout target and per task, so that a rollout reaches its agents
-- sooner. Before, inserting a target wrote its row twice (the insert, then a trigger
-- copying its agent's facts), and every task of a rollout rewrote its target twice (its
-- `task_id`, then a trigger copying that task's status and class).
--   * The statement that inserts targets writes their agent facts itself, read from
--     `rollout_target_agents` (`store::rollouts::INSERT_TARGETS`, the only insert).
--   * Each trigger that decides a target's task writes the task's id, status and class
--     in one update, read from the view `rollout_target_tasks`.

DROP TRIGGER rollout_targets_agent_facts;
DROP TRIGGER rollout_targets_task_facts;
DROP TRIGGER update_tasks_insert_decides;
DROP TRIGGER update_tasks_update_decides;
DROP TRIGGER update_tasks_delete_decides;
DROP TRIGGER rollout_targets_insert_decides;

-- The one rule of migration 0013, now with what a target copies of the task it picks: the
-- target's build failure in the rollout if it has one, else its newest task.
DROP VIEW rollout_target_tasks;
CREATE VIEW rollout_target_tasks AS
SELECT t.rollout_id, t.agent_id, x.id AS task_id, x.status AS task_status,
    x.failure_class AS task_class
FROM rollout_targets t LEFT JOIN update_tasks x ON x.id = (
    SELECT y.id FROM update_tasks y
    WHERE y.rollout_id = t.rollout_id AND y.agent_id = t.agent_id
    ORDER BY CASE WHEN y.failure_class = 'build' AND y.status <> 'succeeded' THEN 0 ELSE 1 END,
        y.created_at DESC, y.id DESC
    LIMIT 1);

CREATE TRIGGER update_tasks_insert_decides AFTER INSERT ON update_tasks
WHEN NEW.rollout_id IS NOT NULL
BEGIN
    UPDATE rollout_targets SET (task_id, task_status, task_class) = (
        SELECT f.task_id, f.task_status, f.task_class FROM rollout_target_tasks f
        WHERE f.rollout_id = NEW.rollout_id AND f.agent_id = NEW.agent_id)
    WHERE rollout_id = NEW.rollout_id AND agent_id = NEW.agent_id;
END;

-- Progress reports rewrite a task's row often; only a change of what the rule reads counts.
CREATE TRIGGER update_tasks_update_decides
AFTER UPDATE OF status, failure_class, created_at, rollout_id, agent_id ON update_tasks
WHEN OLD.status IS NOT NEW.status OR OLD.failure_class IS NOT NEW.failure_class
    OR OLD.created_at IS NOT NEW.created_at OR OLD.rollout_id IS NOT NEW.rollout_id
    OR OLD.agent_id IS NOT NEW.agent_id
BEGIN
    UPDATE rollout_targets SET (task_id, task_status, task_class) = (
        SELECT f.task_id, f.task_status, f.task_class FROM rollout_target_tasks f
        WHERE f.rollout_id = rollout_targets.rollout_id AND f.agent_id = rollout_targets.agent_id)
    WHERE (rollout_id = NEW.rollout_id AND agent_id = NEW.agent_id)
       OR (rollout_id = OLD.rollout_id AND agent_id = OLD.agent_id);
END;

CREATE TRIGGER update_tasks_delete_decides AFTER DELETE ON update_tasks
WHEN OLD.rollout_id IS NOT NULL
BEGIN
    UPDATE rollout_targets SET (task_id, task_status, task_class) = (
        SELECT f.task_id, f.task_status, f.task_class FROM rollout_target_tasks f
        WHERE f.rollout_id = OLD.rollout_id AND f.agent_id = OLD.agent_id)
    WHERE rollout_id = OLD.rollout_id AND agent_id = OLD.agent_id;
END;

-- A target added after some of its tasks (none is, today) still starts out right.
CREATE TRIGGER rollout_targets_insert_decides AFTER INSERT ON rollout_targets
WHEN EXISTS (SELECT 1 FROM update_tasks x
             WHERE x.rollout_id = NEW.rollout_id AND x.agent_id = NEW.agent_id)
BEGIN
    UPDATE rollout_targets SET (task_id, task_status, task_class) = (
        SELECT f.task_id, f.task_status, f.task_class FROM rollout_target_tasks f
        WHERE f.rollout_id = NEW.rollout_id AND f.agent_id = NEW.agent_id)
    WHERE rollout_id = NEW.rollout_id AND agent_id = NEW.agent_id;
END;
