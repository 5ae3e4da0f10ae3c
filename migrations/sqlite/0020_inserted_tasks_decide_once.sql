-- Nothing changes on SQLite: its triggers run for each row in the server's process
-- (migration 0017). The PostgreSQL migration of the same name decides the targets of
-- new tasks once for each statement.
SELECT 1;
