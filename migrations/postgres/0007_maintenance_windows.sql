-- Maintenance windows: a weekly schedule per site or client, as JSON
-- ({"days": [...], "start": "HH:MM", "duration": "3h", "time_zone": "Europe/Berlin"}).
-- A site's window wins over its client's; none means always open.
ALTER TABLE sites ADD COLUMN maintenance_window TEXT;
ALTER TABLE clients ADD COLUMN maintenance_window TEXT;

