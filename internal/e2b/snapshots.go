package e2b

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// E2B's snapshots are kiln images: api.SnapshotMicrovmImage copies a
// paused sandbox's memory and disk into a new image of the account, so a
// snapshot counts against the image quotas, is usable as a template by
// its id, and DELETE /templates/{id} (the SDK's deleteSnapshot) frees it
// like any image. What E2B adds (the sandbox it came from, the env vars
// envd gives its processes) is a record in the store
// (store.E2BTemplateStore), which goes with the image's record.

// maxForks bounds one fork request's count.
const maxForks = 10

func (s *Server) snapshotsRoutes() {
	s.route("POST /sandboxes/{id}/snapshots", s.createSnapshot)
	s.route("GET /snapshots", s.listSnapshots)
	s.route("POST /sandboxes/{id}/fork", s.fork)
}

// snapshotOf returns the record of the account's snapshot name; false if
// name is no snapshot (or its image is gone).
func (s *Server) snapshotOf(ctx context.Context, account, name string) (store.E2BSnapshot, bool, error) {
	if !templateNameRE.MatchString(name) {
		return store.E2BSnapshot{}, false, nil
	}
	rec, err := s.cfg.Sandboxes.GetE2BSnapshot(ctx, account, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return rec, false, nil
	}
	return rec, err == nil, err
}

func newSnapshotName(prefix string) string {
	b := make([]byte, 8)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// snapshot pauses the sandbox if it runs, copies it into a new image name
// and resumes it as it was (E2B's checkpoint: the source goes on).
func (s *Server) snapshot(ctx context.Context, q *request, id, name string) (store.E2BSnapshot, error) {
	sb, m, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return store.E2BSnapshot{}, err
	}
	if m.State == store.StateSuspending {
		if m, err = s.waitFor(ctx, q.key.Account, id, store.StateSuspended); err != nil {
			return store.E2BSnapshot{}, err
		}
	}
	wasRunning := m.State != store.StateSuspended
	if wasRunning {
		if m.State != store.StateRunning {
			return store.E2BSnapshot{}, errorf(409, "sandbox %s is %s: it can be snapshotted once it runs", id, strings.ToLower(string(m.State)))
		}
		if err := s.op(ctx, q.key, "POST", "/microvms/"+id+"/suspend", nil, nil, nil); err != nil {
			return store.E2BSnapshot{}, err
		}
		if _, err := s.waitFor(ctx, q.key.Account, id, store.StateSuspended); err != nil {
			return store.E2BSnapshot{}, err
		}
	}
	rec := store.E2BSnapshot{Account: q.key.Account, Name: name, SandboxID: id, TemplateID: sb.TemplateID, EnvVars: sb.EnvVars, CreatedAt: s.cfg.Now().UTC()}
	_, serr := s.cfg.API.SnapshotMicrovmImage(ctx, q.key.Account, id, name)
	if serr == nil {
		// The image exists now: its record is written even if the caller
		// has gone.
		if serr = s.cfg.Sandboxes.PutE2BSnapshot(context.WithoutCancel(ctx), rec); serr != nil {
			s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvm-images/"+url.PathEscape(name), nil, nil, nil)
			serr = fmt.Errorf("recording snapshot %s: %w", name, serr)
		}
	}
	if wasRunning {
		// Resumed whatever the snapshot's outcome; the timeout it had
		// runs on from where it was.
		left := int64(m.DeadlineAt.Sub(s.cfg.Now()) / time.Second)
		if err := s.op(context.WithoutCancel(ctx), q.key, "POST", "/microvms/"+id+"/resume", nil, nil, nil); err != nil {
			return rec, errors.Join(snapshotError(serr), err)
		}
		if _, err := s.waitFor(context.WithoutCancel(ctx), q.key.Account, id, store.StateRunning); err != nil {
			return rec, errors.Join(snapshotError(serr), err)
		}
		if err := s.extend(ctx, q.key.Account, id, max(left, 1)); err != nil {
			return rec, err
		}
	}
	return rec, snapshotError(serr)
}

// snapshotError maps the API's errors onto E2B's codes.
func snapshotError(err error) error {
	var ae *apiError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, errdefs.ErrNotFound):
		return errorf(404, "%v", err)
	case errors.Is(err, errdefs.ErrConflict):
		return errorf(409, "%v", err)
	case errors.Is(err, errdefs.ErrExhausted):
		return errorf(429, "%v (a snapshot is an image of your account: delete snapshots or templates you no longer need)", err)
	case errors.Is(err, errdefs.ErrInvalid):
		return errorf(400, "%v", err)
	case errors.Is(err, errdefs.ErrUnavailable):
		return errorf(501, "%v", err)
	}
	return err
}

type snapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

