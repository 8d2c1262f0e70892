package sqlite

// migrationTemplateFiles holds E2B template files (internal/store/sqlstore
// templatefiles.go): a row per account and SDK hash naming the put whose
// upload_chunks hold the bytes.
const migrationTemplateFiles = `CREATE TABLE IF NOT EXISTS template_files (
		account TEXT NOT NULL,
		hash TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		size_bytes INTEGER NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, hash)
	);`
