package postgres

// migrationTemplateFiles is SQLite's migration 11
// (internal/store/sqlite/templatefiles.go): E2B template files by account
// and SDK hash, their bytes in upload_chunks.
const migrationTemplateFiles = `CREATE TABLE IF NOT EXISTS template_files (
		account TEXT NOT NULL,
		hash TEXT NOT NULL,
		upload_id TEXT NOT NULL,
		size_bytes BIGINT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, hash)
	);`
