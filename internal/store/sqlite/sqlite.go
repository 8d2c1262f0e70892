// Package sqlite implements store.Store on an embedded SQLite database
// (modernc.org/sqlite, pure Go), with the queries of internal/store/sqlstore
// (this package adds the connections, migrations and the dialect). It
// keeps one writer connection, so writes
// are serialised in the process and never meet SQLITE_BUSY among
// themselves, and a pool of readers, which WAL lets run beside the writer.
// Each record is kept as a JSON document next to the few columns that are
// queried, so a new field needs no migration; synchronous=FULL makes every
// commit durable before the call returns (build log chunks aside: see
// AppendBuildLog).
//
// The database and its WAL and SHM files are mode 0600, and secret access
// keys are sealed (internal/store/seal) with a key kept outside the
// database, so a copy of the database alone reveals no secret;
// secure_delete (FAST) zeroes what a change frees in the pages it writes.
package sqlite

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlstore"
)

// Store is a store.Store on one SQLite file.
type Store struct {
	*sqlstore.Store
	w      *sql.DB // single writer connection
	r      *sql.DB // reader pool
	sealer *seal.Sealer
}

var (
	_ store.Store         = (*Store)(nil)
	_ store.E2BStore      = (*Store)(nil)
	_ store.Cluster       = (*Store)(nil)
	_ store.Uploads       = (*Store)(nil)
	_ store.TemplateFiles = (*Store)(nil)
)

// dialect is SQLite's SQL for the shared queries. The one writer
// connection makes every write transaction exclusive (BEGIN IMMEDIATE), so
// no row or account lock is needed.
var dialect = sqlstore.Dialect{Strpos: "instr", Greatest: "MAX", Least: "MIN", RowID: "rowid", True: "1", PlainSecrets: true}

// KeyFile is the name of the sealing key that Open uses, beside the
// database, when it is given no Sealer.
const KeyFile = "secrets.key"

// Option configures Open.
type Option func(*Store)

// WithSealer seals secret access keys with s (default: the key in KeyFile
// beside the database, created on first use).
func WithSealer(s *seal.Sealer) Option { return func(st *Store) { st.sealer = s } }

// Open opens (creating if needed) the database at path, applies pending
// migrations and seals any secret an older kiln stored in clear.
func Open(ctx context.Context, path string, opts ...Option) (*Store, error) {
	s := &Store{}
	for _, o := range opts {
		o(s)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating database directory: %w", err)
	}
	if s.sealer == nil {
		sl, err := seal.LoadOrCreate(filepath.Join(filepath.Dir(path), KeyFile))
		if err != nil {
			return nil, err
		}
		s.sealer = sl
	}
	// SQLite creates the WAL and SHM files with the mode of the database,
	// so creating the database 0600 covers all three.
	if err := secureFiles(path); err != nil {
		return nil, err
	}
	base := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)"
	w, err := sql.Open("sqlite", base+"&_pragma=synchronous(FULL)&_pragma=secure_delete(FAST)&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("opening database: %w", err)
	}
	w.SetMaxOpenConns(1)
	w.SetConnMaxIdleTime(0)
	s.w = w
	if err := s.migrate(ctx); err != nil {
		w.Close()
		return nil, err
	}
	if err := s.sealPlaintext(ctx); err != nil {
		w.Close()
		return nil, err
	}
	if err := secureFiles(path); err != nil {
		w.Close()
		return nil, err
	}
	r, err := sql.Open("sqlite", base+"&_pragma=query_only(1)")
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("opening database readers: %w", err)
	}
	n := 2 * runtime.GOMAXPROCS(0)
	if n < 4 {
		n = 4
	}
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	s.r = r
	s.Store = sqlstore.New(db{s}, dialect, s.sealer)
	return s, nil
}

// secureFiles creates the database file 0600 if it does not exist and
// brings it, its WAL and its SHM back to 0600 if they do.
func secureFiles(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating database: %w", err)
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		if err := os.Chmod(p, 0o600); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("securing %s: %w", p, err)
		}
	}
	return nil
}

