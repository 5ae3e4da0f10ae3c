-- Nothing changes on SQLite: its trigger for an added target (migration 0017) runs for
-- each row and probes the index of its tasks. The PostgreSQL migration of the same name
-- makes its statement trigger do the same.
SELECT 1;
