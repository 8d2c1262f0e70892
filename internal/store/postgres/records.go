package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Images.

func (s *Store) CreateImage(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken) error {
	return s.createImage(ctx, img, v, builds, tok, nil)
}

func (s *Store) CreateImageWithinQuota(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm store.Admission) error {
	return s.createImage(ctx, img, v, builds, tok, &adm)
}

func (s *Store) createImage(ctx context.Context, img store.Image, v store.ImageVersion, builds []store.Build, tok *store.ClientToken, adm *store.Admission) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		if adm != nil {
			if err := admit(ctx, tx, img.Account, *adm, store.QuotaUse{Builds: int64(len(builds))}); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO images (account, name, next_version, data) VALUES ($1, $2, 2, $3)`,
			img.Account, img.Name, mustJSON(img))
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

// snapshotBytes is what a build's snapshots hold, summed by the quota.
func snapshotBytes(b store.Build) int64 {
	var n int64
	if b.State == store.BuildSuccessful && b.Snapshot != nil {
		if p := b.Snapshot.MemorySnapshotSizeInBytes; p != nil {
			n += *p
		}
		if p := b.Snapshot.DiskSnapshotSizeInBytes; p != nil {
			n += *p
		}
	}
	return n
}

func insertVersion(ctx context.Context, tx pgx.Tx, v store.ImageVersion, builds []store.Build) error {
	_, err := tx.Exec(ctx, `INSERT INTO image_versions (account, image, version, data) VALUES ($1, $2, $3, $4)`,
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
		_, err := tx.Exec(ctx, `INSERT INTO builds (build_id, account, image, version, state, snapshot_bytes, data) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
			b.ID, b.Account, b.ImageName, b.Version, b.State, snapshotBytes(b), mustJSON(b))
		if isUnique(err) {
			return fmt.Errorf("build %s exists: %w", b.ID, errdefs.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("creating build: %w", err)
		}
	}
	return nil
}

func (s *Store) GetImage(ctx context.Context, account, name string) (store.Image, error) {
	return getDoc[store.Image](ctx, s.pool, "image "+name, `SELECT data FROM images WHERE account = $1 AND name = $2`, account, name)
}

func (s *Store) ListImages(ctx context.Context, account, nameFilter string, p store.Page) ([]store.Image, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.Image](ctx, s.pool, limit,
		`SELECT seq, data FROM images WHERE account = $1 AND seq > $2 AND strpos(name, $3) > 0 ORDER BY seq LIMIT $4`,
		account, after, nameFilter, limit+1)
}

func (s *Store) UpdateImage(ctx context.Context, img store.Image) error {
	tag, err := s.pool.Exec(ctx, `UPDATE images SET data = $1 WHERE account = $2 AND name = $3`, mustJSON(img), img.Account, img.Name)
	return affected(tag, err, "image "+img.Name)
}

