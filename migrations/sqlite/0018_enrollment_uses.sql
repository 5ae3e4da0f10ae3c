-- A use of an enrollment token with no limit on its uses is a row of its own. Counted in
-- the token's row, every enrollment with the token waited for the one before it to
-- commit (the row's lock), and a fleet enrolling at once queued on it. A token with
-- `max_uses` still counts its uses in its row, where the limit is checked under that
-- lock. A token's uses are its `uses` plus its rows here (`ENROLL_TOKEN_COLUMNS`).
CREATE TABLE enrollment_uses (
    token_id TEXT NOT NULL REFERENCES enrollment_tokens (id),
    used_at  INTEGER NOT NULL
);
CREATE INDEX enrollment_uses_token ON enrollment_uses (token_id);
