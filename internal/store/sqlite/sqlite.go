// Package sqlite implements store.Store on an embedded SQLite database
// (modernc.org/sqlite, pure Go). It keeps one writer connection, so writes
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
	"encoding/json"
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
)

// Store is a store.Store on one SQLite file.
type Store struct {
	w      *sql.DB // single writer connection
	r      *sql.DB // reader pool
	sealer *seal.Sealer
}

var _ store.Store = (*Store)(nil)

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
}

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

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// page runs a query that selects (seq, data) ordered by seq and limited to
// limit+1 rows, decodes the documents and computes the next token.
func page[T any](ctx context.Context, db *sql.DB, limit int, query string, args ...any) ([]T, string, error) {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("list"), time.Now())
	rows, err := db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, "", fmt.Errorf("listing: %w", err)
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
		return nil, "", fmt.Errorf("listing: %w", err)
	}
	return out, next, nil
}

func getDoc[T any](ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, what, query string, args ...any) (T, error) {
	if _, ok := q.(*sql.DB); ok { // inside a transaction, tx counts the whole
		defer metrics.Since(metrics.StoreOps.WithLabelValues("read"), time.Now())
	}
	var v T
	var data string
	if err := q.QueryRowContext(ctx, query, args...).Scan(&data); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return v, fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
		}
		return v, fmt.Errorf("reading %s: %w", what, err)
	}
	if err := json.Unmarshal([]byte(data), &v); err != nil {
		return v, fmt.Errorf("decoding %s: %w", what, err)
	}
	return v, nil
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own plain structs are marshalled here.
		panic(fmt.Sprintf("marshalling record: %v", err))
	}
	return string(b)
}

