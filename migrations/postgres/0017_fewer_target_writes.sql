-- Fewer writes per rollout target and per task (see the SQLite migration of the same
-- name). The statement that inserts targets now writes their agent facts itself
-- (`store::rollouts::INSERT_TARGETS`); on PostgreSQL the `BEFORE INSERT` trigger of
-- migration 0015 still reads them again under the facts lock, which orders them after
-- any change of an agent, site or client that commits meanwhile, and writes the row
-- once. The task a target keeps was already written in one update here
-- (`rollout_target_decide`). Nothing changes.
SELECT 1;
