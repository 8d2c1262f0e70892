package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

var _ store.E2BStore = (*Store)(nil)

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

func (s *Store) CreateE2BKey(ctx context.Context, k store.E2BKey) error {
	_, err := s.w.ExecContext(ctx, `INSERT INTO e2b_keys (hash, account, prefix, description, created_at) VALUES (?, ?, ?, ?, ?)`,
		k.Hash, k.Account, k.Prefix, k.Description, k.CreatedAt.UnixNano())
	if isUnique(err) {
		return fmt.Errorf("e2b key: %w", errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("storing e2b key: %w", err)
	}
	return nil
}

func (s *Store) GetE2BKey(ctx context.Context, hash string) (store.E2BKey, error) {
	k := store.E2BKey{Hash: hash}
	var created int64
	err := s.r.QueryRowContext(ctx, `SELECT account, prefix, description, created_at FROM e2b_keys WHERE hash = ?`, hash).
		Scan(&k.Account, &k.Prefix, &k.Description, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("e2b key: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("reading e2b key: %w", err)
	}
	k.CreatedAt = time.Unix(0, created).UTC()
	return k, nil
}

// e2bSandboxData is the JSON of a sandbox row.
type e2bSandboxData struct {
	TemplateID string            `json:"templateId"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	EnvVars    map[string]string `json:"envVars,omitempty"`
	AllowOut   []string          `json:"allowOut,omitempty"`
	DenyOut    []string          `json:"denyOut,omitempty"`
	Traffic    string            `json:"traffic,omitempty"`
}

func (s *Store) PutE2BSandbox(ctx context.Context, sb store.E2BSandbox) error {
	b, err := json.Marshal(e2bSandboxData{TemplateID: sb.TemplateID, Metadata: sb.Metadata, EnvVars: sb.EnvVars,
		AllowOut: sb.AllowOut, DenyOut: sb.DenyOut, Traffic: sb.Traffic})
	if err != nil {
		return err
	}
	_, err = s.w.ExecContext(ctx, `INSERT INTO e2b_sandboxes (id, account, data, created_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET data = excluded.data WHERE account = excluded.account`,
		sb.ID, sb.Account, string(b), sb.CreatedAt.UnixNano())
	if err != nil {
		return fmt.Errorf("storing e2b sandbox: %w", err)
	}
	return nil
}

func scanE2BSandbox(sc interface{ Scan(...any) error }) (store.E2BSandbox, error) {
	var sb store.E2BSandbox
	var data string
	var created int64
	if err := sc.Scan(&sb.ID, &sb.Account, &data, &created); err != nil {
		return sb, err
	}
	var d e2bSandboxData
	if err := json.Unmarshal([]byte(data), &d); err != nil {
		return sb, fmt.Errorf("decoding e2b sandbox %s: %w", sb.ID, err)
	}
	sb.TemplateID, sb.Metadata, sb.EnvVars = d.TemplateID, d.Metadata, d.EnvVars
	sb.AllowOut, sb.DenyOut, sb.Traffic = d.AllowOut, d.DenyOut, d.Traffic
	sb.CreatedAt = time.Unix(0, created).UTC()
	return sb, nil
}

func (s *Store) GetE2BSandbox(ctx context.Context, account, id string) (store.E2BSandbox, error) {
	sb, err := scanE2BSandbox(s.r.QueryRowContext(ctx, `SELECT id, account, data, created_at FROM e2b_sandboxes WHERE id = ? AND account = ?`, id, account))
	if errors.Is(err, sql.ErrNoRows) {
		return sb, fmt.Errorf("e2b sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return sb, fmt.Errorf("reading e2b sandbox: %w", err)
	}
	return sb, nil
}

func (s *Store) ListE2BSandboxes(ctx context.Context, account string, limit int) ([]store.E2BSandbox, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT e.id, e.account, e.data, e.created_at FROM e2b_sandboxes e
		JOIN microvms m ON m.id = e.id AND m.account = e.account
		WHERE e.account = ? AND m.state != 'TERMINATED' ORDER BY e.created_at, e.id LIMIT ?`, account, limit)
	if err != nil {
		return nil, fmt.Errorf("listing e2b sandboxes: %w", err)
	}
	defer rows.Close()
	var out []store.E2BSandbox
	for rows.Next() {
		sb, err := scanE2BSandbox(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, sb)
	}
	return out, rows.Err()
}
