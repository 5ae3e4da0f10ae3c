-- Download mirrors: a web server holding copies of the offered builds, per site or
-- client (a site's wins; then the server-wide --download-url; none means the server).
ALTER TABLE sites ADD COLUMN download_mirror TEXT;
ALTER TABLE clients ADD COLUMN download_mirror TEXT;
-- Per task: the mirror its update message offered, and how the build reached the agent
-- as the agent reported it (source 'mirror' or 'server'; why it fell back from the
-- mirror). Mirror health is read from these.
ALTER TABLE update_tasks ADD COLUMN mirror TEXT;
ALTER TABLE update_tasks ADD COLUMN transfer_source TEXT;
ALTER TABLE update_tasks ADD COLUMN transfer_fallback TEXT;
ALTER TABLE update_tasks ADD COLUMN transfer_error TEXT;
CREATE INDEX update_tasks_mirror ON update_tasks (mirror, created_at) WHERE mirror IS NOT NULL;
