// Package postgres implements store.Store on PostgreSQL (pgx v5), for
// kiln processes on several hosts sharing one database, with the queries
// of internal/store/sqlstore (this package adds the connection pool,
// transactions with retries, migrations and the dialect). It keeps the
// layout of internal/store/sqlite: each record is a JSON document next to
// the few columns that are queried, times are Unix nanoseconds, and list
// pages are positions in an identity column, so both stores pass the same
// conformance suite (internal/store/storetest).
//
// SQLite had one writer; here transactions run at READ COMMITTED and take
// the locks that one writer stood for: the row they read and rewrite (SELECT
// ... FOR UPDATE: a microVM's compare-and-set, a version's finish, an
// image's version counter) and, for quota admission, a transaction-scoped
// advisory lock on the account, so the count and the insert see every
// create that committed before. Serialisation failures and deadlocks are
// retried a bounded number of times.
//
// Documents are text holding JSON (encoding/json escapes NUL as \u0000,
// which text keeps and jsonb would refuse); free text a tenant controls
// outside documents (tags, event reasons, key descriptions, settings) is
// bytea, since text refuses NUL and bytes that are not UTF-8. Secret access
// keys are sealed (internal/store/seal) with a key the caller provides and
// keeps outside the database.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlstore"
)

// Store is a store.Store on one PostgreSQL database.
type Store struct {
	*sqlstore.Store
	pool   *pgxpool.Pool
	sealer *seal.Sealer
}

var (
	_ store.Store         = (*Store)(nil)
	_ store.E2BStore      = (*Store)(nil)
	_ store.Cluster       = (*Store)(nil)
	_ store.Uploads       = (*Store)(nil)
	_ store.TemplateFiles = (*Store)(nil)
)

// dialect is PostgreSQL's SQL for the shared queries: free text a tenant
// controls is bytea, rows a transaction rewrites are locked, and quota
// admissions of one account, and placements, take turns on advisory locks.
var dialect = sqlstore.Dialect{
	Text:        func(s string) any { return []byte(s) },
	ForUpdate:   " FOR UPDATE",
	LockAccount: fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d, hashtext(?))`, lockQuota),
	LockCluster: fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d, 0)`, lockCluster),
	Strpos:      "strpos",
	Greatest:    "GREATEST",
	Least:       "LEAST",
	RowID:       "ctid",
	Collate:     ` COLLATE "C"`,
	True:        "true",
}

// IsURL reports whether a --store value names a PostgreSQL database.
func IsURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// Open connects to the database named by url (a postgres:// URL or a
// libpq key=value string), applies pending migrations and returns the
// store. Secret access keys are sealed with sealer, which every process
// sharing the database must load from the same key.
func Open(ctx context.Context, url string, sealer *seal.Sealer) (*Store, error) {
	if sealer == nil {
		return nil, fmt.Errorf("opening postgres store: a sealing key is required: %w", errdefs.ErrInvalid)
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// The URL may carry a password: say what is wrong, not what it is.
		return nil, fmt.Errorf("parsing the postgres connection string (postgres://user:password@host/db?sslmode=...): %w", errdefs.ErrInvalid)
	}
	if cfg.MaxConns < 8 {
		cfg.MaxConns = 8
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connecting to postgres: %w", err)
	}
	s := &Store{pool: pool, sealer: sealer}
	if err := s.migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	s.Store = sqlstore.New(db{s}, dialect, sealer)
	return s, nil
}

