// Package sqlstore is the query layer the SQL stores share: every query
// and row scan of store.Store is written here once, over a small interface
// (DB) that each backend implements on its own driver, and a Dialect that
// names what their SQL spells differently. internal/store/sqlite and
// internal/store/postgres keep only their connections, transactions,
// migrations and the few calls that really differ (AppendBuildLog's
// durability setting).
//
// Queries use ? placeholders (or ?N to use a parameter twice); a backend
// whose driver wants another form rewrites them (postgres: $N). Both
// schemas have the same tables and columns: each record is a JSON
// document next to the few columns that are queried, times are Unix
// nanoseconds, and list pages are positions in an identity column.
//
// Transactions: DB.Write runs a function in one write transaction, which
// a backend may run again from the start (PostgreSQL retries serialisation
// failures), so every function given to it starts from its inputs.
// SQLite has one writer (BEGIN IMMEDIATE), so nothing can run between a
// read and a write of one transaction; PostgreSQL runs at READ COMMITTED
// and takes the locks that stand for it: the rows read and rewritten
// (Dialect.ForUpdate), an advisory lock on the account for quota
// admission (Dialect.LockAccount) and one for placement (Dialect.LockCluster).
package sqlstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
)

// Errors a backend's Querier wraps its driver's errors in, so that the
// shared code tells them apart without knowing the driver. A value the
// database refuses (PostgreSQL's class 22: a NUL or a byte that is not
// UTF-8 in a text column, a number out of range) is wrapped in
// errdefs.ErrInvalid.
var (
	// ErrNoRows: Row.Scan found no row.
	ErrNoRows = errors.New("no rows")
	// ErrUnique: an insert or update broke a unique constraint.
	ErrUnique = errors.New("unique constraint violated")
)

// Marker wraps a driver's errors in the ones the shared code tells apart.
type Marker struct {
	// NoRows and Unique recognise the driver's "no row" and "unique
	// constraint violated".
	NoRows, Unique func(error) bool
	// Other, when not nil, marks any other error (PostgreSQL: a refused
	// value as errdefs.ErrInvalid).
	Other func(error) error
}

// Mark returns err wrapped in ErrNoRows or ErrUnique where it is one, as
// Other makes it otherwise; nil stays nil.
func (m Marker) Mark(err error) error {
	switch {
	case err == nil:
		return nil
	case m.NoRows(err):
		return fmt.Errorf("%w: %w", err, ErrNoRows)
	case m.Unique(err):
		return fmt.Errorf("%w: %w", err, ErrUnique)
	case m.Other != nil:
		return m.Other(err)
	}
	return err
}

// Row returns r with its Scan errors marked.
func (m Marker) Row(r Row) Row { return markedRow{r, m} }

type markedRow struct {
	r Row
	m Marker
}

func (r markedRow) Scan(dest ...any) error { return r.m.Mark(r.r.Scan(dest...)) }

// Row is one row of QueryRow.
type Row interface {
	Scan(dest ...any) error
}

// Rows is the result of Query; Close may be called more than once.
type Rows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close()
}

