-- The statement trigger of migration 0017 looked for tasks of the targets a statement
-- added with one join of the added rows to `update_tasks`. A transition table has no
-- statistics, and at some sizes of the task table the planner hashed all of it for
-- every statement: a rollout's start, 1,000 targets a statement, then read every task
-- kept once per thousand targets. Now each rollout among the added targets costs one
-- probe of the index of tasks by rollout, in the index's order so that no estimate
-- makes it a scan (a new rollout has no tasks yet, and that is the end of it), and
-- only a rollout that has tasks probes the index for each of its added targets.
CREATE OR REPLACE FUNCTION rollout_targets_decide_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r TEXT;
    a TEXT;
BEGIN
    FOR r IN SELECT DISTINCT rollout_id FROM added LOOP
        PERFORM 1 FROM update_tasks x WHERE x.rollout_id = r
        ORDER BY x.rollout_id, x.agent_id LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        FOR a IN SELECT n.agent_id FROM added n WHERE n.rollout_id = r LOOP
            PERFORM 1 FROM update_tasks x WHERE x.rollout_id = r AND x.agent_id = a LIMIT 1;
            IF FOUND THEN
                PERFORM rollout_target_decide(r, a);
            END IF;
        END LOOP;
    END LOOP;
    RETURN NULL;
END
$$;
