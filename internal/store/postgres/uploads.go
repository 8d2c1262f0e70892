package postgres

// migrationUploads is SQLite's migration 10 (internal/store/sqlite/uploads.go):
// uploaded code packages by account and hash, and their chunks, keyed by
// account too.
const migrationUploads = `CREATE TABLE IF NOT EXISTS uploads (
		account TEXT NOT NULL,
		sha256 TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		size_bytes BIGINT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, sha256)
	);
	CREATE TABLE IF NOT EXISTS upload_chunks (
		account TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		seq INTEGER NOT NULL,
		data BYTEA NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, upload_id, seq)
	);
	CREATE INDEX IF NOT EXISTS upload_chunks_by_time ON upload_chunks (created_at);`