// Close closes the connection pool.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// migrations are applied in order, each in its own transaction, and
// recorded in schema_migrations; never edit one that has shipped, append.
// The first is the whole schema SQLite reached in its migrations 1 to 4,
// with the sums the quota check needs as columns instead of JSON paths.
var migrations = []string{
	`CREATE TABLE access_keys (
		id TEXT PRIMARY KEY,
		secret TEXT NOT NULL,
		account TEXT NOT NULL,
		description BYTEA NOT NULL,
		created_at BIGINT NOT NULL
	);
	CREATE TABLE client_tokens (
		account TEXT NOT NULL,
		operation TEXT NOT NULL,
		token TEXT NOT NULL,
		input_hash TEXT NOT NULL,
		resource_id TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (account, operation, token)
	);
	CREATE INDEX client_tokens_by_created ON client_tokens (created_at);
	CREATE TABLE images (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		account TEXT NOT NULL,
		name TEXT NOT NULL,
		next_version BIGINT NOT NULL DEFAULT 2,
		data TEXT NOT NULL,
		UNIQUE (account, name)
	);
	CREATE TABLE image_versions (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		account TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		data TEXT NOT NULL,
		UNIQUE (account, image, version)
	);
	CREATE TABLE builds (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		build_id TEXT NOT NULL UNIQUE,
		account TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		state TEXT NOT NULL,
		snapshot_bytes BIGINT NOT NULL DEFAULT 0,
		data TEXT NOT NULL
	);
	CREATE INDEX builds_by_version ON builds (account, image, version, seq);
	CREATE INDEX builds_by_state ON builds (state);
	CREATE INDEX builds_by_account_state ON builds (account, state);
	CREATE TABLE build_logs (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		build_id TEXT NOT NULL,
		chunk BYTEA NOT NULL
	);
	CREATE INDEX build_logs_by_build ON build_logs (build_id, seq);
	CREATE TABLE microvms (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		id TEXT NOT NULL UNIQUE,
		account TEXT NOT NULL,
		state TEXT NOT NULL,
		image TEXT NOT NULL,
		version TEXT NOT NULL,
		deadline_at BIGINT NOT NULL,
		suspend_deadline_at BIGINT,
		memory_mib BIGINT NOT NULL DEFAULT 0,
		vcpus BIGINT NOT NULL DEFAULT 0,
		data TEXT NOT NULL
	);
	CREATE INDEX microvms_by_account ON microvms (account, seq);
	CREATE INDEX microvms_by_state ON microvms (state);
	CREATE INDEX microvms_by_account_state ON microvms (account, state);
	CREATE INDEX microvms_by_deadline ON microvms (deadline_at) WHERE state NOT IN ('TERMINATED', 'TERMINATING');
	CREATE INDEX microvms_by_suspend_deadline ON microvms (suspend_deadline_at) WHERE state = 'SUSPENDED';
	CREATE TABLE tags (
		account TEXT NOT NULL,
		arn TEXT NOT NULL,
		key BYTEA NOT NULL,
		value BYTEA NOT NULL,
		PRIMARY KEY (account, arn, key)
	);
	CREATE TABLE settings (
		name TEXT PRIMARY KEY,
		value BYTEA NOT NULL
	);
	CREATE TABLE events (
		seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		account TEXT NOT NULL,
		kind TEXT NOT NULL,
		resource TEXT NOT NULL,
		version TEXT NOT NULL DEFAULT '',
		from_state TEXT NOT NULL DEFAULT '',
		state TEXT NOT NULL,
		reason BYTEA NOT NULL,
		at BIGINT NOT NULL
	);
	CREATE INDEX events_by_resource ON events (account, kind, resource, version, seq);
	CREATE TABLE usage_intervals (
		key TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		resource TEXT NOT NULL,
		kind TEXT NOT NULL,
		vcpus BIGINT NOT NULL,
		memory_mib BIGINT NOT NULL,
		start_at BIGINT NOT NULL,
		end_at BIGINT NOT NULL,
		open BOOLEAN NOT NULL
	);
	CREATE INDEX usage_by_account ON usage_intervals (account, end_at);
	CREATE INDEX usage_open ON usage_intervals (open) WHERE open;
	CREATE TABLE quotas (
		account TEXT PRIMARY KEY,
		data TEXT NOT NULL
	);`,
	// 2: the E2B-compatible API's keys (hashed) and sandboxes, as SQLite's
	// migration 5; a sandbox row goes with its microVM's record.
	`CREATE TABLE IF NOT EXISTS e2b_keys (
		hash TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		prefix TEXT NOT NULL,
		description BYTEA NOT NULL,
		created_at BIGINT NOT NULL
	);
	CREATE TABLE IF NOT EXISTS e2b_sandboxes (
		id TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		data TEXT NOT NULL,
		created_at BIGINT NOT NULL
	);
	CREATE INDEX IF NOT EXISTS e2b_sandboxes_by_account ON e2b_sandboxes (account, created_at, id);
	CREATE OR REPLACE FUNCTION e2b_sandboxes_follow_microvms() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN DELETE FROM e2b_sandboxes WHERE id = OLD.id; RETURN OLD; END $$;
	CREATE OR REPLACE TRIGGER e2b_sandboxes_follow_microvms AFTER DELETE ON microvms
	FOR EACH ROW EXECUTE FUNCTION e2b_sandboxes_follow_microvms();`,
	// 3: the cluster: nodes, their templates, leases, microVMs' nodes
	// (cluster.go).
	migrationCluster,
	// 4: the E2B API's template tags, builds and snapshot records (e2b.go).
	migrationE2BTemplates,
	// 5: the node that metered each usage interval, so that a restarted
	// node closes only its own open intervals.
	`ALTER TABLE usage_intervals ADD COLUMN node TEXT NOT NULL DEFAULT '';
	CREATE INDEX usage_open_by_node ON usage_intervals (node) WHERE open;`,
	// 6: uploaded code packages kept in the store (uploads.go).
	migrationUploads,
	// 7: E2B template files kept in the store (templatefiles.go).
	migrationTemplateFiles,
}

// Advisory lock keys (the first of pg_advisory_xact_lock's two int4s).
const (
	lockMigrate = 0x6b696c6e // "kiln": one migrating process at a time
	lockQuota   = 0x6b716f74 // with hashtext(account): one admission per account
	lockCluster = 0x6b706c63 // with 0: one placement or node expiry at a time
)