func (s *Store) DeleteImage(ctx context.Context, account, name string) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		img, err := getDoc[store.Image](ctx, tx, "image "+name, `SELECT data FROM images WHERE account = $1 AND name = $2 FOR UPDATE`, account, name)
		if err != nil {
			return err
		}
		if err := deletedVersionEvents(ctx, tx, account, name, "", "DeleteMicrovmImage"); err != nil {
			return err
		}
		for _, q := range []string{
			`DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = $1 AND image = $2)`,
			`DELETE FROM builds WHERE account = $1 AND image = $2`,
			`DELETE FROM image_versions WHERE account = $1 AND image = $2`,
			`DELETE FROM images WHERE account = $1 AND name = $2`,
		} {
			if _, err := tx.Exec(ctx, q, account, name); err != nil {
				return fmt.Errorf("deleting image: %w", err)
			}
		}
		if _, err := tx.Exec(ctx, `DELETE FROM tags WHERE account = $1 AND arn = $2`, account, img.ARN); err != nil {
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
	// A retried transaction starts again from what the caller passed.
	in, inBuilds := v, append([]store.Build(nil), builds...)
	err := s.tx(ctx, func(tx pgx.Tx) error {
		v = in
		copy(builds, inBuilds)
		if adm != nil {
			if err := admit(ctx, tx, v.Account, *adm, store.QuotaUse{Builds: int64(len(builds))}); err != nil {
				return err
			}
		}
		var next int64
		var data string
		// FOR UPDATE: concurrent new versions of one image number in turn.
		err := tx.QueryRow(ctx, `SELECT next_version, data FROM images WHERE account = $1 AND name = $2 FOR UPDATE`, v.Account, v.ImageName).Scan(&next, &data)
		if errors.Is(err, pgx.ErrNoRows) || strings.HasPrefix(pgCode(err), "22") {
			return fmt.Errorf("image %s: %w", v.ImageName, errdefs.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("reading image: %w", err)
		}
		img, err := decode[store.Image](data, "image")
		if err != nil {
			return err
		}
		v.Version = store.VersionName(next)
		for i := range builds {
			builds[i].Version = v.Version
		}
		img.State = store.ImageUpdating
		img.LatestVersion = v.Version
		img.UpdatedAt = v.CreatedAt
		if _, err := tx.Exec(ctx, `UPDATE images SET next_version = $1, data = $2 WHERE account = $3 AND name = $4`,
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
	return getDoc[store.ImageVersion](ctx, s.pool, "image version "+image+":"+version,
		`SELECT data FROM image_versions WHERE account = $1 AND image = $2 AND version = $3`, account, image, version)
}

func (s *Store) ListImageVersions(ctx context.Context, account, image string, p store.Page) ([]store.ImageVersion, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.ImageVersion](ctx, s.pool, limit,
		`SELECT seq, data FROM image_versions WHERE account = $1 AND image = $2 AND seq > $3 ORDER BY seq LIMIT $4`,
		account, image, after, limit+1)
}

func (s *Store) UpdateImageVersion(ctx context.Context, v store.ImageVersion) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		what := "image version " + v.ImageName + ":" + v.Version
		old, err := getDoc[store.ImageVersion](ctx, tx, what, `SELECT data FROM image_versions WHERE account = $1 AND image = $2 AND version = $3 FOR UPDATE`,
			v.Account, v.ImageName, v.Version)
		if err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE image_versions SET data = $1 WHERE account = $2 AND image = $3 AND version = $4`,
			mustJSON(v), v.Account, v.ImageName, v.Version)
		if err := affected(tag, err, what); err != nil {
			return err
		}
		if old.State != v.State {
			return insertEvent(ctx, tx, store.VersionEvent(v, old.State))
		}
		return nil
	})
}

func (s *Store) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := deletedVersionEvents(ctx, tx, account, image, version, "DeleteMicrovmImageVersion"); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM image_versions WHERE account = $1 AND image = $2 AND version = $3`, account, image, version)
		if err := affected(tag, err, "image version "+image+":"+version); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = $1 AND image = $2 AND version = $3)`, account, image, version); err != nil {
			return fmt.Errorf("deleting build logs: %w", err)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM builds WHERE account = $1 AND image = $2 AND version = $3`, account, image, version); err != nil {
			return fmt.Errorf("deleting builds: %w", err)
		}
		return nil
	})
}

// Builds.

func (s *Store) GetBuild(ctx context.Context, account, image, version, buildID string) (store.Build, error) {
	return getDoc[store.Build](ctx, s.pool, "build "+buildID,
		`SELECT data FROM builds WHERE account = $1 AND image = $2 AND version = $3 AND build_id = $4`, account, image, version, buildID)
}

func (s *Store) ListBuilds(ctx context.Context, account, image, version string, p store.Page) ([]store.Build, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.Build](ctx, s.pool, limit,
		`SELECT seq, data FROM builds WHERE account = $1 AND image = $2 AND version = $3 AND seq > $4 ORDER BY seq LIMIT $5`,
		account, image, version, after, limit+1)
}

func (s *Store) ListBuildsInState(ctx context.Context, states ...string) ([]store.Build, error) {
	if len(states) == 0 {
		return nil, nil
	}
	out, _, err := page[store.Build](ctx, s.pool, 1<<30, `SELECT seq, data FROM builds WHERE state = ANY($1) ORDER BY seq`, states)
	return out, err
}

