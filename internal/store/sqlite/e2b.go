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
