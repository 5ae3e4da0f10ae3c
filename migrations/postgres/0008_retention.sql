-- Retention: a closed rollout's counts, frozen (JSON, one entry per wave) before its tasks
-- and targets are pruned, and the indexes pruning reads.
ALTER TABLE rollouts ADD COLUMN summary TEXT;
CREATE INDEX update_tasks_finished ON update_tasks (finished_at);
CREATE INDEX audit_log_at ON audit_log (at);
