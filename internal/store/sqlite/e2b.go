package sqlite

// migrationE2B holds the E2B API's keys (hashed) and the sandboxes it made.
// A sandbox row goes with its microVM record (the trigger), so garbage
// collection of terminated records needs to know nothing about E2B.
const migrationE2B = `CREATE TABLE IF NOT EXISTS e2b_keys (
		hash TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		prefix TEXT NOT NULL,
		description TEXT NOT NULL,
		created_at INTEGER NOT NULL
	);
	CREATE TABLE IF NOT EXISTS e2b_sandboxes (
		id TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at INTEGER NOT NULL
	);
	CREATE INDEX IF NOT EXISTS e2b_sandboxes_by_account ON e2b_sandboxes (account, created_at, id);
	CREATE TRIGGER IF NOT EXISTS e2b_sandboxes_follow_microvms AFTER DELETE ON microvms
	BEGIN DELETE FROM e2b_sandboxes WHERE id = OLD.id; END;`

// migrationE2BTemplates holds what the E2B API adds to templates and
// snapshots (tags, builds, snapshot records), which were files in each
// server's data dir. Every row is keyed by its account. The tags, the
// started builds and the snapshot record of an image go with its record
// (the trigger), however the image is deleted; a build not yet started
// names no image and stays.
const migrationE2BTemplates = `CREATE TABLE IF NOT EXISTS e2b_tags (
		account TEXT NOT NULL,
		template TEXT NOT NULL,
		tag TEXT NOT NULL,
		build_id TEXT NOT NULL,
		version TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, template, tag)
	);
	CREATE TABLE IF NOT EXISTS e2b_builds (
		account TEXT NOT NULL,
		id TEXT NOT NULL,
		template TEXT NOT NULL,
		version TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, id)
	);
	CREATE INDEX IF NOT EXISTS e2b_builds_by_version ON e2b_builds (account, template, version);
	CREATE TABLE IF NOT EXISTS e2b_snapshots (
		account TEXT NOT NULL,
		name TEXT NOT NULL,
		sandbox_id TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, name)
	);
	CREATE INDEX IF NOT EXISTS e2b_snapshots_by_age ON e2b_snapshots (account, created_at, name);
	CREATE TRIGGER IF NOT EXISTS e2b_templates_follow_images AFTER DELETE ON images
	BEGIN
		DELETE FROM e2b_tags WHERE account = OLD.account AND template = OLD.name;
		DELETE FROM e2b_builds WHERE account = OLD.account AND template = OLD.name AND version != '';
		DELETE FROM e2b_snapshots WHERE account = OLD.account AND name = OLD.name;
	END;`