// scanRows reads every row of a query with scan, and closes them; what
// a query error means (absent tables, say) stays the caller's.
func scanRows[T any](rows Rows, scan func(Row) (T, error)) ([]T, error) {
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Querier runs statements, on a connection pool or in a transaction.
type Querier interface {
	// Exec runs a statement and returns the number of rows it changed.
	Exec(ctx context.Context, query string, args ...any) (int64, error)
	Query(ctx context.Context, query string, args ...any) (Rows, error)
	QueryRow(ctx context.Context, query string, args ...any) Row
}

// DB is what a backend gives the shared queries.
type DB interface {
	// Reader runs reads outside a transaction.
	Reader() Querier
	// Writer runs single-statement writes outside a transaction
	// (autocommit).
	Writer() Querier
	// Write runs fn in one write transaction and commits it if fn returns
	// nil. It may run fn again from the start (a retried transaction).
	Write(ctx context.Context, fn func(Querier) error) error
}

// Dialect names what the backends' SQL spells differently.
type Dialect struct {
	// Text turns free text a tenant controls (tags, event reasons, key
	// descriptions, settings) into the parameter its column takes: bytea
	// on PostgreSQL, whose text refuses NUL and bytes that are not UTF-8.
	// Nil: the string as it is. Such columns are scanned into []byte.
	Text func(string) any
	// ForUpdate follows a SELECT whose rows the transaction rewrites
	// (" FOR UPDATE"); empty where the transaction holds the only writer.
	ForUpdate string
	// LockAccount, when not empty, is run with the account as its one
	// parameter at the start of a quota admission, to make admissions of
	// one account take turns (and with "ACCOUNT/e2b-tags/TEMPLATE" at the
	// start of a tag assignment, to keep a template's tags bounded).
	LockAccount string
	// LockCluster, when not empty, is run (without parameters) at the
	// start of a placement or a node expiry, to make them take turns: a
	// placement counts what every one before it committed, and no
	// microVM is placed on a node while it is being declared lost.
	LockCluster string
	// Strpos is the function that returns the position of its second
	// argument in its first (0 when absent).
	Strpos string
	// Greatest and Least are the scalar maximum and minimum of two values.
	Greatest, Least string
	// RowID names a row's physical identity (bounded batch deletes).
	RowID string
	// Collate follows an ORDER BY term of text to order it by bytes.
	Collate string
	// True is the literal of a true boolean column value.
	True string
	// PlainSecrets accepts access key secrets stored in clear (an older
	// kiln's rows, sealed by the next Open); otherwise they are an error.
	PlainSecrets bool
}

// Store implements store.Store (AppendBuildLog and Close aside, which the
// backend adds) and store.E2BStore on a DB.
type Store struct {
	db     DB
	r      Querier
	d      Dialect
	sealer *seal.Sealer
}

// New returns the shared store over db. Secret access keys are sealed with
// sealer.
func New(db DB, d Dialect, sealer *seal.Sealer) *Store {
	if d.Text == nil {
		d.Text = func(s string) any { return s }
	}
	return &Store{db: db, r: db.Reader(), d: d, sealer: sealer}
}

var _ store.E2BStore = (*Store)(nil)

// Placeholders returns n comma-separated ? placeholders (an IN list).
func Placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?,", n), ",")
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own plain structs are marshalled here.
		panic(fmt.Sprintf("marshalling record: %v", err))
	}
	return string(b)
}

func decode[T any](data, what string) (T, error) {
	var v T
	if err := json.Unmarshal([]byte(data), &v); err != nil {
		return v, fmt.Errorf("decoding %s: %w", what, err)
	}
	return v, nil
}

// absent reports whether a lookup found nothing: no row, or a key the
// database cannot hold (a NUL in a name matches no record).
func absent(err error) bool {
	return errors.Is(err, ErrNoRows) || errors.Is(err, errdefs.ErrInvalid)
}

// page runs a query that selects (seq, data) ordered by seq and limited to
// limit+1 rows, decodes the documents and computes the next token.
func page[T any](ctx context.Context, db Querier, limit int, query string, args ...any) ([]T, string, error) {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("list"), time.Now())
	rows, err := db.Query(ctx, query, args...)
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
		v, err := decode[T](data, "record")
		if err != nil {
			return nil, "", err
		}
		out = append(out, v)
		last = seq
	}
	if err := rows.Err(); err != nil {
		return nil, "", fmt.Errorf("listing: %w", err)
	}
	return out, next, nil
}

// pageAfter is page over a query ending in "seq > ? ORDER BY seq LIMIT ?":
// it decodes p's token and appends its position and the limit to args.
func pageAfter[T any](ctx context.Context, db Querier, p store.Page, query string, args ...any) ([]T, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[T](ctx, db, limit, query, append(args, after, limit+1)...)
}

// getDoc reads one document; ErrNotFound if no row matches. timed: a read
// of its own (inside a transaction, the transaction is timed as a whole).
func getDoc[T any](ctx context.Context, db Querier, timed bool, what, query string, args ...any) (T, error) {
	if timed {
		defer metrics.Since(metrics.StoreOps.WithLabelValues("read"), time.Now())
	}
	var v T
	var data string
	if err := db.QueryRow(ctx, query, args...).Scan(&data); err != nil {
		if absent(err) {
			return v, fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
		}
		return v, fmt.Errorf("reading %s: %w", what, err)
	}
	return decode[T](data, what)
}

