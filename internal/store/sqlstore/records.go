package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
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
	return s.db.Write(ctx, func(tx Querier) error {
		if adm != nil {
			if err := s.admit(ctx, tx, img.Account, *adm, needOf(builds)); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO images (account, name, next_version, data) VALUES (?, ?, 2, ?)`,
			img.Account, img.Name, mustJSON(img))
		if errors.Is(err, ErrUnique) {
			return fmt.Errorf("image %s exists: %w", img.Name, errdefs.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("creating image: %w", err)
		}
		if err := s.insertVersion(ctx, tx, v, builds); err != nil {
			return err
		}
		return insertToken(ctx, tx, tok)
	})
}

// needOf is what inserting builds takes of the account's quota: a build
// to run, or the storage of one recorded finished already (a snapshot).
func needOf(builds []store.Build) store.QuotaUse {
	var n store.QuotaUse
	for _, b := range builds {
		if !store.BuildFinal(b.State) {
			n.Builds++
		}
		n.StorageBytes += snapshotBytes(b)
	}
	return n
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

func (s *Store) insertVersion(ctx context.Context, tx Querier, v store.ImageVersion, builds []store.Build) error {
	_, err := tx.Exec(ctx, `INSERT INTO image_versions (account, image, version, data) VALUES (?, ?, ?, ?)`,
		v.Account, v.ImageName, v.Version, mustJSON(v))
	if errors.Is(err, ErrUnique) {
		return fmt.Errorf("image version %s:%s exists: %w", v.ImageName, v.Version, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating image version: %w", err)
	}
	if err := s.insertEvent(ctx, tx, store.VersionEvent(v, "")); err != nil {
		return err
	}
	for _, b := range builds {
		_, err := tx.Exec(ctx, `INSERT INTO builds (build_id, account, image, version, state, snapshot_bytes, data) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			b.ID, b.Account, b.ImageName, b.Version, b.State, snapshotBytes(b), mustJSON(b))
		if errors.Is(err, ErrUnique) {
			return fmt.Errorf("build %s exists: %w", b.ID, errdefs.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("creating build: %w", err)
		}
	}
	return nil
}

func (s *Store) GetImage(ctx context.Context, account, name string) (store.Image, error) {
	return getDoc[store.Image](ctx, s.r, true, "image "+name, `SELECT data FROM images WHERE account = ? AND name = ?`, account, name)
}

func (s *Store) ListImages(ctx context.Context, account, nameFilter string, p store.Page) ([]store.Image, string, error) {
	return pageAfter[store.Image](ctx, s.r, p,
		`SELECT seq, data FROM images WHERE account = ? AND `+s.d.Strpos+`(name, ?) > 0 AND seq > ? ORDER BY seq LIMIT ?`,
		account, nameFilter)
}

func (s *Store) DeleteImage(ctx context.Context, account, name string) error {
	return s.db.Write(ctx, func(tx Querier) error {
		img, err := getDoc[store.Image](ctx, tx, false, "image "+name, `SELECT data FROM images WHERE account = ? AND name = ?`+s.d.ForUpdate, account, name)
		if err != nil {
			return err
		}
		if err := s.deletedVersionEvents(ctx, tx, account, name, "", "DeleteMicrovmImage"); err != nil {
			return err
		}
		for _, q := range []string{
			`DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = ?1 AND image = ?2)`,
			`DELETE FROM builds WHERE account = ?1 AND image = ?2`,
			`DELETE FROM image_versions WHERE account = ?1 AND image = ?2`,
			`DELETE FROM images WHERE account = ?1 AND name = ?2`,
		} {
			if _, err := tx.Exec(ctx, q, account, name); err != nil {
				return fmt.Errorf("deleting image: %w", err)
			}
		}
		if _, err := tx.Exec(ctx, `DELETE FROM tags WHERE account = ? AND arn = ?`, account, img.ARN); err != nil {
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
	err := s.db.Write(ctx, func(tx Querier) error {
		v = in
		copy(builds, inBuilds)
		if adm != nil {
			if err := s.admit(ctx, tx, v.Account, *adm, needOf(builds)); err != nil {
				return err
			}
		}
		var next int64
		var data string
		// Locked: concurrent new versions of one image number in turn.
		err := tx.QueryRow(ctx, `SELECT next_version, data FROM images WHERE account = ? AND name = ?`+s.d.ForUpdate, v.Account, v.ImageName).Scan(&next, &data)
		if absent(err) {
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
		if _, err := tx.Exec(ctx, `UPDATE images SET next_version = ?, data = ? WHERE account = ? AND name = ?`,
			next+1, mustJSON(img), v.Account, v.ImageName); err != nil {
			return fmt.Errorf("updating image: %w", err)
		}
		if tok != nil {
			tok.ResourceID = v.ImageName + ":" + v.Version
		}
		if err := s.insertVersion(ctx, tx, v, builds); err != nil {
			return err
		}
		return insertToken(ctx, tx, tok)
	})
	return v, builds, err
}

const versionWhere = ` FROM image_versions WHERE account = ? AND image = ? AND version = ?`

func (s *Store) GetImageVersion(ctx context.Context, account, image, version string) (store.ImageVersion, error) {
	return getDoc[store.ImageVersion](ctx, s.r, true, "image version "+image+":"+version, `SELECT data`+versionWhere, account, image, version)
}

func (s *Store) ListImageVersions(ctx context.Context, account, image string, p store.Page) ([]store.ImageVersion, string, error) {
	return pageAfter[store.ImageVersion](ctx, s.r, p,
		`SELECT seq, data FROM image_versions WHERE account = ? AND image = ? AND seq > ? ORDER BY seq LIMIT ?`, account, image)
}

func (s *Store) UpdateImageVersion(ctx context.Context, v store.ImageVersion) error {
	return s.db.Write(ctx, func(tx Querier) error {
		what := "image version " + v.ImageName + ":" + v.Version
		old, err := getDoc[store.ImageVersion](ctx, tx, false, what, `SELECT data`+versionWhere+s.d.ForUpdate, v.Account, v.ImageName, v.Version)
		if err != nil {
			return err
		}
		n, err := tx.Exec(ctx, `UPDATE image_versions SET data = ? WHERE account = ? AND image = ? AND version = ?`,
			mustJSON(v), v.Account, v.ImageName, v.Version)
		if err := affected(n, err, what); err != nil {
			return err
		}
		if old.State != v.State {
			if err := s.insertEvent(ctx, tx, store.VersionEvent(v, old.State)); err != nil {
				return err
			}
		}
		return s.refreshImage(ctx, tx, v.Account, v.ImageName, "", v.UpdatedAt)
	})
}

// refreshImage brings an image's record in line with its versions in the
// transaction that changed them: latestActiveImageVersion is the newest
// version both SUCCESSFUL and ACTIVE, an image building a version that is
// final now takes its outcome, and an image still building the version
// deletedVersion (deleted in this transaction) has failed, since that
// build will report nothing. Doing it here, under the image's row
// lock, keeps a concurrent FinishBuild from being undone by a record read
// before it.
func (s *Store) refreshImage(ctx context.Context, tx Querier, account, image, deletedVersion string, now time.Time) error {
	img, err := getDoc[store.Image](ctx, tx, false, "image "+image, `SELECT data FROM images WHERE account = ? AND name = ?`+s.d.ForUpdate, account, image)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	vs, err := docs[store.ImageVersion](ctx, tx, `SELECT data FROM image_versions WHERE account = ? AND image = ? ORDER BY seq`, account, image)
	if err != nil {
		return err
	}
	before := img
	img.LatestActiveVersion = ""
	for _, v := range vs {
		if v.State == store.VersionSuccessful && v.Status == store.VersionActive {
			img.LatestActiveVersion = v.Version
		}
		// A building image whose latest version became final without
		// builds (a snapshot's copy) has its outcome.
		final := v.State == store.VersionSuccessful || v.State == store.VersionFailed
		if final && v.Version == img.LatestVersion && (img.State == store.ImageCreating || img.State == store.ImageUpdating) {
			store.SettleImage(&img, v)
		}
	}
	if deletedVersion != "" && img.LatestVersion == deletedVersion {
		switch img.State {
		case store.ImageCreating:
			img.State = store.ImageCreateFailed
		case store.ImageUpdating:
			img.State = store.ImageUpdateFailed
		}
	}
	if img.LatestActiveVersion == before.LatestActiveVersion && img.State == before.State {
		return nil
	}
	img.UpdatedAt = now.UTC()
	if _, err := tx.Exec(ctx, `UPDATE images SET data = ? WHERE account = ? AND name = ?`, mustJSON(img), img.Account, img.Name); err != nil {
		return fmt.Errorf("updating image %s: %w", img.Name, err)
	}
	return nil
}

func (s *Store) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	return s.db.Write(ctx, func(tx Querier) error {
		if err := s.deletedVersionEvents(ctx, tx, account, image, version, "DeleteMicrovmImageVersion"); err != nil {
			return err
		}
		n, err := tx.Exec(ctx, `DELETE`+versionWhere, account, image, version)
		if err := affected(n, err, "image version "+image+":"+version); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM build_logs WHERE build_id IN (SELECT build_id FROM builds WHERE account = ? AND image = ? AND version = ?)`, account, image, version); err != nil {
			return fmt.Errorf("deleting build logs: %w", err)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM builds WHERE account = ? AND image = ? AND version = ?`, account, image, version); err != nil {
			return fmt.Errorf("deleting builds: %w", err)
		}
		return s.refreshImage(ctx, tx, account, image, version, time.Now())
	})
}

func (s *Store) ListAllImageVersions(ctx context.Context, p store.Page) ([]store.ImageVersion, string, error) {
	return pageAfter[store.ImageVersion](ctx, s.r, p, `SELECT seq, data FROM image_versions WHERE seq > ? ORDER BY seq LIMIT ?`)
}

// Builds.

func (s *Store) GetBuild(ctx context.Context, account, image, version, buildID string) (store.Build, error) {
	return getDoc[store.Build](ctx, s.r, true, "build "+buildID,
		`SELECT data FROM builds WHERE account = ? AND image = ? AND version = ? AND build_id = ?`, account, image, version, buildID)
}

func (s *Store) ListBuilds(ctx context.Context, account, image, version string, p store.Page) ([]store.Build, string, error) {
	return pageAfter[store.Build](ctx, s.r, p,
		`SELECT seq, data FROM builds WHERE account = ? AND image = ? AND version = ? AND seq > ? ORDER BY seq LIMIT ?`, account, image, version)
}

func (s *Store) ListBuildsInState(ctx context.Context, states ...string) ([]store.Build, error) {
	if len(states) == 0 {
		return nil, nil
	}
	args := make([]any, len(states))
	for i, st := range states {
		args[i] = st
	}
	out, _, err := page[store.Build](ctx, s.r, 1<<30, `SELECT seq, data FROM builds WHERE state IN (`+Placeholders(len(states))+`) ORDER BY seq`, args...)
	return out, err
}

const updateBuild = `UPDATE builds SET state = ?, snapshot_bytes = ?, data = ? WHERE build_id = ? AND account = ?`

func (s *Store) UpdateBuild(ctx context.Context, b store.Build) error {
	n, err := s.db.Writer().Exec(ctx, updateBuild, b.State, snapshotBytes(b), mustJSON(b), b.ID, b.Account)
	return affected(n, err, "build "+b.ID)
}

// writeBuild records b in tx unless the stored build is final already
// (ErrConflict), and returns its version, read for update. The version's
// row lock, taken first, serialises the starts and finishes of its
// builds: the last finish, whichever process runs it, reads the others
// final (READ COMMITTED reads what committed before the lock was had).
func (s *Store) writeBuild(ctx context.Context, tx Querier, b store.Build) (store.ImageVersion, error) {
	v, err := getDoc[store.ImageVersion](ctx, tx, false, "image version "+b.ImageName+":"+b.Version, `SELECT data`+versionWhere+s.d.ForUpdate,
		b.Account, b.ImageName, b.Version)
	if errors.Is(err, errdefs.ErrNotFound) {
		return v, fmt.Errorf("build %s: %w", b.ID, errdefs.ErrNotFound)
	}
	if err != nil {
		return v, err
	}
	old, err := getDoc[store.Build](ctx, tx, false, "build "+b.ID, `SELECT data FROM builds WHERE build_id = ? AND account = ?`+s.d.ForUpdate, b.ID, b.Account)
	if err != nil {
		return v, err
	}
	if store.BuildFinal(old.State) {
		return v, fmt.Errorf("build %s is %s already: %w", b.ID, old.State, errdefs.ErrConflict)
	}
	if _, err := tx.Exec(ctx, updateBuild, b.State, snapshotBytes(b), mustJSON(b), b.ID, b.Account); err != nil {
		return v, fmt.Errorf("updating build %s: %w", b.ID, err)
	}
	return v, nil
}

func (s *Store) StartBuild(ctx context.Context, b store.Build) error {
	b.State = store.BuildInProgress
	return s.db.Write(ctx, func(tx Querier) error {
		v, err := s.writeBuild(ctx, tx, b)
		if err != nil {
			return err
		}
		if v.State != store.VersionPending {
			return nil
		}
		v.State, v.UpdatedAt = store.VersionInProgress, b.UpdatedAt
		if _, err := tx.Exec(ctx, `UPDATE image_versions SET data = ? WHERE account = ? AND image = ? AND version = ?`,
			mustJSON(v), v.Account, v.ImageName, v.Version); err != nil {
			return fmt.Errorf("updating image version %s:%s: %w", v.ImageName, v.Version, err)
		}
		return s.insertEvent(ctx, tx, store.VersionEvent(v, store.VersionPending))
	})
}

func (s *Store) FinishBuild(ctx context.Context, b store.Build) (bool, error) {
	finalised := false
	err := s.db.Write(ctx, func(tx Querier) error {
		finalised = false
		what := "image version " + b.ImageName + ":" + b.Version
		v, err := s.writeBuild(ctx, tx, b)
		if err != nil {
			return err
		}
		builds, err := docs[store.Build](ctx, tx, `SELECT data FROM builds WHERE account = ? AND image = ? AND version = ? ORDER BY seq`, b.Account, b.ImageName, b.Version)
		if err != nil {
			return err
		}
		img, err := getDoc[store.Image](ctx, tx, false, "image "+b.ImageName, `SELECT data FROM images WHERE account = ? AND name = ?`+s.d.ForUpdate, b.Account, b.ImageName)
		if err != nil {
			return err
		}
		before := v.State
		if !store.FinishVersion(builds, &v, &img, b.UpdatedAt) {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE image_versions SET data = ? WHERE account = ? AND image = ? AND version = ?`,
			mustJSON(v), v.Account, v.ImageName, v.Version); err != nil {
			return fmt.Errorf("updating %s: %w", what, err)
		}
		if before != v.State {
			if err := s.insertEvent(ctx, tx, store.VersionEvent(v, before)); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE images SET data = ? WHERE account = ? AND name = ?`, mustJSON(img), img.Account, img.Name); err != nil {
			return fmt.Errorf("updating image %s: %w", img.Name, err)
		}
		finalised = true
		return nil
	})
	return finalised, err
}

func (s *Store) ReadBuildLog(ctx context.Context, buildID string, offset int64, limit int) ([]byte, error) {
	rows, err := s.r.Query(ctx, `SELECT chunk FROM build_logs WHERE build_id = ? ORDER BY seq`, buildID)
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
	return s.db.Write(ctx, func(tx Querier) error { return s.insertMicrovm(ctx, tx, m, tok) })
}

func (s *Store) CreateMicrovmWithinQuota(ctx context.Context, m store.Microvm, tok *store.ClientToken, adm store.Admission) error {
	return s.db.Write(ctx, func(tx Querier) error {
		if err := s.admit(ctx, tx, m.Account, adm, store.QuotaUse{Microvms: 1, MemoryMiB: m.MemoryMiB, VCPUs: m.VCPUs}); err != nil {
			return err
		}
		return s.insertMicrovm(ctx, tx, m, tok)
	})
}

func (s *Store) insertMicrovm(ctx context.Context, tx Querier, m store.Microvm, tok *store.ClientToken) error {
	_, err := tx.Exec(ctx, `INSERT INTO microvms (id, account, state, image, version, deadline_at, suspend_deadline_at, memory_mib, vcpus, node, data)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		m.ID, m.Account, string(m.State), m.ImageName, m.ImageVersion, m.DeadlineAt.UnixNano(), suspendDeadline(m), m.MemoryMiB, m.VCPUs, m.Node, mustJSON(m))
	if errors.Is(err, ErrUnique) {
		return fmt.Errorf("microvm %s exists: %w", m.ID, errdefs.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating microvm: %w", err)
	}
	if err := s.insertEvent(ctx, tx, store.CreatedMicrovmEvent(m)); err != nil {
		return err
	}
	return insertToken(ctx, tx, tok)
}

func (s *Store) GetMicrovm(ctx context.Context, account, id string) (store.Microvm, error) {
	return getDoc[store.Microvm](ctx, s.r, true, "microvm "+id, `SELECT data FROM microvms WHERE id = ? AND account = ?`, id, account)
}

// stateArgs returns the states as query arguments (an IN list).
func stateArgs[S ~string](states []S) []any {
	out := make([]any, len(states))
	for i, st := range states {
		out[i] = string(st)
	}
	return out
}

func (s *Store) ListMicrovms(ctx context.Context, account string, f store.MicrovmFilter, p store.Page) ([]store.Microvm, string, error) {
	q := `SELECT seq, data FROM microvms WHERE account = ?`
	args := []any{account}
	if f.ImageName != "" {
		q += ` AND image = ?`
		args = append(args, f.ImageName)
	}
	if f.ImageVersion != "" {
		q += ` AND version = ?`
		args = append(args, f.ImageVersion)
	}
	if len(f.States) > 0 {
		q += ` AND state IN (` + Placeholders(len(f.States)) + `)`
		args = append(args, stateArgs(f.States)...)
	}
	return pageAfter[store.Microvm](ctx, s.r, p, q+` AND seq > ? ORDER BY seq LIMIT ?`, args...)
}

func (s *Store) ListMicrovmsInState(ctx context.Context, limit int, states ...store.MicrovmState) ([]store.Microvm, error) {
	if len(states) == 0 {
		return nil, nil
	}
	if limit <= 0 {
		limit = 1 << 30
	}
	out, _, err := page[store.Microvm](ctx, s.r, limit, `SELECT seq, data FROM microvms WHERE state IN (`+Placeholders(len(states))+`) ORDER BY seq LIMIT ?`,
		append(stateArgs(states), limit+1)...)
	return out, err
}

func (s *Store) ListMicrovmsDue(ctx context.Context, now time.Time, limit int) ([]store.Microvm, error) {
	if limit <= 0 {
		limit = 1000
	}
	out, _, err := page[store.Microvm](ctx, s.r, limit,
		`SELECT seq, data FROM microvms WHERE state NOT IN ('TERMINATED', 'TERMINATING') AND deadline_at <= ?1
		 UNION SELECT seq, data FROM microvms WHERE state = 'SUSPENDED' AND suspend_deadline_at <= ?1
		 ORDER BY seq LIMIT ?2`, now.UnixNano(), limit+1)
	return out, err
}

func (s *Store) CountMicrovms(ctx context.Context, account string) (int, error) {
	var n int
	if err := s.r.QueryRow(ctx, `SELECT COUNT(*) FROM microvms WHERE account = ? AND state != 'TERMINATED'`, account).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting microvms: %w", err)
	}
	return n, nil
}

func (s *Store) UpdateMicrovm(ctx context.Context, account, id string, from []store.MicrovmState, change func(*store.Microvm) error) (store.Microvm, error) {
	var m store.Microvm
	err := s.db.Write(ctx, func(tx Querier) error {
		var err error
		// Locked: the read, the check and the write are one
		// compare-and-set against every other process.
		m, err = getDoc[store.Microvm](ctx, tx, false, "microvm "+id, `SELECT data FROM microvms WHERE id = ? AND account = ?`+s.d.ForUpdate, id, account)
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
		return s.writeMicrovm(ctx, tx, m, before)
	})
	return m, err
}

// writeMicrovm rewrites m's record (read for update in tx) with the
// columns queried beside it kept in step, and records the event of its
// move from the state before, if it moved: every change of a stored
// microVM goes through here (UpdateMicrovm, placement, HostLost).
func (s *Store) writeMicrovm(ctx context.Context, tx Querier, m store.Microvm, before store.MicrovmState) error {
	if m.State != before {
		if err := s.insertEvent(ctx, tx, store.MicrovmEvent(m, before)); err != nil {
			return err
		}
	}
	_, err := tx.Exec(ctx, `UPDATE microvms SET state = ?, deadline_at = ?, suspend_deadline_at = ?, memory_mib = ?, vcpus = ?, node = ?, data = ? WHERE id = ? AND account = ?`,
		string(m.State), m.DeadlineAt.UnixNano(), suspendDeadline(m), m.MemoryMiB, m.VCPUs, m.Node, mustJSON(m), m.ID, m.Account)
	if err != nil {
		return fmt.Errorf("updating microvm %s: %w", m.ID, err)
	}
	return nil
}

func (s *Store) CountMicrovmsByState(ctx context.Context) (map[store.MicrovmState]int, error) {
	defer metrics.Since(metrics.StoreOps.WithLabelValues("read"), time.Now())
	rows, err := s.r.Query(ctx, `SELECT state, COUNT(*) FROM microvms GROUP BY state`)
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
			rs, err := s.r.Query(ctx, `SELECT seq, data FROM microvms WHERE state = 'TERMINATED' AND seq > ? ORDER BY seq LIMIT ?`, after, gcBatch)
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
				if r.m, err = decode[store.Microvm](data, "microvm"); err != nil {
					return err
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
		n := 0
		err = s.db.Write(ctx, func(tx Querier) error {
			n = 0
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
				gone, err := tx.Exec(ctx, `DELETE FROM microvms WHERE seq = ? AND state = 'TERMINATED'`, r.seq)
				if err != nil {
					return fmt.Errorf("deleting microvm %s: %w", r.m.ID, err)
				}
				if gone == 0 {
					continue
				}
				if _, err := tx.Exec(ctx, `DELETE FROM tags WHERE account = ? AND arn = ?`, r.m.Account, r.m.ARN); err != nil {
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

// Tags.

func (s *Store) GetTags(ctx context.Context, account, arn string) (map[string]string, error) {
	rows, err := s.r.Query(ctx, `SELECT key, value FROM tags WHERE account = ? AND arn = ?`, account, arn)
	if err != nil {
		return nil, fmt.Errorf("reading tags: %w", err)
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
	return s.db.Write(ctx, func(tx Querier) error {
		// Two requests that each fit must not pass the bound together.
		if err := s.takeTurns(ctx, tx, account+"/tags/"+arn); err != nil {
			return err
		}
		for k, v := range tags {
			if _, err := tx.Exec(ctx, `INSERT INTO tags (account, arn, key, value) VALUES (?, ?, ?, ?) ON CONFLICT (account, arn, key) DO UPDATE SET value = excluded.value`,
				account, arn, s.d.Text(k), s.d.Text(v)); err != nil {
				return fmt.Errorf("tagging: %w", err)
			}
		}
		var n int
		if err := tx.QueryRow(ctx, `SELECT COUNT(*) FROM tags WHERE account = ? AND arn = ?`, account, arn).Scan(&n); err != nil {
			return fmt.Errorf("counting tags: %w", err)
		}
		if n > store.MaxTags {
			return &store.TooManyTagsError{Have: n}
		}
		return nil
	})
}

func (s *Store) UntagResource(ctx context.Context, account, arn string, keys []string) error {
	if len(keys) == 0 {
		return nil
	}
	args := []any{account, arn}
	for _, k := range keys {
		args = append(args, s.d.Text(k))
	}
	if _, err := s.db.Writer().Exec(ctx, `DELETE FROM tags WHERE account = ? AND arn = ? AND key IN (`+Placeholders(len(keys))+`)`, args...); err != nil {
		return fmt.Errorf("untagging: %w", err)
	}
	return nil
}

// Quotas.

// takeTurns makes the transactions that count what key names (an account's
// quota use, a template's tags) take turns where the database does not
// already (Dialect.LockAccount), each counting after the one before
// committed. The lock is held to the end of tx.
func (s *Store) takeTurns(ctx context.Context, tx Querier, key string) error {
	if s.d.LockAccount == "" {
		return nil
	}
	if _, err := tx.Exec(ctx, s.d.LockAccount, key); err != nil {
		return fmt.Errorf("locking %s: %w", key, err)
	}
	return nil
}

// admit checks need against the account's quota inside tx. SQLite's write
// transaction already excludes every other writer; where it does not,
// Dialect.LockAccount, held to the end of tx, makes admissions of one
// account take turns, each counting after the one before committed.
func (s *Store) admit(ctx context.Context, tx Querier, account string, adm store.Admission, need store.QuotaUse) error {
	if err := s.takeTurns(ctx, tx, account); err != nil {
		return err
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

func quotaUse(ctx context.Context, db Querier, account string) (store.QuotaUse, error) {
	var u store.QuotaUse
	if err := db.QueryRow(ctx, `SELECT COUNT(*), CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT), CAST(COALESCE(SUM(vcpus), 0) AS BIGINT)
		FROM microvms WHERE account = ? AND state != 'TERMINATED'`, account).Scan(&u.Microvms, &u.MemoryMiB, &u.VCPUs); err != nil {
		return u, fmt.Errorf("counting microvms: %w", err)
	}
	if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM builds WHERE account = ? AND state IN ('PENDING', 'IN_PROGRESS')`, account).Scan(&u.Builds); err != nil {
		return u, fmt.Errorf("counting builds: %w", err)
	}
	if err := db.QueryRow(ctx, `SELECT CAST(COALESCE(SUM(snapshot_bytes), 0) AS BIGINT) FROM builds WHERE account = ? AND state = 'SUCCESSFUL'`, account).Scan(&u.SnapshotBytes); err != nil {
		return u, fmt.Errorf("adding up snapshot sizes: %w", err)
	}
	var up int64
	if err := db.QueryRow(ctx, `SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM uploads WHERE account = ?`, account).Scan(&up); err != nil {
		return u, fmt.Errorf("adding up upload sizes: %w", err)
	}
	u.StorageBytes = u.SnapshotBytes + up
	return u, nil
}

func quotaOverride(ctx context.Context, db Querier, account string) (store.QuotaOverride, error) {
	var data string
	err := db.QueryRow(ctx, `SELECT data FROM quotas WHERE account = ?`, account).Scan(&data)
	if errors.Is(err, ErrNoRows) {
		return store.QuotaOverride{}, nil
	}
	if err != nil {
		return store.QuotaOverride{}, fmt.Errorf("reading quota: %w", err)
	}
	return decode[store.QuotaOverride](data, "quota")
}

func (s *Store) QuotaUsage(ctx context.Context, account string) (store.QuotaUse, error) {
	return quotaUse(ctx, s.r, account)
}

func (s *Store) GetQuotaOverride(ctx context.Context, account string) (store.QuotaOverride, error) {
	return quotaOverride(ctx, s.r, account)
}

func (s *Store) SetQuotaOverride(ctx context.Context, account string, o store.QuotaOverride) error {
	if o == (store.QuotaOverride{}) {
		if _, err := s.db.Writer().Exec(ctx, `DELETE FROM quotas WHERE account = ?`, account); err != nil {
			return fmt.Errorf("removing quota: %w", err)
		}
		return nil
	}
	if _, err := s.db.Writer().Exec(ctx, `INSERT INTO quotas (account, data) VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET data = excluded.data`,
		account, mustJSON(o)); err != nil {
		return fmt.Errorf("setting quota: %w", err)
	}
	return nil
}

func (s *Store) ListQuotaOverrides(ctx context.Context) (map[string]store.QuotaOverride, error) {
	rows, err := s.r.Query(ctx, `SELECT account, data FROM quotas`)
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
