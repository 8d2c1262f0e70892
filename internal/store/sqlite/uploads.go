package sqlite

// migrationUploads holds uploaded code packages (internal/store/sqlstore
// uploads.go): a row per package, by account and hash, naming the put
// whose chunks hold its bytes; chunks are keyed by account too, so that no
// query of one account's package can reach another's.
const migrationUploads = `CREATE TABLE IF NOT EXISTS uploads (
		account TEXT NOT NULL,
		sha256 TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		size_bytes INTEGER NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, sha256)
	);
	CREATE TABLE IF NOT EXISTS upload_chunks (
		account TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		seq INTEGER NOT NULL,
		data BLOB NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, upload_id, seq)
	);
	CREATE INDEX IF NOT EXISTS upload_chunks_by_time ON upload_chunks (created_at);`