// docs decodes every document (data only) a query selects.
func docs[T any](ctx context.Context, db Querier, query string, args ...any) ([]T, error) {
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
		v, err := decode[T](data, "record")
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// affected turns an update that matched no row into ErrNotFound.
func affected(n int64, err error, what string) error {
	if err != nil {
		return fmt.Errorf("updating %s: %w", what, err)
	}
	if n == 0 {
		return fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	return nil
}

func insertToken(ctx context.Context, tx Querier, tok *store.ClientToken) error {
	if tok == nil {
		return nil
	}
	_, err := tx.Exec(ctx, `INSERT INTO client_tokens (account, operation, token, input_hash, resource_id, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
		tok.Account, tok.Operation, tok.Token, tok.InputHash, tok.ResourceID, tok.CreatedAt.UnixNano())
	if errors.Is(err, ErrUnique) {
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
	_, err = s.db.Writer().Exec(ctx, `INSERT INTO access_keys (id, secret, account, description, created_at) VALUES (?, ?, ?, ?, ?)`,
		k.ID, sealed, k.Account, s.d.Text(k.Description), k.CreatedAt.UnixNano())
	if errors.Is(err, ErrUnique) {
		return fmt.Errorf("access key %s exists: %w", k.ID, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating access key: %w", err)
	}
	return nil
}

const keyColumns = `id, secret, account, description, created_at`

func (s *Store) scanKey(sc Row) (store.AccessKey, error) {
	var k store.AccessKey
	var created int64
	var desc []byte
	if err := sc.Scan(&k.ID, &k.Secret, &k.Account, &desc, &created); err != nil {
		return k, err
	}
	k.Description = string(desc)
	k.CreatedAt = time.Unix(0, created).UTC()
	if s.d.PlainSecrets && !seal.IsSealed(k.Secret) {
		// A row written in clear by an older kiln that is still running
		// beside this one is read as it is; the next Open seals it.
		return k, nil
	}
	sec, err := s.sealer.Open(k.Secret, k.ID)
	if err != nil {
		return store.AccessKey{}, fmt.Errorf("access key %s: %w", k.ID, err)
	}
	k.Secret = sec
	return k, nil
}

func (s *Store) GetAccessKey(ctx context.Context, id string) (store.AccessKey, error) {
	k, err := s.scanKey(s.r.QueryRow(ctx, `SELECT `+keyColumns+` FROM access_keys WHERE id = ?`, id))
	if absent(err) {
		return k, fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("reading access key: %w", err)
	}
	return k, nil
}

func (s *Store) ListAccessKeys(ctx context.Context) ([]store.AccessKey, error) {
	rows, err := s.r.Query(ctx, `SELECT `+keyColumns+` FROM access_keys ORDER BY created_at, id`+s.d.Collate)
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
	n, err := s.db.Writer().Exec(ctx, `DELETE FROM access_keys WHERE id = ?`, id)
	if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("deleting access key: %w", err)
	}
	if err != nil || n == 0 {
		return fmt.Errorf("access key %s: %w", id, errdefs.ErrNotFound)
	}
	return nil
}

// Settings.

func (s *Store) GetSetting(ctx context.Context, name string) (string, error) {
	var v []byte
	err := s.r.QueryRow(ctx, `SELECT value FROM settings WHERE name = ?`, name).Scan(&v)
	if errors.Is(err, ErrNoRows) {
		return "", fmt.Errorf("setting %s: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("reading setting %s: %w", name, err)
	}
	return string(v), nil
}

func (s *Store) SetSetting(ctx context.Context, name, value string) error {
	if _, err := s.db.Writer().Exec(ctx, `INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value`,
		name, s.d.Text(value)); err != nil {
		return fmt.Errorf("writing setting %s: %w", name, err)
	}
	return nil
}

// Client tokens.

func (s *Store) GetClientToken(ctx context.Context, account, operation, token string) (store.ClientToken, error) {
	t := store.ClientToken{Account: account, Operation: operation, Token: token}
	var created int64
	err := s.r.QueryRow(ctx, `SELECT input_hash, resource_id, created_at FROM client_tokens WHERE account = ? AND operation = ? AND token = ?`,
		account, operation, token).Scan(&t.InputHash, &t.ResourceID, &created)
	if absent(err) {
		return t, fmt.Errorf("client token: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return t, fmt.Errorf("reading client token: %w", err)
	}
	t.CreatedAt = time.Unix(0, created).UTC()
	return t, nil
}

func (s *Store) DeleteClientTokens(ctx context.Context, cutoff time.Time) (int, error) {
	var total int64
	for {
		n, err := s.db.Writer().Exec(ctx, `DELETE FROM client_tokens WHERE `+s.d.RowID+` IN (SELECT `+s.d.RowID+` FROM client_tokens WHERE created_at < ? LIMIT ?)`,
			cutoff.UnixNano(), gcBatch)
		if err != nil {
			return int(total), fmt.Errorf("deleting client tokens: %w", err)
		}
		total += n
		if n < gcBatch {
			return int(total), nil
		}
	}
}

// gcBatch bounds one garbage-collection transaction, so that SQLite's
// single writer is never held for long.
const gcBatch = 500
