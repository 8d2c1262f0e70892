// Package lifecycle is kiln's microVM and build life cycle, apart from
// any API: the state machine's transitions (suspend, resume, terminate),
// the deadline controller, recovery after a restart, and the Reporter
// through which a backend (the engine) records what happened. The AWS
// API (internal/api), the E2B API, the endpoint proxy's idle and wake
// controllers and the console all drive microVMs through it, so a
// transition means the same whichever door it came through.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Backend performs what the API has accepted. The API first records the
// request durably in the store (the microVM in PENDING, SUSPENDING or
// TERMINATING; the build in PENDING), answers the client, and calls the
// Backend; the Backend does the work on its own goroutines and reports
// every state change back through a Reporter (NewReporter(store)).
//
// Every method must return quickly (it only accepts the work), must not
// keep ctx (it is the request's; the work outlives it: use
// context.WithoutCancel or the backend's own context), and must be
// idempotent: after a crash, Recover hands the same records again.
// A returned error means the work was not accepted; the API then records the
// failure (microVM TERMINATED / build FAILED with the error as stateReason).
type Backend interface {
	// StartMicrovm restores m from its image version's snapshot and calls
	// the run hook with m.RunHookPayload; it reports RUNNING, or TERMINATED
	// with a reason if the start fails. m is PENDING.
	StartMicrovm(ctx context.Context, m store.Microvm) error
	// SuspendMicrovm snapshots and stops m (suspend hook first, if
	// enabled); it reports SUSPENDED, or RUNNING with a reason if the
	// suspend fails. m is SUSPENDING.
	SuspendMicrovm(ctx context.Context, m store.Microvm) error
	// ResumeMicrovm restores a suspended m (resume hook after, if
	// enabled); it reports RUNNING. m is SUSPENDED with PendingOp "resume".
	ResumeMicrovm(ctx context.Context, m store.Microvm) error
	// TerminateMicrovm stops m (terminate hook first, if enabled and m is
	// running) and frees everything; it reports TERMINATED. m is
	// TERMINATING; it may have been PENDING, RUNNING, SUSPENDING or
	// SUSPENDED, and an in-flight start or suspend must be abandoned.
	TerminateMicrovm(ctx context.Context, m store.Microvm) error
	// BuildImage builds v (its Config) once per build in builds, reporting
	// progress with Reporter.BuildRunning, Reporter.AppendBuildLog and
	// finally Reporter.BuildFinished for each build.
	BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error
	// DeleteImageVersion frees the snapshots and files of a version whose
	// record is gone. Best effort; errors are logged.
	DeleteImageVersion(ctx context.Context, account, image, version string) error
}

// DefaultMicrovmMemoryMiB is the guest memory of an image version whose
// builds recorded none (the image builder's default size).
const DefaultMicrovmMemoryMiB = 2048

// HostAdmitter is optionally implemented by a Backend that bounds what the
// host commits (guest memory). AdmitMemory says, without reserving, whether
// a guest of memMiB fits now; the API asks it before recording a
// RunMicrovm, so that a refusal leaves no record. The backend must check
// again (and reserve) in StartMicrovm and ResumeMicrovm, which may then
// refuse too. Errors wrap errdefs.ErrExhausted and name committed,
// requested and allowed MiB.
type HostAdmitter interface {
	AdmitMemory(ctx context.Context, memMiB int64) error
}

// Snapshotter is implemented by backends that can copy a suspended
// microVM into the template of an image version (the engine). It returns
// the sizes the copy holds, which the version's record keeps: they count
// toward the account's storage quota, and the memory is what microVMs of
// the version run with.
type Snapshotter interface {
	SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error)
}

// LogSource is optionally implemented by a Backend that keeps microVM
// output (the app's stdout and stderr, forwarded by the guest agent). The
// API serves it at GET /kiln/v1/microvms/{id}/log?offset=N (used by
// `kiln logs`): at most limit bytes from offset, and the offset after them.
// Offsets before the oldest byte kept start at the oldest byte.
type LogSource interface {
	MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) (data []byte, next int64, err error)
}

// Reporter is how a Backend records what happened. All methods are
// durable when they return nil.
type Reporter struct {
	st  store.Store
	now func() time.Time
}

// NewReporter returns a Reporter that writes to st.
func NewReporter(st store.Store) *Reporter { return &Reporter{st: st, now: time.Now} }

// MicrovmState moves a microVM to state to with reason, if its current
// state is one of from (any allowed predecessor if from is nil), and
// returns the record as written. ErrConflict if the microVM is no longer in
// a state from which it may move (e.g. it was terminated meanwhile).
func (r *Reporter) MicrovmState(ctx context.Context, account, id string, from []store.MicrovmState, to store.MicrovmState, reason string) (store.Microvm, error) {
	return r.st.UpdateMicrovm(ctx, account, id, from, func(m *store.Microvm) error {
		if m.State == to {
			return nil
		}
		if !store.Allowed(m.State, to) {
			return fmt.Errorf("microvm %s cannot move from %s to %s: %w", id, m.State, to, errdefs.ErrConflict)
		}
		m.SetState(to, reason, r.now().UTC())
		return nil
	})
}