func (s *Store) UpdateBuild(ctx context.Context, b store.Build) error {
	tag, err := s.pool.Exec(ctx, `UPDATE builds SET state = $1, snapshot_bytes = $2, data = $3 WHERE build_id = $4 AND account = $5`,
		b.State, snapshotBytes(b), mustJSON(b), b.ID, b.Account)
	return affected(tag, err, "build "+b.ID)
}

func (s *Store) FinishBuild(ctx context.Context, b store.Build) (bool, error) {
	finalised := false
	err := s.tx(ctx, func(tx pgx.Tx) error {
		finalised = false
		what := "image version " + b.ImageName + ":" + b.Version
		// The version's row lock serialises the finishes of its builds:
		// the last one, whichever process runs it, reads the others final
		// (READ COMMITTED reads what committed before the lock was had).
		v, err := getDoc[store.ImageVersion](ctx, tx, what, `SELECT data FROM image_versions WHERE account = $1 AND image = $2 AND version = $3 FOR UPDATE`,
			b.Account, b.ImageName, b.Version)
		if errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("build %s: %w", b.ID, errdefs.ErrNotFound)
		}
		if err != nil {
			return err
		}
		old, err := getDoc[store.Build](ctx, tx, "build "+b.ID, `SELECT data FROM builds WHERE build_id = $1 AND account = $2 FOR UPDATE`, b.ID, b.Account)
		if err != nil {
			return err
		}
		if store.BuildFinal(old.State) {
			return fmt.Errorf("build %s is %s already: %w", b.ID, old.State, errdefs.ErrConflict)
		}
		if _, err := tx.Exec(ctx, `UPDATE builds SET state = $1, snapshot_bytes = $2, data = $3 WHERE build_id = $4 AND account = $5`,
			b.State, snapshotBytes(b), mustJSON(b), b.ID, b.Account); err != nil {
			return fmt.Errorf("updating build %s: %w", b.ID, err)
		}
		builds, err := docs[store.Build](ctx, tx, `SELECT data FROM builds WHERE account = $1 AND image = $2 AND version = $3 ORDER BY seq`, b.Account, b.ImageName, b.Version)
		if err != nil {
			return err
		}
		img, err := getDoc[store.Image](ctx, tx, "image "+b.ImageName, `SELECT data FROM images WHERE account = $1 AND name = $2 FOR UPDATE`, b.Account, b.ImageName)
		if err != nil {
			return err
		}
		before := v.State
		if !store.FinishVersion(builds, &v, &img, b.UpdatedAt) {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE image_versions SET data = $1 WHERE account = $2 AND image = $3 AND version = $4`,
			mustJSON(v), v.Account, v.ImageName, v.Version); err != nil {
			return fmt.Errorf("updating %s: %w", what, err)
		}
		if before != v.State {
			if err := insertEvent(ctx, tx, store.VersionEvent(v, before)); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE images SET data = $1 WHERE account = $2 AND name = $3`, mustJSON(img), img.Account, img.Name); err != nil {
			return fmt.Errorf("updating image %s: %w", img.Name, err)
		}
		finalised = true
		return nil
	})
	return finalised, err
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

func (s *Store) ReadBuildLog(ctx context.Context, buildID string, offset int64, limit int) ([]byte, error) {
	rows, err := s.pool.Query(ctx, `SELECT chunk FROM build_logs WHERE build_id = $1 ORDER BY seq`, buildID)
	if err != nil {
		return nil, fmt.Errorf("reading build log: %w", wrap(err))
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

func suspendDeadline(m store.Microvm) *int64 {
	if m.SuspendDeadlineAt == nil {
		return nil
	}
	n := m.SuspendDeadlineAt.UnixNano()
	return &n
}

func (s *Store) CreateMicrovm(ctx context.Context, m store.Microvm, tok *store.ClientToken) error {
	return s.tx(ctx, func(tx pgx.Tx) error { return insertMicrovm(ctx, tx, m, tok) })
}

func (s *Store) CreateMicrovmWithinQuota(ctx context.Context, m store.Microvm, tok *store.ClientToken, adm store.Admission) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := admit(ctx, tx, m.Account, adm, store.QuotaUse{Microvms: 1, MemoryMiB: m.MemoryMiB, VCPUs: m.VCPUs}); err != nil {
			return err
		}
		return insertMicrovm(ctx, tx, m, tok)
	})
}

