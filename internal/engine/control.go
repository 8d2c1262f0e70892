package engine

import (
	"context"
	"encoding/json"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// ControlPlane is everything the engine asks of, or tells, whoever decides
// what runs where. The engine holds no store: what it needs to start or
// resume a microVM comes in the request (the store.Microvm it is handed
// carries its template reference, hooks, logging, connectors, sizes and
// placement epoch), and everything else goes through these operations,
// named for what the engine needs rather than for store rows, so that a
// host can later talk to a remote control plane without the engine
// changing. lifecycle.StoreControl is the implementation over a store, on
// one `kiln server` and on a cluster node (on the shared store).
//
// Methods may be called concurrently. Reports are durable when they return
// nil.
type ControlPlane interface {
	// ReportMicrovmState moves a microVM to state to with reason, if its
	// current state is one of from (any allowed predecessor if from is
	// nil), and returns the record as written. The report is refused
	// (ErrConflict, store.ErrStaleEpoch) once the microVM was placed under
	// a newer epoch than the engine was handed, or when it may no longer
	// move (e.g. it was terminated meanwhile).
	ReportMicrovmState(ctx context.Context, account, id string, epoch int64, from []store.MicrovmState, to store.MicrovmState, reason string) (store.Microvm, error)
	// ReportActivity says a RUNNING microVM had inbound traffic at t, so
	// that its idle timer survives a restart of the host.
	ReportActivity(ctx context.Context, account, id string, t time.Time) error
	// RequestSuspend asks for a RUNNING microVM to be suspended (the idle
	// controller); the request comes back as SuspendMicrovm, exactly as
	// an API suspend does.
	RequestSuspend(ctx context.Context, account, id, reason string) error
	// RequestResume asks for a SUSPENDED microVM to be resumed (a wake by
	// the endpoint proxy); the request comes back as ResumeMicrovm.
	RequestResume(ctx context.Context, account, id string) error
	// Microvm is the control plane's current view of a microVM (state,
	// pending operation, idle policy, when it last changed): what decides
	// whether a request wakes it, whether it is idle, and whether a
	// suspended copy may be taken.
	Microvm(ctx context.Context, account, id string) (store.Microvm, error)
	// HostMicrovms lists the microVMs, not TERMINATED, that the host named
	// node ("" on a single `kiln server`) should hold: whatever else the
	// host holds is stale.
	HostMicrovms(ctx context.Context, node string) ([]store.Microvm, error)
	// VersionUsers says whether an image version still exists and which
	// microVMs, not TERMINATED, were started from it: a version's files go
	// only when neither holds.
	VersionUsers(ctx context.Context, account, image, version string) (exists bool, microvms []string, err error)
	// LegacyVersionSettings returns an image version's hooks and logging,
	// for a microVM whose record predates RunMicrovm copying them into it
	// (Microvm.Hooks nil). Records made since carry them.
	LegacyVersionSettings(ctx context.Context, account, image, version string) (*store.Hooks, json.RawMessage, error)

	// BuildRunning marks a build IN_PROGRESS (refused once it finished).
	BuildRunning(ctx context.Context, b store.Build) error
	// AppendBuildLog appends a build's output.
	AppendBuildLog(ctx context.Context, buildID string, data []byte) error
	// BuildFinished records a build's outcome.
	BuildFinished(ctx context.Context, b store.Build, ok bool, reason string, snap *store.SnapshotBuild) error
	// RedoBuilds hands builds a restart interrupted back to build, with
	// their versions, after counting the interruption; a build
	// interrupted too often is failed instead (lifecycle.RedoBuilds).
	RedoBuilds(ctx context.Context, builds []store.Build, build func(context.Context, store.ImageVersion, []store.Build) error) error

	// RecordUsage writes metered intervals (new, extended or closed) in
	// one go, replacing any with the same key.
	RecordUsage(ctx context.Context, iv []store.UsageInterval) error
	// CloseOpenUsage closes, at their last checkpoint, the intervals a
	// previous run of node (this host; "" on a single server) left open,
	// and says how many.
	CloseOpenUsage(ctx context.Context, node string) (int, error)
}
