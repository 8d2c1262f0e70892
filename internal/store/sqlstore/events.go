package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// Lifecycle events and usage metering (internal/store/events.go).

func (s *Store) insertEvent(ctx context.Context, tx Querier, ev store.Event) error {
	ev = store.EventToRecord(ev)
	_, err := tx.Exec(ctx, `INSERT INTO events (account, kind, resource, version, from_state, state, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
		ev.Account, ev.Kind, ev.Resource, ev.Version, ev.From, ev.State, s.d.Text(ev.Reason), ev.At.UnixNano())
	if err != nil {
		return fmt.Errorf("recording event: %w", err)
	}
	return nil
}

// deletedVersionEvents records DELETED for versions of an image about to
// be removed (version "": all of them).
func (s *Store) deletedVersionEvents(ctx context.Context, tx Querier, account, image, version, reason string) error {
	q := `SELECT data FROM image_versions WHERE account = ? AND image = ?`
	args := []any{account, image}
	if version != "" {
		q += ` AND version = ?`
		args = append(args, version)
	}
	vs, err := docs[store.ImageVersion](ctx, tx, q+` ORDER BY seq`+s.d.ForUpdate, args...)
	if err != nil {
		return fmt.Errorf("reading versions: %w", err)
	}
	for _, v := range vs {
		ev := store.Event{Account: account, Kind: store.EventImageVersion, Resource: image, Version: v.Version,
			From: v.State, State: store.VersionDeleted, Reason: reason}
		if err := s.insertEvent(ctx, tx, ev); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) ListEvents(ctx context.Context, account string, f store.EventFilter, p store.Page) ([]store.Event, string, error) {
	after, err := store.DecodePageToken(p.Token)
	if err != nil {
		return nil, "", err
	}
	limit := store.PageLimit(p)
	q := `SELECT seq, account, kind, resource, version, from_state, state, reason, at FROM events WHERE account = ? AND kind = ? AND resource = ? AND seq > ?`
	args := []any{account, f.Kind, f.Resource, after}
	if f.Version != "" {
		q += ` AND version = ?`
		args = append(args, f.Version)
	}
	rows, err := s.r.Query(ctx, q+` ORDER BY seq LIMIT ?`, append(args, limit+1)...)
	if err != nil {
		return nil, "", fmt.Errorf("listing events: %w", err)
	}
	defer rows.Close()
	var out []store.Event
	next := ""
	for rows.Next() {
		var ev store.Event
		var at int64
		var reason []byte
		if err := rows.Scan(&ev.Seq, &ev.Account, &ev.Kind, &ev.Resource, &ev.Version, &ev.From, &ev.State, &reason, &at); err != nil {
			return nil, "", fmt.Errorf("listing events: %w", err)
		}
		if len(out) == limit {
			next = store.EncodePageToken(out[len(out)-1].Seq)
			break
		}
		ev.Reason = string(reason)
		ev.At = time.Unix(0, at).UTC()
		out = append(out, ev)
	}
	return out, next, rows.Err()
}

// Usage.

func (s *Store) PutUsage(ctx context.Context, ivs []store.UsageInterval) error {
	if len(ivs) == 0 {
		return nil
	}
	return s.db.Write(ctx, func(tx Querier) error {
		for _, iv := range ivs {
			if iv.Key == "" || iv.Account == "" {
				return errors.New("usage interval without key or account")
			}
			_, err := tx.Exec(ctx, `INSERT INTO usage_intervals (key, account, resource, kind, vcpus, memory_mib, start_at, end_at, open, node)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
				ON CONFLICT (key) DO UPDATE SET end_at = `+s.d.Greatest+`(usage_intervals.end_at, excluded.end_at), open = excluded.open`,
				iv.Key, iv.Account, iv.Resource, iv.Kind, iv.VCPUs, iv.MemoryMiB, iv.Start.UnixNano(), max(iv.End.UnixNano(), iv.Start.UnixNano()), iv.Open, iv.Node)
			if err != nil {
				return fmt.Errorf("recording usage: %w", err)
			}
		}
		return nil
	})
}

func (s *Store) CloseOpenUsage(ctx context.Context, node string) (int, error) {
	n, err := s.db.Writer().Exec(ctx, `UPDATE usage_intervals SET open = NOT `+s.d.True+` WHERE open = `+s.d.True+` AND node = ?`, node)
	if err != nil {
		return 0, fmt.Errorf("closing usage intervals: %w", err)
	}
	return int(n), nil
}

func (s *Store) UsageTotals(ctx context.Context, account string, since, until time.Time) ([]store.Usage, error) {
	where, args := "", []any{since.UnixNano(), until.UnixNano()}
	if account != "" {
		where = ` AND account = ?3`
		args = append(args, account)
	}
	// Seconds of an interval inside the window [?1, ?2).
	clipped := `CAST(` + s.d.Least + `(end_at, ?2) - ` + s.d.Greatest + `(start_at, ?1) AS DOUBLE PRECISION) / 1e9`
	rows, err := s.r.Query(ctx, `SELECT account,
			COALESCE(SUM(CASE WHEN kind = 'running' THEN `+clipped+` * vcpus ELSE 0 END), 0),
			COALESCE(SUM(CASE WHEN kind = 'running' THEN `+clipped+` * memory_mib / 1024.0 ELSE 0 END), 0),
			COALESCE(SUM(CASE WHEN kind = 'suspended' THEN `+clipped+` * memory_mib / 1024.0 ELSE 0 END), 0),
			COALESCE(SUM(CASE WHEN kind = 'build' THEN `+clipped+` ELSE 0 END), 0),
			COUNT(DISTINCT CASE WHEN kind = 'build' THEN resource END)
		FROM usage_intervals WHERE start_at < ?2 AND end_at >= ?1`+where+` GROUP BY account ORDER BY account`+s.d.Collate, args...)
	if err != nil {
		return nil, fmt.Errorf("summing usage: %w", err)
	}
	var set store.UsageSet
	for rows.Next() {
		u := store.Usage{}
		if err := rows.Scan(&u.Account, &u.RunningVCPUSeconds, &u.RunningGiBSeconds, &u.SuspendedGiBSeconds, &u.BuildSeconds, &u.Builds); err != nil {
			rows.Close()
			return nil, fmt.Errorf("summing usage: %w", err)
		}
		*set.Of(u.Account) = u
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	// Snapshots stored now: the sizes successful builds recorded.
	q := `SELECT account, CAST(COALESCE(SUM(snapshot_bytes), 0) AS BIGINT) FROM builds WHERE state = 'SUCCESSFUL'`
	var qargs []any
	if account != "" {
		q += ` AND account = ?`
		qargs = append(qargs, account)
	}
	rows, err = s.r.Query(ctx, q+` GROUP BY account`, qargs...)
	if err != nil {
		return nil, fmt.Errorf("summing snapshot sizes: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var a string
		var n int64
		if err := rows.Scan(&a, &n); err != nil {
			return nil, fmt.Errorf("summing snapshot sizes: %w", err)
		}
		set.Of(a).SnapshotBytes = n
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return set.List(account), nil
}