func insertMicrovm(ctx context.Context, tx pgx.Tx, m store.Microvm, tok *store.ClientToken) error {
	_, err := tx.Exec(ctx, `INSERT INTO microvms (id, account, state, image, version, deadline_at, suspend_deadline_at, memory_mib, vcpus, data)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		m.ID, m.Account, string(m.State), m.ImageName, m.ImageVersion, m.DeadlineAt.UnixNano(), suspendDeadline(m), m.MemoryMiB, m.VCPUs, mustJSON(m))
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

func (s *Store) GetMicrovm(ctx context.Context, account, id string) (store.Microvm, error) {
	return getDoc[store.Microvm](ctx, s.pool, "microvm "+id, `SELECT data FROM microvms WHERE id = $1 AND account = $2`, id, account)
}

// args numbers query parameters as they are added.
type args []any

func (a *args) add(v any) string {
	*a = append(*a, v)
	return "$" + strconv.Itoa(len(*a))
}

func (s *Store) ListMicrovms(ctx context.Context, account string, f store.MicrovmFilter, p store.Page) ([]store.Microvm, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	var a args
	q := `SELECT seq, data FROM microvms WHERE account = ` + a.add(account) + ` AND seq > ` + a.add(after)
	if f.ImageName != "" {
		q += ` AND image = ` + a.add(f.ImageName)
	}
	if f.ImageVersion != "" {
		q += ` AND version = ` + a.add(f.ImageVersion)
	}
	if len(f.States) > 0 {
		q += ` AND state = ANY(` + a.add(stateNames(f.States)) + `)`
	}
	q += ` ORDER BY seq LIMIT ` + a.add(limit+1)
	return page[store.Microvm](ctx, s.pool, limit, q, a...)
}

func stateNames(states []store.MicrovmState) []string {
	out := make([]string, len(states))
	for i, st := range states {
		out[i] = string(st)
	}
	return out
}

func (s *Store) ListMicrovmsInState(ctx context.Context, limit int, states ...store.MicrovmState) ([]store.Microvm, error) {
	if len(states) == 0 {
		return nil, nil
	}
	if limit <= 0 {
		limit = 1 << 30
	}
	out, _, err := page[store.Microvm](ctx, s.pool, limit, `SELECT seq, data FROM microvms WHERE state = ANY($1) ORDER BY seq LIMIT $2`,
		stateNames(states), limit+1)
	return out, err
}

func (s *Store) ListMicrovmsDue(ctx context.Context, now time.Time, limit int) ([]store.Microvm, error) {
	if limit <= 0 {
		limit = 1000
	}
	out, _, err := page[store.Microvm](ctx, s.pool, limit,
		`SELECT seq, data FROM microvms WHERE state NOT IN ('TERMINATED', 'TERMINATING') AND deadline_at <= $1
		 UNION SELECT seq, data FROM microvms WHERE state = 'SUSPENDED' AND suspend_deadline_at <= $1
		 ORDER BY seq LIMIT $2`, now.UnixNano(), limit+1)
	return out, err
}

func (s *Store) CountMicrovms(ctx context.Context, account string) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM microvms WHERE account = $1 AND state != 'TERMINATED'`, account).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting microvms: %w", wrap(err))
	}
	return n, nil
}

func (s *Store) UpdateMicrovm(ctx context.Context, account, id string, from []store.MicrovmState, change func(*store.Microvm) error) (store.Microvm, error) {
	var m store.Microvm
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		// FOR UPDATE makes the read, the check and the write one
		// compare-and-set against every other process.
		m, err = getDoc[store.Microvm](ctx, tx, "microvm "+id, `SELECT data FROM microvms WHERE id = $1 AND account = $2 FOR UPDATE`, id, account)
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
		_, err = tx.Exec(ctx, `UPDATE microvms SET state = $1, deadline_at = $2, suspend_deadline_at = $3, memory_mib = $4, vcpus = $5, data = $6 WHERE id = $7 AND account = $8`,
			string(m.State), m.DeadlineAt.UnixNano(), suspendDeadline(m), m.MemoryMiB, m.VCPUs, mustJSON(m), id, account)
		if err != nil {
			return fmt.Errorf("updating microvm: %w", err)
		}
		return nil
	})
	return m, err
}

