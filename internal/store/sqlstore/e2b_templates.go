package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// What the E2B API adds to templates and snapshots: every replica of a
// control plane reads the same. Each query names the account, so a
// tenant reaches only its own rows; the rows of an image go with its
// record (a trigger in each schema).

// Tags.

func (s *Store) AssignE2BTags(ctx context.Context, account, template string, tags []string, buildID, version string, at time.Time) error {
	return s.db.Write(ctx, func(tx Querier) error {
		// Two assignments that each fit must not pass the bound together.
		if err := s.takeTurns(ctx, tx, account+"/e2b-tags/"+template); err != nil {
			return err
		}
		for _, t := range tags {
			if _, err := tx.Exec(ctx, `INSERT INTO e2b_tags (account, template, tag, build_id, version, created_at) VALUES (?, ?, ?, ?, ?, ?)
				ON CONFLICT (account, template, tag) DO UPDATE SET build_id = excluded.build_id, version = excluded.version, created_at = excluded.created_at`,
				account, template, t, buildID, version, at.UnixNano()); err != nil {
				return fmt.Errorf("assigning tag %q: %w", t, err)
			}
		}
		var n int
		if err := tx.QueryRow(ctx, `SELECT COUNT(*) FROM e2b_tags WHERE account = ? AND template = ?`, account, template).Scan(&n); err != nil {
			return fmt.Errorf("counting tags: %w", err)
		}
		if n > store.MaxE2BTags {
			return fmt.Errorf("template %s would have %d tags; kiln keeps at most %d per template: remove some: %w",
				template, n, store.MaxE2BTags, errdefs.ErrExhausted)
		}
		return nil
	})
}

func (s *Store) RemoveE2BTags(ctx context.Context, account, template string, tags []string) error {
	return s.db.Write(ctx, func(tx Querier) error {
		for _, t := range tags {
			n, err := tx.Exec(ctx, `DELETE FROM e2b_tags WHERE account = ? AND template = ? AND tag = ?`, account, template, t)
			if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
				return fmt.Errorf("removing tag %q: %w", t, err)
			}
			if err != nil || n == 0 {
				return fmt.Errorf("template %s has no tag %q: %w", template, t, errdefs.ErrNotFound)
			}
		}
		return nil
	})
}

func scanE2BTag(sc Row) (store.E2BTag, error) {
	var t store.E2BTag
	var created int64
	err := sc.Scan(&t.Tag, &t.BuildID, &t.Version, &created)
	t.CreatedAt = time.Unix(0, created).UTC()
	return t, err
}

func (s *Store) GetE2BTag(ctx context.Context, account, template, tag string) (store.E2BTag, error) {
	t, err := scanE2BTag(s.r.QueryRow(ctx, `SELECT tag, build_id, version, created_at FROM e2b_tags WHERE account = ? AND template = ? AND tag = ?`,
		account, template, tag))
	if absent(err) {
		return t, fmt.Errorf("tag %q of template %s: %w", tag, template, errdefs.ErrNotFound)
	}
	if err != nil {
		return t, fmt.Errorf("reading tag: %w", err)
	}
	return t, nil
}

func (s *Store) ListE2BTags(ctx context.Context, account, template string) ([]store.E2BTag, error) {
	rows, err := s.r.Query(ctx, `SELECT tag, build_id, version, created_at FROM e2b_tags WHERE account = ? AND template = ? ORDER BY tag`+s.d.Collate+` LIMIT ?`,
		account, template, store.MaxE2BTags+1)
	if absent(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing tags: %w", err)
	}
	tags, err := scanRows(rows, scanE2BTag)
	if err != nil {
		return nil, fmt.Errorf("scanning tags: %w", err)
	}
	return tags, nil
}

// Builds.

// e2bBuildData is the JSON of a build row (the rest are columns).
type e2bBuildData struct {
	Tags     []string `json:"tags,omitempty"`
	MemoryMB int64    `json:"memoryMB,omitempty"`
	CPUCount int64    `json:"cpuCount,omitempty"`
}

const e2bBuildColumns = `account, id, template, version, data, created_at`

func scanE2BBuild(sc Row) (store.E2BBuild, error) {
	var b store.E2BBuild
	var data string
	var created int64
	if err := sc.Scan(&b.Account, &b.ID, &b.Template, &b.Version, &data, &created); err != nil {
		return b, err
	}
	d, err := decode[e2bBuildData](data, "e2b build "+b.ID)
	b.Tags, b.MemoryMB, b.CPUCount = d.Tags, d.MemoryMB, d.CPUCount
	b.CreatedAt = time.Unix(0, created).UTC()
	return b, err
}

