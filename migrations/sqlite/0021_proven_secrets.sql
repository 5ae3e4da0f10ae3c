-- Whether the agent has shown that it holds its record's current secret: it sent a
-- frame after the welcome that carried the secret, or authenticated with it. A record
-- whose secret nobody has shown (its welcome was lost, or the agent gave up waiting for
-- it) is not live for `--rebind-after` once its session has ended: the machine's next
-- enrollment re-binds it at once instead of being refused as a fingerprint conflict.
-- Records from before this migration count as shown.
ALTER TABLE agents ADD COLUMN secret_proven INTEGER NOT NULL DEFAULT 1;