func (s *Store) CountMicrovmsByState(ctx context.Context) (map[store.MicrovmState]int, error) {
	rows, err := s.pool.Query(ctx, `SELECT state, COUNT(*) FROM microvms GROUP BY state`)
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

// gcBatch bounds one garbage-collection transaction.
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
		rs, err := s.pool.Query(ctx, `SELECT seq, data FROM microvms WHERE state = 'TERMINATED' AND seq > $1 ORDER BY seq LIMIT $2`, after, gcBatch)
		if err != nil {
			return total, fmt.Errorf("listing terminated microvms: %w", err)
		}
		for rs.Next() {
			var r row
			var data string
			if err := rs.Scan(&r.seq, &data); err != nil {
				rs.Close()
				return total, fmt.Errorf("listing terminated microvms: %w", err)
			}
			if r.m, err = decode[store.Microvm](data, "microvm"); err != nil {
				rs.Close()
				return total, err
			}
			rows = append(rows, r)
		}
		rs.Close()
		if err := rs.Err(); err != nil {
			return total, fmt.Errorf("listing terminated microvms: %w", err)
		}
		if len(rows) == 0 {
			return total, nil
		}
		after = rows[len(rows)-1].seq
		n := 0
		err = s.tx(ctx, func(tx pgx.Tx) error {
			n = 0
			for _, r := range rows {
				t := r.m.UpdatedAt
				if r.m.TerminatedAt != nil {
					t = *r.m.TerminatedAt
				}
				if !t.Before(cutoff) {
					continue
				}
				// Only a record still TERMINATED goes.
				tag, err := tx.Exec(ctx, `DELETE FROM microvms WHERE seq = $1 AND state = 'TERMINATED'`, r.seq)
				if err != nil {
					return fmt.Errorf("deleting microvm %s: %w", r.m.ID, err)
				}
				if tag.RowsAffected() == 0 {
					continue
				}
				if _, err := tx.Exec(ctx, `DELETE FROM tags WHERE account = $1 AND arn = $2`, r.m.Account, r.m.ARN); err != nil {
					return fmt.Errorf("deleting tags of microvm %s: %w", r.m.ID, err)
				}
				n++
			}
			return nil
		})
		if err != nil {
			return total, err
		}
		total += n
		if len(rows) < gcBatch {
			return total, nil
		}
	}
}

func (s *Store) DeleteClientTokens(ctx context.Context, cutoff time.Time) (int, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, `DELETE FROM client_tokens WHERE ctid IN (SELECT ctid FROM client_tokens WHERE created_at < $1 LIMIT $2)`,
			cutoff.UnixNano(), gcBatch)
		if err != nil {
			return int(total), fmt.Errorf("deleting client tokens: %w", err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < gcBatch {
			return int(total), nil
		}
	}
}

func (s *Store) ListAllImageVersions(ctx context.Context, p store.Page) ([]store.ImageVersion, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	return page[store.ImageVersion](ctx, s.pool, limit, `SELECT seq, data FROM image_versions WHERE seq > $1 ORDER BY seq LIMIT $2`, after, limit+1)
}

// Tags.

func (s *Store) GetTags(ctx context.Context, account, arn string) (map[string]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT key, value FROM tags WHERE account = $1 AND arn = $2`, account, arn)
	if err != nil {
		return nil, fmt.Errorf("reading tags: %w", wrap(err))
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var k, v []byte
		if err := rows.Scan(&k, &v); err != nil {
			return nil, fmt.Errorf("reading tags: %w", err)
		}
		out[string(k)] = string(v)
	}
	return out, rows.Err()
}

func (s *Store) TagResource(ctx context.Context, account, arn string, tags map[string]string) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		for k, v := range tags {
			if _, err := tx.Exec(ctx, `INSERT INTO tags (account, arn, key, value) VALUES ($1, $2, $3, $4) ON CONFLICT (account, arn, key) DO UPDATE SET value = excluded.value`,
				account, arn, []byte(k), []byte(v)); err != nil {
				return fmt.Errorf("tagging: %w", err)
			}
		}
		return nil
	})
}

func (s *Store) UntagResource(ctx context.Context, account, arn string, keys []string) error {
	bs := make([][]byte, len(keys))
	for i, k := range keys {
		bs[i] = []byte(k)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM tags WHERE account = $1 AND arn = $2 AND key = ANY($3)`, account, arn, bs); err != nil {
		return fmt.Errorf("untagging: %w", wrap(err))
	}
	return nil
}

