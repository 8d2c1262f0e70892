// Package postgres implements store.Store on PostgreSQL (pgx v5), for
// kiln processes on several hosts sharing one database. It keeps the
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
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
)

// Store is a store.Store on one PostgreSQL database.
type Store struct {
	pool   *pgxpool.Pool
	sealer *seal.Sealer
}

var _ store.Store = (*Store)(nil)

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
}

// Advisory lock keys (the first of pg_advisory_xact_lock's two int4s).
const (
	lockMigrate = 0x6b696c6e // "kiln": one migrating process at a time
	lockQuota   = 0x6b716f74 // with hashtext(account): one admission per account
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

func isUnique(err error) bool { return pgCode(err) == "23505" }

// wrap gives a database's refusal of a value (class 22: a NUL or a byte
// that is not UTF-8 in a name, a number out of range) the category of the
// caller's mistake it is.
func wrap(err error) error {
	if err != nil && strings.HasPrefix(pgCode(err), "22") && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	return err
}

// q is what both the pool and a transaction offer.
type q interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own plain structs are marshalled here.
		panic(fmt.Sprintf("marshalling record: %v", err))
	}
	return string(b)
}

// page runs a query that selects (seq, data) ordered by seq and limited to
// limit+1 rows, decodes the documents and computes the next token.
func page[T any](ctx context.Context, db q, limit int, query string, args ...any) ([]T, string, error) {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("list"), time.Now())
	rows, err := db.Query(ctx, query, args...)
	if err != nil {
		return nil, "", fmt.Errorf("listing: %w", wrap(err))
	}
	defer rows.Close()
	out := make([]T, 0, min(limit, 128))
	var last int64
	next := ""
	for rows.Next() {
		var seq int64
		var data string
		if err := rows.Scan(&seq, &data); err != nil {
			return nil, "", fmt.Errorf("scanning: %w", err)
		}
		if len(out) == limit {
			next = store.EncodePageToken(last)
			break
		}
		var v T
		if err := json.Unmarshal([]byte(data), &v); err != nil {
			return nil, "", fmt.Errorf("decoding record: %w", err)
		}
		out = append(out, v)
		last = seq
	}
	if err := rows.Err(); err != nil {
		return nil, "", fmt.Errorf("listing: %w", wrap(err))
	}
	return out, next, nil
}

// getDoc reads one document; ErrNotFound if no row matches, including a
// key PostgreSQL cannot hold (a NUL in a name matches no record).
func getDoc[T any](ctx context.Context, db q, what, query string, args ...any) (T, error) {
	if _, ok := db.(*pgxpool.Pool); ok { // inside a transaction, tx counts the whole
		defer metrics.Since(metrics.StoreOps.WithLabelValues("read"), time.Now())
	}
	var v T
	var data string
	if err := db.QueryRow(ctx, query, args...).Scan(&data); err != nil {
		if errors.Is(err, pgx.ErrNoRows) || strings.HasPrefix(pgCode(err), "22") {
			return v, fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
		}
		return v, fmt.Errorf("reading %s: %w", what, err)
	}
	if err := json.Unmarshal([]byte(data), &v); err != nil {
		return v, fmt.Errorf("decoding %s: %w", what, err)
	}
	return v, nil
}