func insertToken(ctx context.Context, tx *sql.Tx, tok *store.ClientToken) error {
	if tok == nil {
		return nil
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO client_tokens (account, operation, token, input_hash, resource_id, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
		tok.Account, tok.Operation, tok.Token, tok.InputHash, tok.ResourceID, tok.CreatedAt.UnixNano())
	if isUnique(err) {
		return fmt.Errorf("client token %q already used: %w", tok.Token, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("recording client token: %w", err)
	}
	return nil
}

// Access keys.

func (s *Store) CreateAccessKey(ctx context.Context, k store.AccessKey) error {
	sealed, err := s.sealer.Seal(k.Secret, k.ID)
	if err != nil {
		return err
	}
	_, err = s.w.ExecContext(ctx, `INSERT INTO access_keys (id, secret, account, description, created_at) VALUES (?, ?, ?, ?, ?)`,
		k.ID, sealed, k.Account, k.Description, k.CreatedAt.UnixNano())
	if isUnique(err) {
		return fmt.Errorf("access key %s exists: %w", k.ID, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating access key: %w", err)
	}
	return nil
}

func (s *Store) scanKey(sc interface{ Scan(...any) error }) (store.AccessKey, error) {
	var k store.AccessKey
	var created int64
	if err := sc.Scan(&k.ID, &k.Secret, &k.Account, &k.Description, &created); err != nil {
		return k, err
	}
	k.CreatedAt = time.Unix(0, created).UTC()
	// A row written in clear by an older kiln that is still running
	// beside this one is read as it is; the next Open seals it.
	if seal.IsSealed(k.Secret) {
		sec, err := s.sealer.Open(k.Secret, k.ID)
		if err != nil {
			return store.AccessKey{}, fmt.Errorf("access key %s: %w", k.ID, err)
		}
		k.Secret = sec
	}
	return k, nil
}

func (s *Store) GetAccessKey(ctx context.Context, id string) (store.AccessKey, error) {
	k, err := s.scanKey(s.r.QueryRowContext(ctx, `SELECT id, secret, account, description, created_at FROM access_keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("reading access key: %w", err)
	}
	return k, nil
}

func (s *Store) ListAccessKeys(ctx context.Context) ([]store.AccessKey, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT id, secret, account, description, created_at FROM access_keys ORDER BY created_at, id`)
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
	res, err := s.w.ExecContext(ctx, `DELETE FROM access_keys WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("deleting access key: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	return nil
}

// Settings.

func (s *Store) GetSetting(ctx context.Context, name string) (string, error) {
	var v string
	err := s.r.QueryRowContext(ctx, `SELECT value FROM settings WHERE name = ?`, name).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("setting %s: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("reading setting %s: %w", name, err)
	}
	return v, nil
}

func (s *Store) SetSetting(ctx context.Context, name, value string) error {
	if _, err := s.w.ExecContext(ctx, `INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value`,
		name, value); err != nil {
		return fmt.Errorf("writing setting %s: %w", name, err)
	}
	return nil
}

// Client tokens.

func (s *Store) GetClientToken(ctx context.Context, account, operation, token string) (store.ClientToken, error) {
	t := store.ClientToken{Account: account, Operation: operation, Token: token}
	var created int64
	err := s.r.QueryRowContext(ctx, `SELECT input_hash, resource_id, created_at FROM client_tokens WHERE account = ? AND operation = ? AND token = ?`,
		account, operation, token).Scan(&t.InputHash, &t.ResourceID, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return t, fmt.Errorf("client token: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return t, fmt.Errorf("reading client token: %w", err)
	}
	t.CreatedAt = time.Unix(0, created).UTC()
	return t, nil
}

// Images.

func (s *Store) CreateImage(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken) error {
	return s.createImage(ctx, img, v, builds, tok, nil)
}

func (s *Store) CreateImageWithinQuota(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm store.Admission) error {
	return s.createImage(ctx, img, v, builds, tok, &adm)
}

func (s *Store) createImage(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm *store.Admission) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if adm != nil {
			if err := admit(ctx, tx, img.Account, *adm, store.QuotaUse{Builds: int64(len(builds))}); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO images (account, name, next_version, data) VALUES (?, ?, ?, ?)`,
			img.Account, img.Name, 2, mustJSON(img))
		if isUnique(err) {
			return fmt.Errorf("image %s exists: %w", img.Name, errdefs.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("creating image: %w", err)
		}
		if err := insertVersion(ctx, tx, v, builds); err != nil {
			return err
		}
		return insertToken(ctx, tx, tok)
	})
}

func insertVersion(ctx context.Context, tx *sql.Tx, v store.ImageVersion, builds []store.Build) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO image_versions (account, image, version, data) VALUES (?, ?, ?, ?)`,
		v.Account, v.ImageName, v.Version, mustJSON(v))
	if isUnique(err) {
		return fmt.Errorf("image version %s:%s exists: %w", v.ImageName, v.Version, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating image version: %w", err)
	}
	if err := insertEvent(ctx, tx, store.VersionEvent(v, "")); err != nil {
		return err
	}
	for _, b := range builds {
		if _, err := tx.ExecContext(ctx, `INSERT INTO builds (build_id, account, image, version, state, data) VALUES (?, ?, ?, ?, ?, ?)`,
			b.ID, b.Account, b.ImageName, b.Version, b.State, mustJSON(b)); err != nil {
			return fmt.Errorf("creating build: %w", err)
		}
	}
	return nil
}

func (s *Store) GetImage(ctx context.Context, account, name string) (store.Image, error) {
	return getDoc[store.Image](ctx, s.r, "image "+name, `SELECT data FROM images WHERE account = ? AND name = ?`, account, name)
}

func (s *Store) ListImages(ctx context.Context, account, nameFilter string, p store.Page) ([]store.Image, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.Image](ctx, s.r, limit,
		`SELECT seq, data FROM images WHERE account = ? AND seq > ? AND instr(name, ?) > 0 ORDER BY seq LIMIT ?`,
		account, after, nameFilter, limit+1)
}

func (s *Store) UpdateImage(ctx context.Context, img store.Image) error {
	res, err := s.w.ExecContext(ctx, `UPDATE images SET data = ? WHERE account = ? AND name = ?`, mustJSON(img), img.Account, img.Name)
	return affected(res, err, "image "+img.Name)
}

func affected(res sql.Result, err error, what string) error {
	if err != nil {
		return fmt.Errorf("updating %s: %w", what, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	return nil
}

func (s *Store) DeleteImage(ctx context.Context, account, name string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		var arn string
		err := tx.QueryRowContext(ctx, `SELECT json_extract(data, '$.arn') FROM images WHERE account = ? AND name = ?`, account, name).Scan(&arn)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("image %s: %w", name, errdefs.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("reading image: %w", err)
		}
		if err := deletedVersionEvents(ctx, tx, account, name, "", "DeleteMicrovmImage"); err != nil {
			return err
		}
		for _, q := range []string{
			`DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = ?1 AND image = ?2)`,
			`DELETE FROM builds WHERE account = ?1 AND image = ?2`,
			`DELETE FROM image_versions WHERE account = ?1 AND image = ?2`,
			`DELETE FROM images WHERE account = ?1 AND name = ?2`,
		} {
			if _, err := tx.ExecContext(ctx, q, account, name); err != nil {
				return fmt.Errorf("deleting image: %w", err)
			}
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM tags WHERE account = ? AND arn = ?`, account, arn); err != nil {
			return fmt.Errorf("deleting image tags: %w", err)
		}
		return nil
	})
}