// MicrovmStateAt is MicrovmState for a host that runs the microVM under
// placement epoch: the report is refused (store.ErrStaleEpoch) once the
// microVM was placed again, so a host that lost it cannot overwrite what
// its new host reports.
func (r *Reporter) MicrovmStateAt(ctx context.Context, account, id string, epoch int64, from []store.MicrovmState, to store.MicrovmState, reason string) (store.Microvm, error) {
	return r.st.UpdateMicrovm(ctx, account, id, from, store.AtEpoch(epoch, func(m *store.Microvm) error {
		if m.State == to {
			return nil
		}
		if !store.Allowed(m.State, to) {
			return fmt.Errorf("microvm %s cannot move from %s to %s: %w", id, m.State, to, errdefs.ErrConflict)
		}
		m.SetState(to, reason, r.now().UTC())
		return nil
	}))
}

// BuildRunning marks a build IN_PROGRESS, and its version too, in one
// store transaction (Store.StartBuild): a late report for a build that
// finished meanwhile is refused (ErrConflict) instead of bringing it back.
func (r *Reporter) BuildRunning(ctx context.Context, b store.Build) error {
	b.State, b.UpdatedAt = store.BuildInProgress, r.now().UTC()
	return r.st.StartBuild(ctx, b)
}

// AppendBuildLog appends build output, shown by `kiln logs`.
func (r *Reporter) AppendBuildLog(ctx context.Context, buildID string, data []byte) error {
	return r.st.AppendBuildLog(ctx, buildID, data)
}

// BuildFinished records a build's outcome and, once every build of the
// version is final, the version's and the image's (store.FinishVersion),
// in one store transaction (Store.FinishBuild), so that the last build to
// finish finalises the version once, whichever process reports it.
func (r *Reporter) BuildFinished(ctx context.Context, b store.Build, ok bool, reason string, snap *store.SnapshotBuild) error {
	b.State, b.StateReason, b.UpdatedAt, b.Snapshot = store.BuildSuccessful, reason, r.now().UTC(), snap
	if !ok {
		b.State = store.BuildFailed
	}
	_, err := r.st.FinishBuild(ctx, b)
	return err
}

// Recoverer is optionally implemented by a Backend that can reconcile its
// own world (processes, files, network namespaces) with the store after a
// restart. Recover receives every microVM not TERMINATED and every build
// not final; it must finish or roll back each transitional one (reporting
// through the Reporter) and report TERMINATED for any the engine has lost.
// Backends without it get the transitional records re-issued as calls
// (StartMicrovm for PENDING, and so on), which their idempotency allows.
type Recoverer interface {
	Recover(ctx context.Context, vms []store.Microvm, builds []store.Build) error
}

// Recover hands the store's unfinished work to the backend after a start.
// It is called by Server.Start.
func Recover(ctx context.Context, st store.Store, be Backend) error {
	vms, err := st.ListMicrovmsInState(ctx, 0, store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating)
	if err != nil {
		return fmt.Errorf("listing microvms to recover: %w", err)
	}
	builds, err := st.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
	if err != nil {
		return fmt.Errorf("listing builds to recover: %w", err)
	}
	if rc, ok := be.(Recoverer); ok {
		return rc.Recover(ctx, vms, builds)
	}
	var errs []error
	for _, m := range vms {
		var err error
		switch {
		case m.State == store.StatePending:
			err = be.StartMicrovm(ctx, m)
		case m.State == store.StateSuspending:
			err = be.SuspendMicrovm(ctx, m)
		case m.State == store.StateSuspended && m.PendingOp == "resume":
			err = be.ResumeMicrovm(ctx, m)
		case m.State == store.StateTerminating:
			err = be.TerminateMicrovm(ctx, m)
		}
		errs = append(errs, err)
	}
	errs = append(errs, RedoBuilds(ctx, st, builds, be.BuildImage))
	return errors.Join(errs...)
}

// MaxInterruptedBuilds is how many starts of one build a restart may
// interrupt before RedoBuilds gives up on it: a build that makes kiln
// crash or be killed (a hostile Dockerfile) would otherwise be redone on
// every start, and kill it again.
const MaxInterruptedBuilds = 3

// RedoBuilds hands unfinished builds back to build, one call per image
// version (BuildImage takes a version's builds together), in the order the
// versions first appear. A build found IN_PROGRESS was interrupted: the
// count of its recoveries is written to the store before it starts again,
// and once MaxInterruptedBuilds starts were interrupted it is marked
// FAILED instead.
func RedoBuilds(ctx context.Context, st store.Store, builds []store.Build,
	build func(context.Context, store.ImageVersion, []store.Build) error) error {
	type key struct{ account, image, version string }
	groups := map[key][]store.Build{}
	var order []key
	var errs []error
	rep := NewReporter(st)
	for _, b := range builds {
		if b.State == store.BuildInProgress {
			if b.Recoveries+1 >= MaxInterruptedBuilds {
				reason := fmt.Sprintf("BuildFailed: gave up after %d interrupted attempts (kiln restarted during each, so the build may crash or exhaust kiln); fix the Dockerfile or app and create a new version", b.Recoveries+1)
				_ = st.AppendBuildLog(ctx, b.ID, []byte("\n"+reason+"\n"))
				errs = append(errs, rep.BuildFinished(ctx, b, false, reason, nil))
				continue
			}
			b.Recoveries++
			if err := st.UpdateBuild(ctx, b); err != nil {
				errs = append(errs, fmt.Errorf("counting recovery of build %s: %w", b.ID, err))
				continue
			}
		}
		k := key{b.Account, b.ImageName, b.Version}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], b)
	}
	for _, k := range order {
		v, err := st.GetImageVersion(ctx, k.account, k.image, k.version)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, build(ctx, v, groups[k]))
	}
	return errors.Join(errs...)
}