func (s *Store) CreateE2BBuild(ctx context.Context, b store.E2BBuild) error {
	_, err := s.db.Writer().Exec(ctx, `INSERT INTO e2b_builds (`+e2bBuildColumns+`) VALUES (?, ?, ?, ?, ?, ?)`,
		b.Account, b.ID, b.Template, b.Version, mustJSON(e2bBuildData{Tags: b.Tags, MemoryMB: b.MemoryMB, CPUCount: b.CPUCount}), b.CreatedAt.UnixNano())
	if errors.Is(err, ErrUnique) {
		return fmt.Errorf("e2b build %s: %w", b.ID, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("storing e2b build: %w", err)
	}
	return nil
}

func (s *Store) e2bBuild(ctx context.Context, what, where string, args ...any) (store.E2BBuild, error) {
	b, err := scanE2BBuild(s.r.QueryRow(ctx, `SELECT `+e2bBuildColumns+` FROM e2b_builds WHERE `+where, args...))
	if absent(err) {
		return b, fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	if err != nil {
		return b, fmt.Errorf("reading %s: %w", what, err)
	}
	return b, nil
}

func (s *Store) GetE2BBuild(ctx context.Context, account, id string) (store.E2BBuild, error) {
	return s.e2bBuild(ctx, "e2b build "+id, `account = ? AND id = ?`, account, id)
}

func (s *Store) StartE2BBuild(ctx context.Context, account, id, version string) error {
	if version == "" {
		return fmt.Errorf("starting e2b build %s: no image version: %w", id, errdefs.ErrInvalid)
	}
	n, err := s.db.Writer().Exec(ctx, `UPDATE e2b_builds SET version = ? WHERE account = ? AND id = ? AND version = ''`, version, account, id)
	if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("starting e2b build %s: %w", id, err)
	}
	if err == nil && n == 1 {
		return nil
	}
	b, err := s.GetE2BBuild(ctx, account, id)
	if err != nil {
		return err
	}
	return fmt.Errorf("e2b build %s was started already (image version %s): %w", id, b.Version, errdefs.ErrConflict)
}

func (s *Store) E2BBuildOfVersion(ctx context.Context, account, template, version string) (store.E2BBuild, error) {
	what := "e2b build of " + template + ":" + version
	if version == "" {
		return store.E2BBuild{}, fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	return s.e2bBuild(ctx, what, `account = ? AND template = ? AND version = ? ORDER BY created_at DESC LIMIT 1`, account, template, version)
}

// Snapshots.

// e2bSnapshotData is the JSON of a snapshot row.
type e2bSnapshotData struct {
	TemplateID string            `json:"templateId"`
	EnvVars    map[string]string `json:"envVars,omitempty"`
}

func (s *Store) PutE2BSnapshot(ctx context.Context, sn store.E2BSnapshot) error {
	_, err := s.db.Writer().Exec(ctx, `INSERT INTO e2b_snapshots (account, name, sandbox_id, data, created_at) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (account, name) DO UPDATE SET sandbox_id = excluded.sandbox_id, data = excluded.data, created_at = excluded.created_at`,
		sn.Account, sn.Name, sn.SandboxID, mustJSON(e2bSnapshotData{TemplateID: sn.TemplateID, EnvVars: sn.EnvVars}), sn.CreatedAt.UnixNano())
	if err != nil {
		return fmt.Errorf("storing e2b snapshot %s: %w", sn.Name, err)
	}
	return nil
}

// e2bSnapshotSelect reads the snapshots whose image exists: an image
// deleted while its record was being written leaves no snapshot behind.
const e2bSnapshotSelect = `SELECT s.account, s.name, s.sandbox_id, s.data, s.created_at FROM e2b_snapshots s
	JOIN images i ON i.account = s.account AND i.name = s.name WHERE s.account = ?`

func scanE2BSnapshot(sc Row) (store.E2BSnapshot, error) {
	var sn store.E2BSnapshot
	var data string
	var created int64
	if err := sc.Scan(&sn.Account, &sn.Name, &sn.SandboxID, &data, &created); err != nil {
		return sn, err
	}
	d, err := decode[e2bSnapshotData](data, "e2b snapshot "+sn.Name)
	sn.TemplateID, sn.EnvVars = d.TemplateID, d.EnvVars
	sn.CreatedAt = time.Unix(0, created).UTC()
	return sn, err
}

func (s *Store) GetE2BSnapshot(ctx context.Context, account, name string) (store.E2BSnapshot, error) {
	sn, err := scanE2BSnapshot(s.r.QueryRow(ctx, e2bSnapshotSelect+` AND s.name = ?`, account, name))
	if absent(err) {
		return sn, fmt.Errorf("e2b snapshot %s: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return sn, fmt.Errorf("reading e2b snapshot: %w", err)
	}
	return sn, nil
}

func (s *Store) ListE2BSnapshots(ctx context.Context, account string, q store.E2BSnapshotQuery) ([]store.E2BSnapshot, error) {
	query, args := e2bSnapshotSelect, []any{account}
	if q.SandboxID != "" {
		query, args = query+` AND s.sandbox_id = ?`, append(args, q.SandboxID)
	}
	if q.Name != "" {
		query, args = query+` AND s.name = ?`, append(args, q.Name)
	}
	if q.After != "" {
		var at int64
		err := s.r.QueryRow(ctx, `SELECT created_at FROM e2b_snapshots WHERE account = ? AND name = ?`, account, q.After).Scan(&at)
		if absent(err) {
			// A page after a snapshot that is gone is empty, as E2B's.
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading e2b snapshot %s: %w", q.After, err)
		}
		query += ` AND (s.created_at > ? OR (s.created_at = ? AND s.name` + s.d.Collate + ` > ?))`
		args = append(args, at, at, q.After)
	}
	rows, err := s.r.Query(ctx, query+` ORDER BY s.created_at, s.name`+s.d.Collate+` LIMIT ?`, append(args, q.Limit)...)
	if absent(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing e2b snapshots: %w", err)
	}
	return scanRows(rows, scanE2BSnapshot)
}

func (s *Store) DeleteE2BSnapshot(ctx context.Context, account, name string) error {
	_, err := s.db.Writer().Exec(ctx, `DELETE FROM e2b_snapshots WHERE account = ? AND name = ?`, account, name)
	if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("deleting e2b snapshot %s: %w", name, err)
	}
	return nil
}