// Image versions.

func (s *Store) CreateImageVersion(ctx context.Context, v store.ImageVersion, builds []store.Build, tok *store.ClientToken) (store.ImageVersion, []store.Build, error) {
	return s.createImageVersion(ctx, v, builds, tok, nil)
}

func (s *Store) CreateImageVersionWithinQuota(ctx context.Context, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm store.Admission) (store.ImageVersion, []store.Build, error) {
	return s.createImageVersion(ctx, v, builds, tok, &adm)
}

func (s *Store) createImageVersion(ctx context.Context, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm *store.Admission) (store.ImageVersion, []store.Build, error) {
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if adm != nil {
			if err := admit(ctx, tx, v.Account, *adm, store.QuotaUse{Builds: int64(len(builds))}); err != nil {
				return err
			}
		}
		var next int64
		var data string
		err := tx.QueryRowContext(ctx, `SELECT next_version, data FROM images WHERE account = ? AND name = ?`, v.Account, v.ImageName).Scan(&next, &data)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("image %s: %w", v.ImageName, errdefs.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("reading image: %w", err)
		}
		var img store.Image
		if err := json.Unmarshal([]byte(data), &img); err != nil {
			return fmt.Errorf("decoding image: %w", err)
		}
		v.Version = store.VersionName(next)
		for i := range builds {
			builds[i].Version = v.Version
		}
		img.State = store.ImageUpdating
		img.LatestVersion = v.Version
		img.UpdatedAt = v.CreatedAt
		if _, err := tx.ExecContext(ctx, `UPDATE images SET next_version = ?, data = ? WHERE account = ? AND name = ?`,
			next+1, mustJSON(img), v.Account, v.ImageName); err != nil {
			return fmt.Errorf("updating image: %w", err)
		}
		if tok != nil {
			tok.ResourceID = v.ImageName + ":" + v.Version
		}
		if err := insertVersion(ctx, tx, v, builds); err != nil {
			return err
		}
		return insertToken(ctx, tx, tok)
	})
	return v, builds, err
}

func (s *Store) GetImageVersion(ctx context.Context, account, image, version string) (store.ImageVersion, error) {
	return getDoc[store.ImageVersion](ctx, s.r, "image version "+image+":"+version,
		`SELECT data FROM image_versions WHERE account = ? AND image = ? AND version = ?`, account, image, version)
}

func (s *Store) ListImageVersions(ctx context.Context, account, image string, p store.Page) ([]store.ImageVersion, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.ImageVersion](ctx, s.r, limit,
		`SELECT seq, data FROM image_versions WHERE account = ? AND image = ? AND seq > ? ORDER BY seq LIMIT ?`,
		account, image, after, limit+1)
}

func (s *Store) UpdateImageVersion(ctx context.Context, v store.ImageVersion) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		what := "image version " + v.ImageName + ":" + v.Version
		old, err := getDoc[store.ImageVersion](ctx, tx, what, `SELECT data FROM image_versions WHERE account = ? AND image = ? AND version = ?`, v.Account, v.ImageName, v.Version)
		if err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `UPDATE image_versions SET data = ? WHERE account = ? AND image = ? AND version = ?`,
			mustJSON(v), v.Account, v.ImageName, v.Version)
		if err := affected(res, err, what); err != nil {
			return err
		}
		if old.State != v.State {
			return insertEvent(ctx, tx, store.VersionEvent(v, old.State))
		}
		return nil
	})
}