// docs decodes every document (data only) a query selects.
func docs[T any](ctx context.Context, db q, query string, args ...any) ([]T, error) {
	rows, err := db.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("listing: %w", err)
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		var data string
		if err := rows.Scan(&data); err != nil {
			return nil, fmt.Errorf("scanning: %w", err)
		}
		var v T
		if err := json.Unmarshal([]byte(data), &v); err != nil {
			return nil, fmt.Errorf("decoding record: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

func insertToken(ctx context.Context, tx pgx.Tx, tok *store.ClientToken) error {
	if tok == nil {
		return nil
	}
	_, err := tx.Exec(ctx, `INSERT INTO client_tokens (account, operation, token, input_hash, resource_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)`,
		tok.Account, tok.Operation, tok.Token, tok.InputHash, tok.ResourceID, tok.CreatedAt.UnixNano())
	if isUnique(err) {
		return fmt.Errorf("client token %q already used: %w", tok.Token, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("recording client token: %w", err)
	}
	return nil
}

// affected turns an update that matched no row into ErrNotFound.
func affected(tag pgconn.CommandTag, err error, what string) error {
	if err != nil {
		return fmt.Errorf("updating %s: %w", what, wrap(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	return nil
}

// Access keys.

func (s *Store) CreateAccessKey(ctx context.Context, k store.AccessKey) error {
	sealed, err := s.sealer.Seal(k.Secret, k.ID)
	if err != nil {
		return err
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO access_keys (id, secret, account, description, created_at) VALUES ($1, $2, $3, $4, $5)`,
		k.ID, sealed, k.Account, []byte(k.Description), k.CreatedAt.UnixNano())
	if isUnique(err) {
		return fmt.Errorf("access key %s exists: %w", k.ID, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating access key: %w", wrap(err))
	}
	return nil
}

func (s *Store) scanKey(sc pgx.Row) (store.AccessKey, error) {
	var k store.AccessKey
	var created int64
	var desc []byte
	if err := sc.Scan(&k.ID, &k.Secret, &k.Account, &desc, &created); err != nil {
		return k, err
	}
	k.Description = string(desc)
	k.CreatedAt = time.Unix(0, created).UTC()
	sec, err := s.sealer.Open(k.Secret, k.ID)
	if err != nil {
		return store.AccessKey{}, fmt.Errorf("access key %s: %w", k.ID, err)
	}
	k.Secret = sec
	return k, nil
}

const keyColumns = `id, secret, account, description, created_at`

func (s *Store) GetAccessKey(ctx context.Context, id string) (store.AccessKey, error) {
	k, err := s.scanKey(s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM access_keys WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) || strings.HasPrefix(pgCode(err), "22") {
		return k, fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("reading access key: %w", err)
	}
	return k, nil
}

func (s *Store) ListAccessKeys(ctx context.Context) ([]store.AccessKey, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM access_keys ORDER BY created_at, id COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("listing access keys: %w", err)
	}
	defer rows.Close()
	var out []store.AccessKey
	for rows.Next() {
		k, err := s.scanKey(rows)
		if err != nil {
			return nil, fmt.Errorf("scanning access key: %w", err)
		}
		out = append(out, k)
	}
	return out, rows.Err()
}

func (s *Store) DeleteAccessKey(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM access_keys WHERE id = $1`, id)
	if err != nil && !strings.HasPrefix(pgCode(err), "22") {
		return fmt.Errorf("deleting access key: %w", err)
	}
	if err != nil || tag.RowsAffected() == 0 {
		return fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	return nil
}

// Settings.

func (s *Store) GetSetting(ctx context.Context, name string) (string, error) {
	var v []byte
	err := s.pool.QueryRow(ctx, `SELECT value FROM settings WHERE name = $1`, name).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("setting %s: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("reading setting %s: %w", name, wrap(err))
	}
	return string(v), nil
}

func (s *Store) SetSetting(ctx context.Context, name, value string) error {
	if _, err := s.pool.Exec(ctx, `INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value`,
		name, []byte(value)); err != nil {
		return fmt.Errorf("writing setting %s: %w", name, wrap(err))
	}
	return nil
}

// Client tokens.

func (s *Store) GetClientToken(ctx context.Context, account, operation, token string) (store.ClientToken, error) {
	t := store.ClientToken{Account: account, Operation: operation, Token: token}
	var created int64
	err := s.pool.QueryRow(ctx, `SELECT input_hash, resource_id, created_at FROM client_tokens WHERE account = $1 AND operation = $2 AND token = $3`,
		account, operation, token).Scan(&t.InputHash, &t.ResourceID, &created)
	if errors.Is(err, pgx.ErrNoRows) || strings.HasPrefix(pgCode(err), "22") {
		return t, fmt.Errorf("client token: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return t, fmt.Errorf("reading client token: %w", err)
	}
	t.CreatedAt = time.Unix(0, created).UTC()
	return t, nil
}
