package sqlstore

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Uploaded code packages (store.Uploads): the rows of uploads name a
// package by account and hash and point at its chunks (upload_chunks,
// keyed by account, the put's random id and a sequence number). A put
// writes its chunks first, each in a transaction of its own, then the
// uploads row in one short transaction; so a reader never sees half a
// package, and a put that dies leaves only chunks no row points at.

var _ store.Uploads = (*Store)(nil)

func (s *Store) PutUpload(ctx context.Context, account, want string, size int64, body io.Reader, adm *store.Admission) (store.Upload, error) {
	if account == "" || size <= 0 {
		return store.Upload{}, fmt.Errorf("putting an upload: need an account and a positive size: %w", errdefs.ErrInvalid)
	}
	id, now := newPutID(), time.Now()
	// Whatever goes wrong below, the chunks written so far go; the
	// context may be what went wrong, so not with it.
	committed := false
	defer func() {
		if !committed {
			s.dropChunks(context.WithoutCancel(ctx), account, id)
		}
	}()
	h := sha256.New()
	n, err := s.putChunks(ctx, account, id, now, size, io.TeeReader(body, h))
	if err != nil {
		return store.Upload{}, err
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if n != size || (want != "" && sum != want) {
		return store.Upload{}, fmt.Errorf("the upload does not match its declared size (%d bytes) and SHA-256: %w", size, errdefs.ErrInvalid)
	}
	up := store.Upload{Account: account, SHA256: sum, SizeBytes: n, CreatedAt: now.UTC()}
	// A package the account already has keeps its chunks (ours go, by
	// the deferred drop); only its time is renewed.
	var kept string
	err = s.db.Write(ctx, func(q Querier) error {
		if adm != nil {
			// Checked as it is recorded: puts on other hosts of a cluster
			// that each fit cannot pass the quota together.
			need := n
			var one int
			switch err := q.QueryRow(ctx, `SELECT 1 FROM uploads WHERE account = ? AND sha256 = ?`, account, sum).Scan(&one); {
			case err == nil:
				need = 0
			case !absent(err):
				return fmt.Errorf("looking up upload: %w", err)
			}
			if err := s.admit(ctx, q, account, *adm, store.QuotaUse{StorageBytes: need}); err != nil {
				return err
			}
		}
		return q.QueryRow(ctx, `INSERT INTO uploads (account, sha256, upload_id, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (account, sha256) DO UPDATE SET created_at = excluded.created_at RETURNING upload_id`,
			account, sum, id, n, now.UnixNano()).Scan(&kept)
	})
	if err != nil {
		return store.Upload{}, fmt.Errorf("recording upload: %w", err)
	}
	committed = kept == id
	return up, nil
}

func (s *Store) dropChunks(ctx context.Context, account, id string) error {
	_, err := s.db.Writer().Exec(ctx, `DELETE FROM upload_chunks WHERE account = ? AND upload_id = ?`, account, id)
	return err
}

func newPutID() string {
	var idb [16]byte
	rand.Read(idb[:])
	return hex.EncodeToString(idb[:])
}

// putChunks writes up to size+1 bytes of body as the chunks of put id,
// each row in a transaction of its own, and returns how many bytes there
// were (more than size: the body is longer than declared). The caller
// drops the chunks if it does not record the put.
func (s *Store) putChunks(ctx context.Context, account, id string, now time.Time, size int64, body io.Reader) (int64, error) {
	buf := make([]byte, store.UploadChunkBytes)
	var n int64
	for seq := 0; ; seq++ {
		k, err := io.ReadFull(io.LimitReader(body, size-n+1), buf)
		if k > 0 {
			n += int64(k)
			if n > size {
				return n, nil
			}
			if _, werr := s.db.Writer().Exec(ctx, `INSERT INTO upload_chunks (account, upload_id, seq, data, created_at) VALUES (?, ?, ?, ?, ?)`,
				account, id, seq, buf[:k], now.UnixNano()); werr != nil {
				return n, fmt.Errorf("storing upload chunk %d: %w", seq, werr)
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return n, nil
		}
		if err != nil {
			return n, fmt.Errorf("reading upload: %w", err)
		}
	}
}

func (s *Store) OpenUpload(ctx context.Context, account, sha string) (io.ReadCloser, store.Upload, error) {
	up := store.Upload{Account: account, SHA256: sha}
	var id string
	var created int64
	err := s.r.QueryRow(ctx, `SELECT upload_id, size_bytes, created_at FROM uploads WHERE account = ? AND sha256 = ?`, account, sha).
		Scan(&id, &up.SizeBytes, &created)
	if absent(err) {
		return nil, up, fmt.Errorf("upload %s: %w", store.UploadURI(account, sha), errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, up, fmt.Errorf("reading upload: %w", err)
	}
	up.CreatedAt = time.Unix(0, created).UTC()
	return s.chunkReader(ctx, account, id, up.SizeBytes), up, nil
}

// uploadReader reads an upload's chunks in order, one query each, so that
// no transaction or connection stays open while the caller is slow.
type uploadReader struct {
	ctx         context.Context
	s           *Store
	account, id string
	seq         int
	buf         []byte
	left        int64 // bytes not yet fetched
}

func (s *Store) chunkReader(ctx context.Context, account, id string, size int64) io.ReadCloser {
	return &uploadReader{ctx: ctx, s: s, account: account, id: id, left: size}
}

func (r *uploadReader) Read(p []byte) (int, error) {
	if len(r.buf) == 0 {
		if r.left <= 0 {
			return 0, io.EOF
		}
		var data []byte
		err := r.s.r.QueryRow(r.ctx, `SELECT data FROM upload_chunks WHERE account = ? AND upload_id = ? AND seq = ?`,
			r.account, r.id, r.seq).Scan(&data)
		if absent(err) || (err == nil && (len(data) == 0 || int64(len(data)) > r.left)) {
			return 0, fmt.Errorf("upload chunk %d is missing (the upload was deleted while read?): %w", r.seq, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return 0, fmt.Errorf("reading upload chunk %d: %w", r.seq, err)
		}
		r.seq++
		r.left -= int64(len(data))
		r.buf = data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *uploadReader) Close() error { r.buf, r.left = nil, 0; return nil }

func (s *Store) TouchUpload(ctx context.Context, account, sha string, at time.Time) error {
	ok, err := s.touchChunked(ctx, "uploads", "sha256", account, sha, at)
	if err != nil {
		return fmt.Errorf("touching upload: %w", err)
	}
	if !ok {
		return fmt.Errorf("upload %s: %w", store.UploadURI(account, sha), errdefs.ErrNotFound)
	}
	return nil
}

func (s *Store) DeleteUpload(ctx context.Context, account, sha string, before time.Time) (bool, error) {
	deleted, err := s.deleteChunked(ctx, "uploads", "sha256", account, sha, before)
	if err != nil {
		return false, fmt.Errorf("deleting upload: %w", err)
	}
	return deleted, nil
}

// touchChunked and deleteChunked serve the tables whose rows point at a
// put's upload_chunks (uploads, template_files; key is the column naming
// the row within its account, both constants of this package): the time
// the touch sets is what the delete is conditional on.
func (s *Store) touchChunked(ctx context.Context, table, key, account, val string, at time.Time) (bool, error) {
	n, err := s.db.Writer().Exec(ctx, `UPDATE `+table+` SET created_at = ? WHERE account = ? AND `+key+` = ?`, at.UnixNano(), account, val)
	if err != nil && !absent(err) {
		return false, err
	}
	return n > 0, nil
}

func (s *Store) deleteChunked(ctx context.Context, table, key, account, val string, before time.Time) (bool, error) {
	deleted := false
	err := s.db.Write(ctx, func(q Querier) error {
		deleted = false
		var id string
		err := q.QueryRow(ctx, `DELETE FROM `+table+` WHERE account = ? AND `+key+` = ? AND created_at < ? RETURNING upload_id`,
			account, val, before.UnixNano()).Scan(&id)
		if absent(err) {
			return nil
		}
		if err != nil {
			return err
		}
		deleted = true
		_, err = q.Exec(ctx, `DELETE FROM upload_chunks WHERE account = ? AND upload_id = ?`, account, id)
		return err
	})
	return deleted, err
}

func (s *Store) ListUploads(ctx context.Context, account string) ([]store.Upload, error) {
	rows, err := s.r.Query(ctx, `SELECT account, sha256, size_bytes, created_at FROM uploads WHERE ? = '' OR account = ?1
		ORDER BY account`+s.d.Collate+`, sha256`+s.d.Collate, account)
	if err != nil {
		return nil, fmt.Errorf("listing uploads: %w", err)
	}
	out, err := scanRows(rows, func(r Row) (store.Upload, error) {
		var u store.Upload
		var created int64
		err := r.Scan(&u.Account, &u.SHA256, &u.SizeBytes, &created)
		u.CreatedAt = time.Unix(0, created).UTC()
		return u, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing uploads: %w", err)
	}
	return out, nil
}

func (s *Store) PruneUploadChunks(ctx context.Context, before time.Time) (int, error) {
	n, err := s.db.Writer().Exec(ctx, `DELETE FROM upload_chunks WHERE created_at < ? AND NOT EXISTS
		(SELECT 1 FROM uploads u WHERE u.account = upload_chunks.account AND u.upload_id = upload_chunks.upload_id)
		AND NOT EXISTS (SELECT 1 FROM template_files f WHERE f.account = upload_chunks.account AND f.upload_id = upload_chunks.upload_id)`, before.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("pruning upload chunks: %w", err)
	}
	return int(n), nil
}