func (s *Store) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if err := deletedVersionEvents(ctx, tx, account, image, version, "DeleteMicrovmImageVersion"); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `DELETE FROM image_versions WHERE account = ? AND image = ? AND version = ?`, account, image, version)
		if err := affected(res, err, "image version "+image+":"+version); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = ? AND image = ? AND version = ?)`, account, image, version); err != nil {
			return fmt.Errorf("deleting build logs: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM builds WHERE account = ? AND image = ? AND version = ?`, account, image, version); err != nil {
			return fmt.Errorf("deleting builds: %w", err)
		}
		return nil
	})
}

// Builds.

func (s *Store) GetBuild(ctx context.Context, account, image, version, buildID string) (store.Build, error) {
	return getDoc[store.Build](ctx, s.r, "build "+buildID,
		`SELECT data FROM builds WHERE account = ? AND image = ? AND version = ? AND build_id = ?`, account, image, version, buildID)
}

func (s *Store) ListBuilds(ctx context.Context, account, image, version string, p store.Page) ([]store.Build, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.Build](ctx, s.r, limit,
		`SELECT seq, data FROM builds WHERE account = ? AND image = ? AND version = ? AND seq > ? ORDER BY seq LIMIT ?`,
		account, image, version, after, limit+1)
}

func (s *Store) ListBuildsInState(ctx context.Context, states ...string) ([]store.Build, error) {
	if len(states) == 0 {
		return nil, nil
	}
	args := make([]any, len(states))
	for i, st := range states {
		args[i] = st
	}
	q := `SELECT seq, data FROM builds WHERE state IN (` + placeholders(len(states)) + `) ORDER BY seq`
	out, _, err := page[store.Build](ctx, s.r, 1<<30, q, args...)
	return out, err
}

func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?,", n), ",")
}

func (s *Store) UpdateBuild(ctx context.Context, b store.Build) error {
	res, err := s.w.ExecContext(ctx, `UPDATE builds SET state = ?, data = ? WHERE build_id = ? AND account = ?`, b.State, mustJSON(b), b.ID, b.Account)
	return affected(res, err, "build "+b.ID)
}