// Quotas.

// admit checks need against the account's quota inside tx. The advisory
// lock, held to the end of tx, makes admissions of one account take turns:
// each counts after the one before committed its insert.
func admit(ctx context.Context, tx pgx.Tx, account string, adm store.Admission, need store.QuotaUse) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, lockQuota, account); err != nil {
		return fmt.Errorf("locking the quota of %s: %w", account, err)
	}
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

func quotaUse(ctx context.Context, db q, account string) (store.QuotaUse, error) {
	var u store.QuotaUse
	if err := db.QueryRow(ctx, `SELECT COUNT(*), COALESCE(SUM(memory_mib), 0)::bigint, COALESCE(SUM(vcpus), 0)::bigint
		FROM microvms WHERE account = $1 AND state != 'TERMINATED'`, account).Scan(&u.Microvms, &u.MemoryMiB, &u.VCPUs); err != nil {
		return u, fmt.Errorf("counting microvms: %w", wrap(err))
	}
	if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM builds WHERE account = $1 AND state IN ('PENDING', 'IN_PROGRESS')`, account).Scan(&u.Builds); err != nil {
		return u, fmt.Errorf("counting builds: %w", err)
	}
	if err := db.QueryRow(ctx, `SELECT COALESCE(SUM(snapshot_bytes), 0)::bigint FROM builds WHERE account = $1 AND state = 'SUCCESSFUL'`, account).Scan(&u.SnapshotBytes); err != nil {
		return u, fmt.Errorf("adding up snapshot sizes: %w", err)
	}
	u.StorageBytes = u.SnapshotBytes
	return u, nil
}

func quotaOverride(ctx context.Context, db q, account string) (store.QuotaOverride, error) {
	var data string
	err := db.QueryRow(ctx, `SELECT data FROM quotas WHERE account = $1`, account).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.QuotaOverride{}, nil
	}
	if err != nil {
		return store.QuotaOverride{}, fmt.Errorf("reading quota: %w", wrap(err))
	}
	return decode[store.QuotaOverride](data, "quota")
}

func decode[T any](data, what string) (T, error) {
	var v T
	if err := json.Unmarshal([]byte(data), &v); err != nil {
		return v, fmt.Errorf("decoding %s: %w", what, err)
	}
	return v, nil
}

func (s *Store) QuotaUsage(ctx context.Context, account string) (store.QuotaUse, error) {
	return quotaUse(ctx, s.pool, account)
}

func (s *Store) GetQuotaOverride(ctx context.Context, account string) (store.QuotaOverride, error) {
	return quotaOverride(ctx, s.pool, account)
}

func (s *Store) SetQuotaOverride(ctx context.Context, account string, o store.QuotaOverride) error {
	if o == (store.QuotaOverride{}) {
		if _, err := s.pool.Exec(ctx, `DELETE FROM quotas WHERE account = $1`, account); err != nil {
			return fmt.Errorf("removing quota: %w", wrap(err))
		}
		return nil
	}
	if _, err := s.pool.Exec(ctx, `INSERT INTO quotas (account, data) VALUES ($1, $2) ON CONFLICT (account) DO UPDATE SET data = excluded.data`,
		account, mustJSON(o)); err != nil {
		return fmt.Errorf("setting quota: %w", wrap(err))
	}
	return nil
}

func (s *Store) ListQuotaOverrides(ctx context.Context) (map[string]store.QuotaOverride, error) {
	rows, err := s.pool.Query(ctx, `SELECT account, data FROM quotas`)
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
		o, err := decode[store.QuotaOverride](data, "quota of "+a)
		if err != nil {
			return nil, err
		}
		out[a] = o
	}
	return out, rows.Err()
}
