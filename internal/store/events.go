package store

import (
	"context"
	"time"
)

// Event kinds.
const (
	EventMicrovm      = "microvm"
	EventImageVersion = "image-version"
)

// Event is one state change of a microVM or an image version, recorded by
// the store in the same transaction as the change itself.
type Event struct {
	Seq      int64     `json:"seq"`
	Account  string    `json:"account"`
	Kind     string    `json:"kind"`     // EventMicrovm or EventImageVersion
	Resource string    `json:"resource"` // microVM id, or image name
	Version  string    `json:"version,omitempty"`
	From     string    `json:"from,omitempty"` // "" when the resource was created
	State    string    `json:"state"`
	Reason   string    `json:"reason,omitempty"`
	At       time.Time `json:"at"`
}

// EventFilter selects events: of one kind and resource, and for image
// versions one version ("" for every version of the image).
type EventFilter struct {
	Kind     string
	Resource string
	Version  string
}

// EventStore records lifecycle events. Events are written by the store's
// own state-changing methods (CreateMicrovm, UpdateMicrovm when the state
// changes, CreateImage, CreateImageVersion, UpdateImageVersion when the
// state changes, DeleteImage, DeleteImageVersion), never by callers, so
// that no change goes unrecorded and none is recorded that did not commit.
// Events outlive the records they describe.
type EventStore interface {
	// ListEvents pages through an account's events matching f, oldest
	// first.
	ListEvents(ctx context.Context, account string, f EventFilter, p Page) ([]Event, string, error)
}

// Usage interval kinds.
const (
	UsageRunning   = "running"   // a microVM RUNNING: vCPUs and memory
	UsageSuspended = "suspended" // a microVM SUSPENDED: memory kept
	UsageBuild     = "build"     // an image build in progress
)

// UsageInterval is a span of time during which an account used something.
// An open interval is extended by its owner (every state change, and
// periodically), so that after a crash it ends at the last checkpoint.
type UsageInterval struct {
	Key       string // unique per interval
	Account   string
	Resource  string // microVM id or build id
	Kind      string // UsageRunning, UsageSuspended or UsageBuild
	VCPUs     int
	MemoryMiB int
	Start     time.Time
	End       time.Time
	Open      bool
	// Node is the host that metered it ("" on a single `kiln server`):
	// a restarted node closes only its own, and a lost node's are closed
	// when it is declared lost.
	Node string
}

// Usage is what one account used in a window of time, and what it stores
// now.
type Usage struct {
	Account             string  `json:"account"`
	RunningVCPUSeconds  float64 `json:"runningVcpuSeconds"`
	RunningGiBSeconds   float64 `json:"runningGiBSeconds"`
	SuspendedGiBSeconds float64 `json:"suspendedGiBSeconds"`
	Builds              int64   `json:"builds"`
	BuildSeconds        float64 `json:"buildSeconds"`
	// SnapshotBytes is the size of the snapshots (memory and disk) of the
	// account's successful builds that exist now.
	SnapshotBytes int64 `json:"snapshotBytes"`
	// ArtifactBytes is the size of the code packages the account uploaded
	// that exist now (filled in by the API, which owns those files).
	ArtifactBytes int64 `json:"artifactBytes"`
}

// UsageStore records metered usage.
type UsageStore interface {
	// PutUsage writes intervals (new, extended or closed) in one
	// transaction, replacing any with the same Key.
	PutUsage(ctx context.Context, iv []UsageInterval) error
	// CloseOpenUsage closes every open interval of node ("" on a single
	// `kiln server`) where it was last extended (after a restart: the
	// previous process's checkpoints). A node declared lost has its
	// intervals closed with it (Cluster.ExpireNodes).
	CloseOpenUsage(ctx context.Context, node string) (int, error)
	// UsageTotals sums the usage of account ("" for every account with
	// any) within [since, until): intervals are clipped to the window;
	// builds count those that overlap it.
	UsageTotals(ctx context.Context, account string, since, until time.Time) ([]Usage, error)
}