// createSnapshot is POST /sandboxes/{id}/snapshots.
func (s *Server) createSnapshot(ctx context.Context, q *request) (int, any, error) {
	var in struct {
		Name string `json:"name"`
	}
	if len(q.body) > 0 {
		if err := json.Unmarshal(q.body, &in); err != nil {
			return 0, nil, errorf(400, "request body is not a valid SandboxSnapshotRequest: %v", err)
		}
	}
	name := in.Name
	if name == "" {
		name = newSnapshotName("snap-")
	} else if !templateNameRE.MatchString(name) {
		return 0, nil, errorf(400, "snapshot name %q must match %s", name, templateNameRE)
	} else if _, found, err := s.imageOf(ctx, q.key, name); err != nil {
		return 0, nil, err
	} else if found {
		return 0, nil, errorf(409, "a template or snapshot named %q exists: kiln does not add snapshots to an existing one; pick another name or delete it", name)
	}
	rec, err := s.snapshot(ctx, q, q.r.PathValue("id"), name)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusCreated, snapshotInfo{SnapshotID: rec.Name, Names: []string{rec.Name}}, nil
}

// listSnapshots is GET /snapshots: the account's snapshots, oldest first,
// optionally of one sandbox or by name, in pages.
func (s *Server) listSnapshots(ctx context.Context, q *request) (int, any, error) {
	qv := q.r.URL.Query()
	limit := 100
	if l := qv.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 100 {
			return 0, nil, errorf(400, "limit must be between 1 and 100, not %q", l)
		}
		limit = n
	}
	recs, err := s.cfg.Sandboxes.ListE2BSnapshots(ctx, q.key.Account, store.E2BSnapshotQuery{
		SandboxID: qv.Get("sandboxID"), Name: qv.Get("name"), After: qv.Get("nextToken"), Limit: limit + 1})
	if err != nil {
		return 0, nil, err
	}
	out := []snapshotInfo{}
	for _, r := range recs {
		if len(out) == limit {
			q.header.Set("X-Next-Token", out[len(out)-1].SnapshotID)
			break
		}
		out = append(out, snapshotInfo{SnapshotID: r.Name, Names: []string{r.Name}})
	}
	return 200, out, nil
}

type forkResult struct {
	Sandbox *sandboxOut `json:"sandbox,omitempty"`
	Error   *apiError   `json:"error,omitempty"`
}

// fork is POST /sandboxes/{id}/fork: one snapshot, count sandboxes made
// from it. The snapshot's image is deleted at once: its files stay while
// a fork runs on them (the engine frees a version's files when its last
// microVM ends).
func (s *Server) fork(ctx context.Context, q *request) (int, any, error) {
	var in struct {
		Count   *int   `json:"count"`
		Timeout *int64 `json:"timeout"`
	}
	if len(q.body) > 0 {
		if err := json.Unmarshal(q.body, &in); err != nil {
			return 0, nil, errorf(400, "request body is not a valid SandboxForkRequest: %v", err)
		}
	}
	count := 1
	if in.Count != nil {
		count = *in.Count
	}
	if count < 1 || count > maxForks {
		return 0, nil, errorf(400, "count must be between 1 and %d, not %d", maxForks, count)
	}
	timeout := int64(DefaultTimeout)
	if in.Timeout != nil {
		if *in.Timeout < 1 || *in.Timeout > MaxTimeout {
			return 0, nil, errorf(400, "timeout must be between 1 and %d seconds, not %d", MaxTimeout, *in.Timeout)
		}
		timeout = *in.Timeout
	}
	id := q.r.PathValue("id")
	rec, err := s.snapshot(ctx, q, id, newSnapshotName("fork-"))
	if err != nil {
		return 0, nil, err
	}
	defer func() {
		bg := context.WithoutCancel(ctx)
		s.op(bg, q.key, "DELETE", "/microvm-images/"+url.PathEscape(rec.Name), nil, nil, nil)
		if err := s.cfg.Sandboxes.DeleteE2BSnapshot(bg, q.key.Account, rec.Name); err != nil {
			slog.Warn("e2b fork: dropping the record of its snapshot", "account", q.key.Account, "snapshot", rec.Name, "err", err)
		}
	}()
	src, _, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	out := make([]forkResult, count)
	for i := range out {
		body, _ := json.Marshal(map[string]any{"templateID": rec.Name, "timeout": timeout, "metadata": src.Metadata})
		_, sb, err := s.create(ctx, &request{r: q.r, header: http.Header{}, key: q.key, body: body})
		var ae *apiError
		switch {
		case err == nil:
			v := sb.(sandboxOut)
			out[i].Sandbox = &v
		case errors.As(err, &ae):
			out[i].Error = ae
		default:
			out[i].Error = errorf(500, "%v", err)
		}
	}
	return http.StatusCreated, out, nil
}