// sealPlaintext seals the secrets an older kiln stored in clear, then
// empties the WAL, whose old frames still hold them (secure_delete has
// zeroed them in the database file itself).
func (s *Store) sealPlaintext(ctx context.Context) error {
	n := 0
	err := s.tx(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT id, secret FROM access_keys`)
		if err != nil {
			return fmt.Errorf("reading access keys: %w", err)
		}
		type kv struct{ id, secret string }
		var plain []kv
		for rows.Next() {
			var k kv
			if err := rows.Scan(&k.id, &k.secret); err != nil {
				rows.Close()
				return fmt.Errorf("reading access keys: %w", err)
			}
			if !seal.IsSealed(k.secret) {
				plain = append(plain, k)
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("reading access keys: %w", err)
		}
		for _, k := range plain {
			v, err := s.sealer.Seal(k.secret, k.id)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE access_keys SET secret = ? WHERE id = ?`, v, k.id); err != nil {
				return fmt.Errorf("sealing access key %s: %w", k.id, err)
			}
		}
		n = len(plain)
		return nil
	})
	if err != nil {
		return fmt.Errorf("sealing stored secrets: %w", err)
	}
	if n == 0 {
		return nil
	}
	if _, err := s.w.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return fmt.Errorf("checkpointing after sealing secrets: %w", err)
	}
	return nil
}

// Close closes both connection pools.
func (s *Store) Close() error {
	return errors.Join(s.r.Close(), s.w.Close())
}

// migrations are applied in order, each in its own transaction, and
// recorded in schema_migrations; never edit one that has shipped, append.
var migrations = []string{
	// 1: initial schema.
	`CREATE TABLE access_keys (
		id TEXT PRIMARY KEY,
		secret TEXT NOT NULL,
		account TEXT NOT NULL,
		description TEXT NOT NULL DEFAULT '',
		created_at INTEGER NOT NULL
	);
	CREATE TABLE client_tokens (
		account TEXT NOT NULL,
		operation TEXT NOT NULL,
		token TEXT NOT NULL,
		input_hash TEXT NOT NULL,
		resource_id TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (account, operation, token)
	);
	CREATE TABLE images (
		seq INTEGER PRIMARY KEY,
		account TEXT NOT NULL,
		name TEXT NOT NULL,
		next_version INTEGER NOT NULL DEFAULT 2,
		data TEXT NOT NULL,
		UNIQUE (account, name)
	);
	CREATE TABLE image_versions (
		seq INTEGER PRIMARY KEY,
		account TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		data TEXT NOT NULL,
		UNIQUE (account, image, version)
	);
	CREATE TABLE builds (
		seq INTEGER PRIMARY KEY,
		build_id TEXT NOT NULL UNIQUE,
		account TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		state TEXT NOT NULL,
		data TEXT NOT NULL
	);
	CREATE INDEX builds_by_version ON builds (account, image, version, seq);
	CREATE INDEX builds_by_state ON builds (state);
	CREATE TABLE build_logs (
		seq INTEGER PRIMARY KEY,
		build_id TEXT NOT NULL,
		chunk BLOB NOT NULL
	);
	CREATE INDEX build_logs_by_build ON build_logs (build_id, seq);
	CREATE TABLE microvms (
		seq INTEGER PRIMARY KEY,
		id TEXT NOT NULL UNIQUE,
		account TEXT NOT NULL,
		state TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		deadline_at INTEGER NOT NULL,
		suspend_deadline_at INTEGER,
		data TEXT NOT NULL
	);
	CREATE INDEX microvms_by_account ON microvms (account, seq);
	CREATE INDEX microvms_by_state ON microvms (state);
	CREATE INDEX microvms_by_deadline ON microvms (deadline_at) WHERE state NOT IN ('TERMINATED', 'TERMINATING');
	CREATE INDEX microvms_by_suspend_deadline ON microvms (suspend_deadline_at) WHERE state = 'SUSPENDED';
	CREATE TABLE tags (
		account TEXT NOT NULL,
		arn TEXT NOT NULL,
		key TEXT NOT NULL,
		value TEXT NOT NULL,
		PRIMARY KEY (account, arn, key)
	);`,
	// 2: settings kiln records once (the operator account).
	`CREATE TABLE settings (
		name TEXT PRIMARY KEY,
		value TEXT NOT NULL
	);`,
	// 3: lifecycle events and usage intervals (events.go).
	migrationEventsUsage,
	// 4: per-account quota overrides (`kiln quotas set`), and an index
	// that lets the quota check count an account's live microVMs without
	// reading its terminated ones.
	`CREATE TABLE IF NOT EXISTS quotas (
		account TEXT PRIMARY KEY,
		data TEXT NOT NULL
	);
	CREATE INDEX IF NOT EXISTS microvms_by_account_state ON microvms (account, state);
	CREATE INDEX IF NOT EXISTS builds_by_account_state ON builds (account, state);`,
	// 5: the E2B-compatible API's keys and sandboxes (e2b.go).
	migrationE2B,
	// 6: the sizes the quota adds up as columns (sqlstore).
	migrationSizeColumns,
	// 7: the cluster: nodes, their templates, leases, microVMs' nodes
	// (cluster.go).
	migrationCluster,
	// 8: the E2B API's template tags, builds and snapshot records (e2b.go).
	migrationE2BTemplates,
	// 9: the node that metered each usage interval (events.go).
	migrationUsageNode,
	// 10: uploaded code packages kept in the store (uploads.go).
	migrationUploads,
	// 11: E2B template files kept in the store (templatefiles.go).
	migrationTemplateFiles,
}