func (s *Store) FinishBuild(ctx context.Context, b store.Build) (bool, error) {
	finalised := false
	err := s.tx(ctx, func(tx *sql.Tx) error {
		// The write transaction is BEGIN IMMEDIATE: no other finish of
		// this version runs between the read of its builds and the writes.
		old, err := getDoc[store.Build](ctx, tx, "build "+b.ID, `SELECT data FROM builds WHERE build_id = ? AND account = ?`, b.ID, b.Account)
		if err != nil {
			return err
		}
		if store.BuildFinal(old.State) {
			return fmt.Errorf("build %s is %s already: %w", b.ID, old.State, errdefs.ErrConflict)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE builds SET state = ?, data = ? WHERE build_id = ? AND account = ?`, b.State, mustJSON(b), b.ID, b.Account); err != nil {
			return fmt.Errorf("updating build %s: %w", b.ID, err)
		}
		builds, err := docs[store.Build](ctx, tx, `SELECT data FROM builds WHERE account = ? AND image = ? AND version = ? ORDER BY seq`, b.Account, b.ImageName, b.Version)
		if err != nil {
			return err
		}
		what := "image version " + b.ImageName + ":" + b.Version
		v, err := getDoc[store.ImageVersion](ctx, tx, what, `SELECT data FROM image_versions WHERE account = ? AND image = ? AND version = ?`, b.Account, b.ImageName, b.Version)
		if err != nil {
			return err
		}
		img, err := getDoc[store.Image](ctx, tx, "image "+b.ImageName, `SELECT data FROM images WHERE account = ? AND name = ?`, b.Account, b.ImageName)
		if err != nil {
			return err
		}
		before := v.State
		if !store.FinishVersion(builds, &v, &img, b.UpdatedAt) {
			return nil
		}
		if _, err := tx.ExecContext(ctx, `UPDATE image_versions SET data = ? WHERE account = ? AND image = ? AND version = ?`,
			mustJSON(v), v.Account, v.ImageName, v.Version); err != nil {
			return fmt.Errorf("updating %s: %w", what, err)
		}
		if before != v.State {
			if err := insertEvent(ctx, tx, store.VersionEvent(v, before)); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, `UPDATE images SET data = ? WHERE account = ? AND name = ?`, mustJSON(img), img.Account, img.Name); err != nil {
			return fmt.Errorf("updating image %s: %w", img.Name, err)
		}
		finalised = true
		return nil
	})
	return finalised, err
}

// docs decodes every document a query selects (data only) inside tx.
func docs[T any](ctx context.Context, tx *sql.Tx, query string, args ...any) ([]T, error) {
	rows, err := tx.QueryContext(ctx, query, args...)
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

func (s *Store) ReadBuildLog(ctx context.Context, buildID string, offset int64, limit int) ([]byte, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT chunk FROM build_logs WHERE build_id = ? ORDER BY seq`, buildID)
	if err != nil {
		return nil, fmt.Errorf("reading build log: %w", err)
	}
	defer rows.Close()
	var out []byte
	var pos int64
	for rows.Next() && len(out) < limit {
		var chunk []byte
		if err := rows.Scan(&chunk); err != nil {
			return nil, fmt.Errorf("reading build log: %w", err)
		}
		end := pos + int64(len(chunk))
		if end > offset {
			start := int64(0)
			if offset > pos {
				start = offset - pos
			}
			out = append(out, chunk[start:]...)
		}
		pos = end
	}
	if len(out) > limit {
		out = out[:limit]
	}
	return out, rows.Err()
}

// MicroVMs.

func suspendDeadline(m store.Microvm) any {
	if m.SuspendDeadlineAt == nil {
		return nil
	}
	return m.SuspendDeadlineAt.UnixNano()
}

func (s *Store) CreateMicrovm(ctx context.Context, m store.Microvm, tok *store.ClientToken) error {
	return s.tx(ctx, func(tx *sql.Tx) error { return insertMicrovm(ctx, tx, m, tok) })
}

func (s *Store) CreateMicrovmWithinQuota(ctx context.Context, m store.Microvm, tok *store.ClientToken, adm store.Admission) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		// The write transaction is BEGIN IMMEDIATE: no other writer runs
		// between this count and the insert.
		if err := admit(ctx, tx, m.Account, adm, store.QuotaUse{Microvms: 1, MemoryMiB: m.MemoryMiB, VCPUs: m.VCPUs}); err != nil {
			return err
		}
		return insertMicrovm(ctx, tx, m, tok)
	})
}

