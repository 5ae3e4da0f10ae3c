-- New tasks decide their targets once for each statement that inserts them, not by a
-- call for each row: the task writer inserts up to 2,000 tasks in one statement, and a
-- rollout's fan-out writes a task for every agent it reaches while those agents are
-- still being told. Same rule and order as `rollout_target_decide` (migration 0015):
-- lock the targets first, in key order, then read their tasks in a statement of its
-- own, so a transaction that changed another task of the same target meanwhile has
-- committed and the last writer sees every change. A deleted task still decides its
-- target by the row.
CREATE FUNCTION update_tasks_decide_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM rollout_targets t
    JOIN (SELECT DISTINCT n.rollout_id, n.agent_id FROM inserted n
          WHERE n.rollout_id IS NOT NULL) n
      ON t.rollout_id = n.rollout_id AND t.agent_id = n.agent_id
    ORDER BY t.rollout_id, t.agent_id
    FOR UPDATE OF t;
    UPDATE rollout_targets t SET (task_id, task_status, task_class) = (
        SELECT x.id, x.status, x.failure_class FROM update_tasks x
        WHERE x.id = (SELECT v.task_id FROM rollout_target_tasks v
                      WHERE v.rollout_id = t.rollout_id AND v.agent_id = t.agent_id))
    FROM (SELECT DISTINCT n.rollout_id, n.agent_id FROM inserted n
          WHERE n.rollout_id IS NOT NULL) n
    WHERE t.rollout_id = n.rollout_id AND t.agent_id = n.agent_id;
    RETURN NULL;
END
$$;

DROP TRIGGER update_tasks_insert_delete_decides ON update_tasks;

CREATE TRIGGER update_tasks_delete_decides AFTER DELETE ON update_tasks
FOR EACH ROW EXECUTE FUNCTION update_tasks_decide();

CREATE TRIGGER update_tasks_insert_decides AFTER INSERT ON update_tasks
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT EXECUTE FUNCTION update_tasks_decide_inserted();
