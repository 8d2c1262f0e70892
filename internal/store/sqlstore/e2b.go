package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// The E2B-compatible API's keys (hashed) and the sandboxes it made. A
// sandbox row goes with its microVM record (a trigger in each schema), so
// garbage collection of terminated records needs to know nothing of E2B.

func (s *Store) CreateE2BKey(ctx context.Context, k store.E2BKey) error {
	_, err := s.db.Writer().Exec(ctx, `INSERT INTO e2b_keys (hash, account, prefix, description, created_at) VALUES (?, ?, ?, ?, ?)`,
		k.Hash, k.Account, k.Prefix, s.d.Text(k.Description), k.CreatedAt.UnixNano())
	if errors.Is(err, ErrUnique) {
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
	var desc []byte
	err := s.r.QueryRow(ctx, `SELECT account, prefix, description, created_at FROM e2b_keys WHERE hash = ?`, hash).
		Scan(&k.Account, &k.Prefix, &desc, &created)
	if absent(err) {
		return k, fmt.Errorf("e2b key: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("reading e2b key: %w", err)
	}
	k.Description = string(desc)
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
	data := mustJSON(e2bSandboxData{TemplateID: sb.TemplateID, Metadata: sb.Metadata, EnvVars: sb.EnvVars,
		AllowOut: sb.AllowOut, DenyOut: sb.DenyOut, Traffic: sb.Traffic})
	_, err := s.db.Writer().Exec(ctx, `INSERT INTO e2b_sandboxes (id, account, data, created_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET data = excluded.data WHERE e2b_sandboxes.account = excluded.account`,
		sb.ID, sb.Account, data, sb.CreatedAt.UnixNano())
	if err != nil {
		return fmt.Errorf("storing e2b sandbox: %w", err)
	}
	return nil
}

func scanE2BSandbox(sc Row) (store.E2BSandbox, error) {
	var sb store.E2BSandbox
	var data string
	var created int64
	if err := sc.Scan(&sb.ID, &sb.Account, &data, &created); err != nil {
		return sb, err
	}
	d, err := decode[e2bSandboxData](data, "e2b sandbox "+sb.ID)
	if err != nil {
		return sb, err
	}
	sb.TemplateID, sb.Metadata, sb.EnvVars = d.TemplateID, d.Metadata, d.EnvVars
	sb.AllowOut, sb.DenyOut, sb.Traffic = d.AllowOut, d.DenyOut, d.Traffic
	sb.CreatedAt = time.Unix(0, created).UTC()
	return sb, nil
}

func (s *Store) GetE2BSandbox(ctx context.Context, account, id string) (store.E2BSandbox, error) {
	sb, err := scanE2BSandbox(s.r.QueryRow(ctx, `SELECT id, account, data, created_at FROM e2b_sandboxes WHERE id = ? AND account = ?`, id, account))
	if absent(err) {
		return sb, fmt.Errorf("e2b sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return sb, fmt.Errorf("reading e2b sandbox: %w", err)
	}
	return sb, nil
}

func (s *Store) ListE2BSandboxes(ctx context.Context, account string, limit int) ([]store.E2BSandbox, error) {
	rows, err := s.r.Query(ctx, `SELECT e.id, e.account, e.data, e.created_at FROM e2b_sandboxes e
		JOIN microvms m ON m.id = e.id AND m.account = e.account
		WHERE e.account = ? AND m.state != 'TERMINATED' ORDER BY e.created_at, e.id`+s.d.Collate+` LIMIT ?`, account, limit)
	if err != nil {
		return nil, fmt.Errorf("listing e2b sandboxes: %w", err)
	}
	return scanRows(rows, scanE2BSandbox)
}