func (s *Store) migrate(ctx context.Context) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		// Processes starting together migrate one after the other.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, lockMigrate); err != nil {
			return fmt.Errorf("locking schema: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
			return fmt.Errorf("creating schema_migrations: %w", err)
		}
		var have int
		if err := tx.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
			return fmt.Errorf("reading schema version: %w", err)
		}
		if have > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this kiln (%d): %w", have, len(migrations), errdefs.ErrInvalid)
		}
		for v := have + 1; v <= len(migrations); v++ {
			if _, err := tx.Exec(ctx, migrations[v-1]); err != nil {
				return fmt.Errorf("applying migration %d: %w", v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)`, v, time.Now().Unix()); err != nil {
				return fmt.Errorf("recording migration %d: %w", v, err)
			}
		}
		return nil
	})
}

// maxAttempts bounds the retries of a transaction that PostgreSQL aborted
// to keep concurrent ones serialisable (or to break a deadlock).
const maxAttempts = 8

// tx runs fn in a transaction, again (from the start, fn included) when
// PostgreSQL aborted it for a serialisation failure or a deadlock.
func (s *Store) tx(ctx context.Context, fn func(pgx.Tx) error) error {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("write"), time.Now())
	for attempt := 1; ; attempt++ {
		err := pgx.BeginFunc(ctx, s.pool, fn)
		if err == nil || !retryable(err) || attempt == maxAttempts {
			return wrap(err)
		}
		// Back off a random few milliseconds, more each time, so that the
		// transactions that collided do not collide again.
		d := time.Duration(rand.IntN(5*attempt)+1) * time.Millisecond
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
	}
}

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func retryable(err error) bool {
	c := pgCode(err)
	return c == "40001" || c == "40P01"
}

// wrap gives a database's refusal of a value (class 22) the category of
// the caller's mistake it is, once.
func wrap(err error) error {
	if err != nil && strings.HasPrefix(pgCode(err), "22") && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	return err
}

// db gives the shared queries the pool and its transactions.
type db struct{ s *Store }

func (d db) Reader() sqlstore.Querier { return conn{d.s.pool} }
func (d db) Writer() sqlstore.Querier { return conn{d.s.pool} }
func (d db) Write(ctx context.Context, fn func(sqlstore.Querier) error) error {
	return d.s.tx(ctx, func(tx pgx.Tx) error { return fn(conn{tx}) })
}

// conn is a sqlstore.Querier on the pool or a transaction: it numbers the
// shared queries' placeholders and marks the errors they tell apart.
type conn struct {
	q interface {
		Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
		Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
		QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	}
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	tag, err := c.q.Exec(ctx, rebind(query), args...)
	if err != nil {
		return 0, marker.Mark(err)
	}
	return tag.RowsAffected(), nil
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	rows, err := c.q.Query(ctx, rebind(query), args...)
	if err != nil {
		return nil, marker.Mark(err)
	}
	return pgRows{rows}, nil
}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Row {
	return marker.Row(c.q.QueryRow(ctx, rebind(query), args...))
}

type pgRows struct{ pgx.Rows }

func (r pgRows) Err() error { return marker.Mark(r.Rows.Err()) }

// marker marks the errors the shared queries tell apart; a value the
// database refuses (class 22: a NUL or a byte that is not UTF-8 in a name,
// a number out of range) is the caller's mistake, errdefs.ErrInvalid.
var marker = sqlstore.Marker{
	NoRows: func(err error) bool { return errors.Is(err, pgx.ErrNoRows) },
	Unique: func(err error) bool { return pgCode(err) == "23505" },
	Other:  wrap,
}

// rebind turns the shared queries' placeholders into PostgreSQL's: each ?
// into the next $N, and ?N into $N. Quoted literals are left as they are.
func rebind(q string) string {
	if !strings.Contains(q, "?") {
		return q
	}
	var b strings.Builder
	b.Grow(len(q) + 16)
	n, quoted := 0, false
	for i := 0; i < len(q); i++ {
		c := q[i]
		switch {
		case c == '\'':
			quoted = !quoted
		case c == '?' && !quoted:
			b.WriteByte('$')
			if i+1 < len(q) && q[i+1] >= '0' && q[i+1] <= '9' {
				continue // ?N: the digits follow as they are
			}
			n++
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

func (s *Store) AppendBuildLog(ctx context.Context, buildID string, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	// Build output is not worth a WAL flush per chunk: the commit does not
	// wait for it (it is durable with the next flush, and a crash loses at
	// most the last chunks, never corrupts anything).
	return s.tx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
			return fmt.Errorf("appending build log: %w", err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO build_logs (build_id, chunk) VALUES ($1, $2)`, buildID, data); err != nil {
			return fmt.Errorf("appending build log: %w", err)
		}
		return nil
	})
}