// migrationSizeColumns adds the sizes the quota adds up as columns, as the
// PostgreSQL schema has them, so that both stores run the same queries;
// the records kept so far get theirs from their JSON documents.
const migrationSizeColumns = `ALTER TABLE microvms ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE microvms ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 0;
	UPDATE microvms SET memory_mib = COALESCE(json_extract(data, '$.memoryMiB'), 0), vcpus = COALESCE(json_extract(data, '$.vcpus'), 0);
	ALTER TABLE builds ADD COLUMN snapshot_bytes INTEGER NOT NULL DEFAULT 0;
	UPDATE builds SET snapshot_bytes = COALESCE(json_extract(data, '$.snapshotBuild.memorySnapshotSizeInBytes'), 0)
		+ COALESCE(json_extract(data, '$.snapshotBuild.diskSnapshotSizeInBytes'), 0) WHERE state = 'SUCCESSFUL';`

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.w.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("creating schema_migrations: %w", err)
	}
	var have int
	if err := s.w.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
		return fmt.Errorf("reading schema version: %w", err)
	}
	if have > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this kiln (%d): %w", have, len(migrations), errdefs.ErrInvalid)
	}
	for v := have + 1; v <= len(migrations); v++ {
		err := s.tx(ctx, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, migrations[v-1]); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`, v, time.Now().Unix())
			return err
		})
		if err != nil {
			return fmt.Errorf("applying migration %d: %w", v, err)
		}
	}
	return nil
}

// tx runs fn in a write transaction (BEGIN IMMEDIATE through _txlock).
func (s *Store) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("write"), time.Now())
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("beginning transaction: %w", err)
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("committing: %w", err)
	}
	return nil
}

// db gives the shared queries the reader pool, the writer and its
// transactions.
type db struct{ s *Store }

func (d db) Reader() sqlstore.Querier { return conn{d.s.r} }
func (d db) Writer() sqlstore.Querier { return conn{d.s.w} }
func (d db) Write(ctx context.Context, fn func(sqlstore.Querier) error) error {
	return d.s.tx(ctx, func(tx *sql.Tx) error { return fn(conn{tx}) })
}

// conn is a sqlstore.Querier on a pool or a transaction.
type conn struct {
	q interface {
		ExecContext(context.Context, string, ...any) (sql.Result, error)
		QueryContext(context.Context, string, ...any) (*sql.Rows, error)
		QueryRowContext(context.Context, string, ...any) *sql.Row
	}
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := c.q.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, marker.Mark(err)
	}
	n, _ := res.RowsAffected()
	return n, nil
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	rows, err := c.q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, marker.Mark(err)
	}
	return sqlRows{rows}, nil
}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Row {
	return marker.Row(c.q.QueryRowContext(ctx, query, args...))
}

type sqlRows struct{ *sql.Rows }

func (r sqlRows) Close() { r.Rows.Close() }

// marker marks the errors the shared queries tell apart.
var marker = sqlstore.Marker{
	NoRows: func(err error) bool { return errors.Is(err, sql.ErrNoRows) },
	Unique: func(err error) bool { return strings.Contains(err.Error(), "UNIQUE constraint failed") },
}

func (s *Store) AppendBuildLog(ctx context.Context, buildID string, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	// Build output is not worth an fsync per chunk on the one writer every
	// tenant's requests wait on: this commit runs with synchronous=NORMAL
	// (in WAL mode: durable at the next FULL commit or checkpoint, and
	// never corrupting), on the writer connection held for the three
	// statements so no other commit runs with the weaker setting.
	conn, err := s.w.Conn(ctx)
	if err != nil {
		return fmt.Errorf("appending build log: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `PRAGMA synchronous = NORMAL`); err != nil {
		return fmt.Errorf("appending build log: %w", err)
	}
	_, err = conn.ExecContext(ctx, `INSERT INTO build_logs (build_id, chunk) VALUES (?, ?)`, buildID, data)
	if _, rerr := conn.ExecContext(context.WithoutCancel(ctx), `PRAGMA synchronous = FULL`); rerr != nil {
		// A connection left at NORMAL must not serve other commits.
		conn.Raw(func(any) error { return driver.ErrBadConn })
		return fmt.Errorf("restoring synchronous=FULL: %w", rerr)
	}
	if err != nil {
		return fmt.Errorf("appending build log: %w", err)
	}
	return nil
}