func insertMicrovm(ctx context.Context, tx *sql.Tx, m store.Microvm, tok *store.ClientToken) error {
	{
		_, err := tx.ExecContext(ctx, `INSERT INTO microvms (id, account, state, image, version, deadline_at, suspend_deadline_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			m.ID, m.Account, string(m.State), m.ImageName, m.ImageVersion, m.DeadlineAt.UnixNano(), suspendDeadline(m), mustJSON(m))
		if isUnique(err) {
			return fmt.Errorf("microvm %s exists: %w", m.ID, errdefs.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("creating microvm: %w", err)
		}
		if err := insertEvent(ctx, tx, store.CreatedMicrovmEvent(m)); err != nil {
			return err
		}
		return insertToken(ctx, tx, tok)
	}
}

func (s *Store) GetMicrovm(ctx context.Context, account, id string) (store.Microvm, error) {
	return getDoc[store.Microvm](ctx, s.r, "microvm "+id, `SELECT data FROM microvms WHERE id = ? AND account = ?`, id, account)
}

func (s *Store) ListMicrovms(ctx context.Context, account string, f store.MicrovmFilter, p store.Page) ([]store.Microvm, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	q := `SELECT seq, data FROM microvms WHERE account = ? AND seq > ?`
	args := []any{account, after}
	if f.ImageName != "" {
		q += ` AND image = ?`
		args = append(args, f.ImageName)
	}
	if f.ImageVersion != "" {
		q += ` AND version = ?`
		args = append(args, f.ImageVersion)
	}
	if len(f.States) > 0 {
		q += ` AND state IN (` + placeholders(len(f.States)) + `)`
		for _, st := range f.States {
			args = append(args, string(st))
		}
	}
	q += ` ORDER BY seq LIMIT ?`
	args = append(args, limit+1)
	return page[store.Microvm](ctx, s.r, limit, q, args...)
}

func (s *Store) ListMicrovmsInState(ctx context.Context, limit int, states ...store.MicrovmState) ([]store.Microvm, error) {
	if len(states) == 0 {
		return nil, nil
	}
	if limit <= 0 {
		limit = 1 << 30
	}
	args := make([]any, 0, len(states)+1)
	for _, st := range states {
		args = append(args, string(st))
	}
	args = append(args, limit+1)
	out, _, err := page[store.Microvm](ctx, s.r, limit, `SELECT seq, data FROM microvms WHERE state IN (`+placeholders(len(states))+`) ORDER BY seq LIMIT ?`, args...)
	return out, err
}

func (s *Store) ListMicrovmsDue(ctx context.Context, now time.Time, limit int) ([]store.Microvm, error) {
	if limit <= 0 {
		limit = 1000
	}
	n := now.UnixNano()
	out, _, err := page[store.Microvm](ctx, s.r, limit,
		`SELECT seq, data FROM microvms WHERE state NOT IN ('TERMINATED', 'TERMINATING') AND deadline_at <= ?
		 UNION SELECT seq, data FROM microvms WHERE state = 'SUSPENDED' AND suspend_deadline_at <= ?
		 ORDER BY seq LIMIT ?`, n, n, limit+1)
	return out, err
}

func (s *Store) CountMicrovms(ctx context.Context, account string) (int, error) {
	var n int
	if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM microvms WHERE account = ? AND state != 'TERMINATED'`, account).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting microvms: %w", err)
	}
	return n, nil
}

func (s *Store) UpdateMicrovm(ctx context.Context, account, id string, from []store.MicrovmState, change func(*store.Microvm) error) (store.Microvm, error) {
	var m store.Microvm
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var err error
		m, err = getDoc[store.Microvm](ctx, tx, "microvm "+id, `SELECT data FROM microvms WHERE id = ? AND account = ?`, id, account)
		if err != nil {
			return err
		}
		if len(from) > 0 && !store.HasState(from, m.State) {
			return fmt.Errorf("microvm %s is %s: %w", id, m.State, errdefs.ErrConflict)
		}
		before := m.State
		if err := change(&m); err != nil {
			return err
		}
		if m.State != before {
			if err := insertEvent(ctx, tx, store.MicrovmEvent(m, before)); err != nil {
				return err
			}
		}
		_, err = tx.ExecContext(ctx, `UPDATE microvms SET state = ?, deadline_at = ?, suspend_deadline_at = ?, data = ? WHERE id = ? AND account = ?`,
			string(m.State), m.DeadlineAt.UnixNano(), suspendDeadline(m), mustJSON(m), id, account)
		if err != nil {
			return fmt.Errorf("updating microvm: %w", err)
		}
		return nil
	})
	return m, err
}

