package sqlstore

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// E2B template files (store.TemplateFiles): a template_files row per
// account and SDK hash points at its chunks in upload_chunks, written as
// an upload's are (chunks first, then the row), so PruneUploadChunks
// clears the chunks of puts that died here too.

var _ store.TemplateFiles = (*Store)(nil)

func (s *Store) PutTemplateFile(ctx context.Context, account, hash string, size int64, body io.Reader, max int64) (store.TemplateFile, error) {
	if account == "" || hash == "" || size <= 0 {
		return store.TemplateFile{}, fmt.Errorf("putting template files: need an account, a hash and a positive size: %w", errdefs.ErrInvalid)
	}
	id, now := newPutID(), time.Now()
	committed := false
	defer func() {
		if !committed {
			s.dropChunks(context.WithoutCancel(ctx), account, id)
		}
	}()
	n, err := s.putChunks(ctx, account, id, now, size, body)
	if err != nil {
		return store.TemplateFile{}, err
	}
	if n != size {
		return store.TemplateFile{}, fmt.Errorf("the template files do not match their declared size (%d bytes): %w", size, errdefs.ErrInvalid)
	}
	// The new put replaces the old one, whose chunks go in the same
	// transaction so that nothing is left for the prune to find.
	err = s.db.Write(ctx, func(q Querier) error {
		var old string
		err := q.QueryRow(ctx, `SELECT upload_id FROM template_files WHERE account = ? AND hash = ?`, account, hash).Scan(&old)
		if err != nil && !absent(err) {
			return err
		}
		if max > 0 {
			if err := s.takeTurns(ctx, q, account+"/template-files"); err != nil {
				return err
			}
			var others int64
			if err := q.QueryRow(ctx, `SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM template_files WHERE account = ? AND hash != ?`, account, hash).Scan(&others); err != nil {
				return err
			}
			if others+n > max {
				return &store.TemplateFilesFullError{Kept: others, Need: n, Max: max}
			}
		}
		if _, err := q.Exec(ctx, `INSERT INTO template_files (account, hash, upload_id, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (account, hash) DO UPDATE SET upload_id = excluded.upload_id, size_bytes = excluded.size_bytes, created_at = excluded.created_at`,
			account, hash, id, n, now.UnixNano()); err != nil {
			return err
		}
		if old == "" {
			return nil
		}
		_, err = q.Exec(ctx, `DELETE FROM upload_chunks WHERE account = ? AND upload_id = ?`, account, old)
		return err
	})
	if err != nil {
		return store.TemplateFile{}, fmt.Errorf("recording template files: %w", err)
	}
	committed = true
	return store.TemplateFile{Account: account, Hash: hash, SizeBytes: n, CreatedAt: now.UTC()}, nil
}

func (s *Store) OpenTemplateFile(ctx context.Context, account, hash string) (io.ReadCloser, store.TemplateFile, error) {
	f := store.TemplateFile{Account: account, Hash: hash}
	var id string
	var created int64
	err := s.r.QueryRow(ctx, `SELECT upload_id, size_bytes, created_at FROM template_files WHERE account = ? AND hash = ?`, account, hash).
		Scan(&id, &f.SizeBytes, &created)
	if absent(err) {
		return nil, f, fmt.Errorf("template files %s of account %s: %w", hash, account, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, f, fmt.Errorf("reading template files: %w", err)
	}
	f.CreatedAt = time.Unix(0, created).UTC()
	return s.chunkReader(ctx, account, id, f.SizeBytes), f, nil
}

func (s *Store) TouchTemplateFile(ctx context.Context, account, hash string, at time.Time) error {
	ok, err := s.touchChunked(ctx, "template_files", "hash", account, hash, at)
	if err != nil {
		return fmt.Errorf("touching template files: %w", err)
	}
	if !ok {
		return fmt.Errorf("template files %s of account %s: %w", hash, account, errdefs.ErrNotFound)
	}
	return nil
}

func (s *Store) DeleteTemplateFile(ctx context.Context, account, hash string, before time.Time) (bool, error) {
	deleted, err := s.deleteChunked(ctx, "template_files", "hash", account, hash, before)
	if err != nil {
		return false, fmt.Errorf("deleting template files: %w", err)
	}
	return deleted, nil
}

func (s *Store) ListTemplateFiles(ctx context.Context, account string) ([]store.TemplateFile, error) {
	rows, err := s.r.Query(ctx, `SELECT account, hash, size_bytes, created_at FROM template_files WHERE ? = '' OR account = ?1
		ORDER BY account`+s.d.Collate+`, hash`+s.d.Collate, account)
	if err != nil {
		return nil, fmt.Errorf("listing template files: %w", err)
	}
	out, err := scanRows(rows, func(r Row) (store.TemplateFile, error) {
		var f store.TemplateFile
		var created int64
		err := r.Scan(&f.Account, &f.Hash, &f.SizeBytes, &created)
		f.CreatedAt = time.Unix(0, created).UTC()
		return f, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing template files: %w", err)
	}
	return out, nil
}
