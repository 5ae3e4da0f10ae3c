-- An agent's version as a key that sorts by bytes as semver precedence does (empty for
-- a version that is not semver), written in the same statement as the version, so
-- `older_than` and sorting by version run in the database. NULL until the server
-- computes it for rows written before this migration (once, when it opens the store).
ALTER TABLE agents ADD COLUMN version_key TEXT;