func (s *Store) CountMicrovmsByState(ctx context.Context) (map[store.MicrovmState]int, error) {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("read"), time.Now())
	rows, err := s.r.QueryContext(ctx, `SELECT state, COUNT(*) FROM microvms GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("counting microvms: %w", err)
	}
	defer rows.Close()
	out := map[store.MicrovmState]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, fmt.Errorf("counting microvms: %w", err)
		}
		out[store.MicrovmState(st)] = n
	}
	return out, rows.Err()
}

// gcBatch bounds one garbage-collection transaction, so that the single
// writer is never held for long.
const gcBatch = 500

func (s *Store) DeleteTerminatedMicrovms(ctx context.Context, cutoff time.Time) (int, error) {
	total := 0
	var after int64
	for {
		type row struct {
			seq int64
			m   store.Microvm
		}
		var rows []row
		err := func() error {
			rs, err := s.r.QueryContext(ctx, `SELECT seq, data FROM microvms WHERE state = 'TERMINATED' AND seq > ? ORDER BY seq LIMIT ?`, after, gcBatch)
			if err != nil {
				return err
			}
			defer rs.Close()
			for rs.Next() {
				var r row
				var data string
				if err := rs.Scan(&r.seq, &data); err != nil {
					return err
				}
				if err := json.Unmarshal([]byte(data), &r.m); err != nil {
					return fmt.Errorf("decoding microvm: %w", err)
				}
				rows = append(rows, r)
			}
			return rs.Err()
		}()
		if err != nil {
			return total, fmt.Errorf("listing terminated microvms: %w", err)
		}
		if len(rows) == 0 {
			return total, nil
		}
		after = rows[len(rows)-1].seq
		err = s.tx(ctx, func(tx *sql.Tx) error {
			for _, r := range rows {
				t := r.m.UpdatedAt
				if r.m.TerminatedAt != nil {
					t = *r.m.TerminatedAt
				}
				if !t.Before(cutoff) {
					continue
				}
				// The state is checked again inside the transaction: only
				// a record still TERMINATED goes (it is final, but this
				// keeps the promise whatever a future state machine does).
				res, err := tx.ExecContext(ctx, `DELETE FROM microvms WHERE seq = ? AND state = 'TERMINATED'`, r.seq)
				if err != nil {
					return fmt.Errorf("deleting microvm %s: %w", r.m.ID, err)
				}
				if n, _ := res.RowsAffected(); n == 0 {
					continue
				}
				if _, err := tx.ExecContext(ctx, `DELETE FROM tags WHERE account = ? AND arn = ?`, r.m.Account, r.m.ARN); err != nil {
					return fmt.Errorf("deleting tags of microvm %s: %w", r.m.ID, err)
				}
				total++
			}
			return nil
		})
		if err != nil {
			return total, err
		}
		if len(rows) < gcBatch {
			return total, nil
		}
	}
}

func (s *Store) DeleteClientTokens(ctx context.Context, cutoff time.Time) (int, error) {
	var total int64
	for {
		var n int64
		err := s.tx(ctx, func(tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `DELETE FROM client_tokens WHERE rowid IN (SELECT rowid FROM client_tokens WHERE created_at < ? LIMIT ?)`, cutoff.UnixNano(), gcBatch)
			if err != nil {
				return fmt.Errorf("deleting client tokens: %w", err)
			}
			n, _ = res.RowsAffected()
			return nil
		})
		total += n
		if err != nil || n < gcBatch {
			return int(total), err
		}
	}
}

func (s *Store) ListAllImageVersions(ctx context.Context, p store.Page) ([]store.ImageVersion, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.ImageVersion](ctx, s.r, limit, `SELECT seq, data FROM image_versions WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit+1)
}

// Tags.

