package postgres

// migrationE2BTemplates is SQLite's migration 8
// (internal/store/sqlite/e2b.go): E2B tags, builds and snapshot records,
// keyed by account, going with their image's record.
const migrationE2BTemplates = `CREATE TABLE IF NOT EXISTS e2b_tags (
		account TEXT NOT NULL,
		template TEXT NOT NULL,
		tag TEXT NOT NULL,
		build_id TEXT NOT NULL,
		version TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, template, tag)
	);
	CREATE TABLE IF NOT EXISTS e2b_builds (
		account TEXT NOT NULL,
		id TEXT NOT NULL,
		template TEXT NOT NULL,
		version TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, id)
	);
	CREATE INDEX IF NOT EXISTS e2b_builds_by_version ON e2b_builds (account, template, version);
	CREATE TABLE IF NOT EXISTS e2b_snapshots (
		account TEXT NOT NULL,
		name TEXT NOT NULL,
		sandbox_id TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, name)
	);
	CREATE INDEX IF NOT EXISTS e2b_snapshots_by_age ON e2b_snapshots (account, created_at, name);
	CREATE OR REPLACE FUNCTION e2b_templates_follow_images() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		DELETE FROM e2b_tags WHERE account = OLD.account AND template = OLD.name;
		DELETE FROM e2b_builds WHERE account = OLD.account AND template = OLD.name AND version != '';
		DELETE FROM e2b_snapshots WHERE account = OLD.account AND name = OLD.name;
		RETURN OLD;
	END $$;
	CREATE OR REPLACE TRIGGER e2b_templates_follow_images AFTER DELETE ON images
	FOR EACH ROW EXECUTE FUNCTION e2b_templates_follow_images();`