func (s *Store) GetTags(ctx context.Context, account, arn string) (map[string]string, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT key, value FROM tags WHERE account = ? AND arn = ?`, account, arn)
	if err != nil {
		return nil, fmt.Errorf("reading tags: %w", err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			return nil, fmt.Errorf("reading tags: %w", err)
		}
		out[k] = v
	}
	return out, rows.Err()
}

func (s *Store) TagResource(ctx context.Context, account, arn string, tags map[string]string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		for k, v := range tags {
			if _, err := tx.ExecContext(ctx, `INSERT INTO tags (account, arn, key, value) VALUES (?, ?, ?, ?) ON CONFLICT (account, arn, key) DO UPDATE SET value = excluded.value`,
				account, arn, k, v); err != nil {
				return fmt.Errorf("tagging: %w", err)
			}
		}
		return nil
	})
}

func (s *Store) UntagResource(ctx context.Context, account, arn string, keys []string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		for _, k := range keys {
			if _, err := tx.ExecContext(ctx, `DELETE FROM tags WHERE account = ? AND arn = ? AND key = ?`, account, arn, k); err != nil {
				return fmt.Errorf("untagging: %w", err)
			}
		}
		return nil
	})
}

// Quotas.

type querier interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

// admit checks need against the account's quota inside tx.
func admit(ctx context.Context, tx *sql.Tx, account string, adm store.Admission, need store.QuotaUse) error {
	o, err := quotaOverride(ctx, tx, account)
	if err != nil {
		return err
	}
	u, err := quotaUse(ctx, tx, account)
	if err != nil {
		return err
	}
	u.StorageBytes += adm.OtherStorageBytes
	return o.Apply(adm.Defaults).Check(account, u, need)
}

func quotaUse(ctx context.Context, q querier, account string) (store.QuotaUse, error) {
	var u store.QuotaUse
	if err := q.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(SUM(json_extract(data, '$.memoryMiB')), 0), COALESCE(SUM(json_extract(data, '$.vcpus')), 0)
		FROM microvms WHERE account = ? AND state != 'TERMINATED'`, account).Scan(&u.Microvms, &u.MemoryMiB, &u.VCPUs); err != nil {
		return u, fmt.Errorf("counting microvms: %w", err)
	}
	if err := q.QueryRowContext(ctx, `SELECT COUNT(*) FROM builds WHERE account = ? AND state IN ('PENDING', 'IN_PROGRESS')`, account).Scan(&u.Builds); err != nil {
		return u, fmt.Errorf("counting builds: %w", err)
	}
	if err := q.QueryRowContext(ctx, `SELECT COALESCE(SUM(COALESCE(json_extract(data, '$.snapshotBuild.memorySnapshotSizeInBytes'), 0)
		+ COALESCE(json_extract(data, '$.snapshotBuild.diskSnapshotSizeInBytes'), 0)), 0)
		FROM builds WHERE account = ? AND state = 'SUCCESSFUL'`, account).Scan(&u.SnapshotBytes); err != nil {
		return u, fmt.Errorf("adding up snapshot sizes: %w", err)
	}
	u.StorageBytes = u.SnapshotBytes
	return u, nil
}

func quotaOverride(ctx context.Context, q querier, account string) (store.QuotaOverride, error) {
	var o store.QuotaOverride
	var data string
	err := q.QueryRowContext(ctx, `SELECT data FROM quotas WHERE account = ?`, account).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return o, nil
	}
	if err != nil {
		return o, fmt.Errorf("reading quota: %w", err)
	}
	if err := json.Unmarshal([]byte(data), &o); err != nil {
		return o, fmt.Errorf("decoding quota: %w", err)
	}
	return o, nil
}

func (s *Store) QuotaUsage(ctx context.Context, account string) (store.QuotaUse, error) {
	return quotaUse(ctx, s.r, account)
}

func (s *Store) GetQuotaOverride(ctx context.Context, account string) (store.QuotaOverride, error) {
	return quotaOverride(ctx, s.r, account)
}

func (s *Store) SetQuotaOverride(ctx context.Context, account string, o store.QuotaOverride) error {
	if o == (store.QuotaOverride{}) {
		if _, err := s.w.ExecContext(ctx, `DELETE FROM quotas WHERE account = ?`, account); err != nil {
			return fmt.Errorf("removing quota: %w", err)
		}
		return nil
	}
	if _, err := s.w.ExecContext(ctx, `INSERT INTO quotas (account, data) VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET data = excluded.data`,
		account, mustJSON(o)); err != nil {
		return fmt.Errorf("setting quota: %w", err)
	}
	return nil
}

func (s *Store) ListQuotaOverrides(ctx context.Context) (map[string]store.QuotaOverride, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT account, data FROM quotas ORDER BY account`)
	if err != nil {
		return nil, fmt.Errorf("listing quotas: %w", err)
	}
	defer rows.Close()
	out := map[string]store.QuotaOverride{}
	for rows.Next() {
		var a, data string
		if err := rows.Scan(&a, &data); err != nil {
			return nil, fmt.Errorf("listing quotas: %w", err)
		}
		var o store.QuotaOverride
		if err := json.Unmarshal([]byte(data), &o); err != nil {
			return nil, fmt.Errorf("decoding quota of %s: %w", a, err)
		}
		out[a] = o
	}
	return out, rows.Err()
}
