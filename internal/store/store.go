// Package store holds kiln's durable state: access keys and their accounts,
// microVM images with their versions and builds, microVMs, idempotency
// tokens and tags. The Store interface is what the API and the engine see;
// internal/store/sqlite implements it on an embedded SQLite database, and a
// PostgreSQL implementation can satisfy the same contract later (nothing in
// it relies on SQLite: sequences are plain integers, times are values).
//
// Every method that returns nil has made its change durable (AppendBuildLog
// aside): the API answers only after the store call returns.
//
// Errors are wrapped in the categories of internal/errdefs: ErrNotFound when
// the record does not exist in that account, ErrConflict when it exists but
// the change is not allowed (duplicate name, wrong state, reused token).
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// MicrovmState is a microVM's lifecycle state, as the AWS API names it.
type MicrovmState string

const (
	StatePending     MicrovmState = "PENDING"
	StateRunning     MicrovmState = "RUNNING"
	StateSuspending  MicrovmState = "SUSPENDING"
	StateSuspended   MicrovmState = "SUSPENDED"
	StateTerminating MicrovmState = "TERMINATING"
	StateTerminated  MicrovmState = "TERMINATED"
)

// Final reports whether no transition leaves the state.
func (s MicrovmState) Final() bool { return s == StateTerminated }

// Image states (MicrovmImageState).
const (
	ImageCreating     = "CREATING"
	ImageCreated      = "CREATED"
	ImageCreateFailed = "CREATE_FAILED"
	ImageUpdating     = "UPDATING"
	ImageUpdated      = "UPDATED"
	ImageUpdateFailed = "UPDATE_FAILED"
	ImageDeleting     = "DELETING"
	ImageDeleted      = "DELETED"
)

// Image version states (MicrovmImageVersionState) and statuses.
const (
	VersionPending    = "PENDING"
	VersionInProgress = "IN_PROGRESS"
	VersionSuccessful = "SUCCESSFUL"
	VersionFailed     = "FAILED"
	VersionDeleted    = "DELETED"

	VersionActive   = "ACTIVE"
	VersionInactive = "INACTIVE"
)

// Build states (BuildState).
const (
	BuildPending    = "PENDING"
	BuildInProgress = "IN_PROGRESS"
	BuildSuccessful = "SUCCESSFUL"
	BuildFailed     = "FAILED"
)

// AccessKey is a SigV4 access key. Every key belongs to one account; all
// resources are scoped to the account of the key that signed the request.
type AccessKey struct {
	ID          string    `json:"accessKeyId"`
	Secret      string    `json:"-"`
	Account     string    `json:"account"`
	Description string    `json:"description,omitempty"`
	CreatedAt   time.Time `json:"createdAt"`
}

// IdlePolicy mirrors the API shape; all three fields are required when set.
type IdlePolicy struct {
	MaxIdleDurationSeconds   int64 `json:"maxIdleDurationSeconds"`
	SuspendedDurationSeconds int64 `json:"suspendedDurationSeconds"`
	AutoResumeEnabled        bool  `json:"autoResumeEnabled"`
}

// MicrovmHooks says which runtime hooks the app implements (ENABLED or
// DISABLED) and how long each may take.
type MicrovmHooks struct {
	Run                       string `json:"run,omitempty"`
	RunTimeoutInSeconds       *int64 `json:"runTimeoutInSeconds,omitempty"`
	Resume                    string `json:"resume,omitempty"`
	ResumeTimeoutInSeconds    *int64 `json:"resumeTimeoutInSeconds,omitempty"`
	Suspend                   string `json:"suspend,omitempty"`
	SuspendTimeoutInSeconds   *int64 `json:"suspendTimeoutInSeconds,omitempty"`
	Terminate                 string `json:"terminate,omitempty"`
	TerminateTimeoutInSeconds *int64 `json:"terminateTimeoutInSeconds,omitempty"`
}

// MicrovmImageHooks says which build-time hooks the app implements.
type MicrovmImageHooks struct {
	Ready                    string `json:"ready,omitempty"`
	ReadyTimeoutInSeconds    *int64 `json:"readyTimeoutInSeconds,omitempty"`
	Validate                 string `json:"validate,omitempty"`
	ValidateTimeoutInSeconds *int64 `json:"validateTimeoutInSeconds,omitempty"`
}

// Hooks is the hook configuration of an image version.
type Hooks struct {
	Port              *int64             `json:"port,omitempty"`
	MicrovmHooks      *MicrovmHooks      `json:"microvmHooks,omitempty"`
	MicrovmImageHooks *MicrovmImageHooks `json:"microvmImageHooks,omitempty"`
}

// CodeArtifact locates the code package (a zip with a Dockerfile).
type CodeArtifact struct {
	URI string `json:"uri"`
}

// CpuConfiguration names an architecture the image supports.
type CpuConfiguration struct {
	Architecture string `json:"architecture"`
}

// Resources holds the memory an image asks for.
type Resources struct {
	MinimumMemoryInMiB int64 `json:"minimumMemoryInMiB"`
}

// ImageConfig is what a version of an image is built from; it is the body of
// CreateMicrovmImage/UpdateMicrovmImage and is echoed in version outputs.
type ImageConfig struct {
	BaseImageArn             string             `json:"baseImageArn"`
	BaseImageVersion         string             `json:"baseImageVersion,omitempty"`
	BuildRoleArn             string             `json:"buildRoleArn"`
	CodeArtifact             *CodeArtifact      `json:"codeArtifact,omitempty"`
	Description              string             `json:"description,omitempty"`
	Logging                  json.RawMessage    `json:"logging,omitempty"`
	EgressNetworkConnectors  []string           `json:"egressNetworkConnectors,omitempty"`
	CpuConfigurations        []CpuConfiguration `json:"cpuConfigurations,omitempty"`
	Resources                []Resources        `json:"resources,omitempty"`
	AdditionalOsCapabilities []string           `json:"additionalOsCapabilities,omitempty"`
	Hooks                    *Hooks             `json:"hooks,omitempty"`
	EnvironmentVariables     map[string]string  `json:"environmentVariables,omitempty"`
}

// Image is a named microVM image in one account. Its versions are built
// from ImageConfigs; the latest successful, ACTIVE one is what RunMicrovm
// uses by default.
type Image struct {
	Account             string    `json:"account"`
	Name                string    `json:"name"`
	ARN                 string    `json:"arn"`
	State               string    `json:"state"`
	LatestVersion       string    `json:"latestVersion"` // newest version, whatever its state
	LatestActiveVersion string    `json:"latestActiveVersion,omitempty"`
	LatestFailedVersion string    `json:"latestFailedVersion,omitempty"`
	CreatedAt           time.Time `json:"createdAt"`
	UpdatedAt           time.Time `json:"updatedAt"`
}

// ImageVersion is one build target of an image ("1.0", "2.0", ...; see
// VersionName).
type ImageVersion struct {
	Account     string      `json:"account"`
	ImageName   string      `json:"imageName"`
	ImageARN    string      `json:"imageArn"`
	Version     string      `json:"version"`
	State       string      `json:"state"`
	Status      string      `json:"status"`
	StateReason string      `json:"stateReason,omitempty"`
	Config      ImageConfig `json:"config"`
	CreatedAt   time.Time   `json:"createdAt"`
	UpdatedAt   time.Time   `json:"updatedAt"`
	// Platform is the snapshot platform of the host its successful build
	// ran on (a template restores only on one of the same); "" when no
	// cluster node built it.
	Platform string `json:"platform,omitempty"`
}

// SnapshotBuild holds the sizes a finished build produced.
type SnapshotBuild struct {
	MemorySnapshotSizeInBytes *int64 `json:"memorySnapshotSizeInBytes,omitempty"`
	CodeInstallSizeInBytes    *int64 `json:"codeInstallSizeInBytes,omitempty"`
	DiskSnapshotSizeInBytes   *int64 `json:"diskSnapshotSizeInBytes,omitempty"`
}

// Build is one build of an image version (one per CPU configuration).
type Build struct {
	Account           string         `json:"account"`
	ImageName         string         `json:"imageName"`
	ImageARN          string         `json:"imageArn"`
	Version           string         `json:"version"`
	ID                string         `json:"buildId"`
	State             string         `json:"buildState"`
	Architecture      string         `json:"architecture"`
	Chipset           string         `json:"chipset"`
	ChipsetGeneration string         `json:"chipsetGeneration"`
	StateReason       string         `json:"stateReason,omitempty"`
	CreatedAt         time.Time      `json:"createdAt"`
	UpdatedAt         time.Time      `json:"updatedAt"`
	Snapshot          *SnapshotBuild `json:"snapshotBuild,omitempty"`
	// Recoveries counts the times a restart found this build IN_PROGRESS
	// and started it again (lifecycle.RedoBuilds); kept in the record so that a
	// build that kills kiln is not redone forever.
	Recoveries int `json:"recoveries,omitempty"`
	// Node names the host a cluster's control gave the build to ("" on a
	// single `kiln server`): a restart of control leaves a build to its
	// node while the node lives, and redoes it elsewhere when it is lost.
	Node string `json:"node,omitempty"`
	// Platform is that node's snapshot platform, recorded with Node: the
	// version takes it when the build succeeds (FinishVersion).
	Platform string `json:"platform,omitempty"`
}

// Microvm is one microVM record. DeadlineAt (StartedAt plus
// MaximumDurationInSeconds) and SuspendDeadlineAt (set when it becomes
// SUSPENDED and has an idle policy) are indexed so that the lifecycle
// controller can find the ones due with ListMicrovmsDue.
type Microvm struct {
	ID                       string          `json:"microvmId"`
	Account                  string          `json:"account"`
	ARN                      string          `json:"arn"`
	State                    MicrovmState    `json:"state"`
	StateReason              string          `json:"stateReason,omitempty"`
	Endpoint                 string          `json:"endpoint"`
	ImageName                string          `json:"imageName"`
	ImageARN                 string          `json:"imageArn"`
	ImageVersion             string          `json:"imageVersion"`
	ExecutionRoleArn         string          `json:"executionRoleArn,omitempty"`
	IdlePolicy               *IdlePolicy     `json:"idlePolicy,omitempty"`
	Logging                  json.RawMessage `json:"logging,omitempty"`
	RunHookPayload           string          `json:"runHookPayload,omitempty"`
	MaximumDurationInSeconds int64           `json:"maximumDurationInSeconds"`
	IngressNetworkConnectors []string        `json:"ingressNetworkConnectors,omitempty"`
	EgressNetworkConnectors  []string        `json:"egressNetworkConnectors,omitempty"`
	StartedAt                time.Time       `json:"startedAt"`
	UpdatedAt                time.Time       `json:"updatedAt"`
	TerminatedAt             *time.Time      `json:"terminatedAt,omitempty"`
	SuspendedAt              *time.Time      `json:"suspendedAt,omitempty"`
	DeadlineAt               time.Time       `json:"deadlineAt"`
	SuspendDeadlineAt        *time.Time      `json:"suspendDeadlineAt,omitempty"`
	// MemoryMiB and VCPUs are the guest size the microVM runs with, fixed
	// at RunMicrovm from its image version; the account's memory and vCPU
	// quotas add them up (0 in records older than quotas).
	MemoryMiB int64 `json:"memoryMiB,omitempty"`
	VCPUs     int64 `json:"vcpus,omitempty"`
	// PendingOp names an operation accepted but not reflected in State yet
	// ("resume": a SUSPENDED microVM being resumed), so that recovery after
	// a crash can finish it.
	PendingOp string `json:"pendingOp,omitempty"`
	// Epoch is the microVM's placement epoch: whoever places it on a host
	// (again) increments it, and a state report made under an older
	// placement is refused (AtEpoch), so that a host that lost the
	// microVM cannot overwrite what the new one reports.
	Epoch int64 `json:"epoch,omitempty"`
	// Node names the host the microVM is placed on (store.Node); "" on a
	// single `kiln server`, whose one engine runs every microVM.
	Node string `json:"node,omitempty"`
	// Hooks and VersionLogging are its image version's hook settings and
	// logging, copied at RunMicrovm so that whatever runs the microVM has
	// everything it needs in the record it is handed (a cluster's node
	// does not read image versions). RunMicrovm sets Hooks non-nil even
	// when the version has none; nil marks an older record, for which the
	// engine asks its control plane (LegacyVersionSettings).
	Hooks          *Hooks          `json:"hooks,omitempty"`
	VersionLogging json.RawMessage `json:"versionLogging,omitempty"`
	// Platform is its version's snapshot platform, copied at RunMicrovm
	// so that placement needs no read of builds or nodes; "" (any host)
	// on a single `kiln server` and for versions built before it was kept.
	Platform string `json:"platform,omitempty"`
	// OnDeadline is what the deadline controller does when DeadlineAt
	// passes: "" terminates (the AWS API's maximumDurationInSeconds);
	// DeadlineSuspend suspends a RUNNING microVM instead (E2B's autoPause)
	// and gives it SuspendedRetention more before it is terminated.
	OnDeadline string `json:"onDeadline,omitempty"`
}

// DeadlineSuspend is Microvm.OnDeadline for a microVM suspended, not
// terminated, when its deadline passes.
const DeadlineSuspend = "suspend"

// ErrStaleEpoch is returned (wrapped, with errdefs.ErrConflict) by a change
// made through AtEpoch when the record moved to another placement epoch.
var ErrStaleEpoch = errors.New("stale placement epoch")

// AtEpoch wraps a change for UpdateMicrovm so that it applies only while
// the record is still at placement epoch: UpdateMicrovm runs it inside the
// record's transaction, so the check and the write are one compare-and-set.
// Otherwise it refuses with ErrStaleEpoch and errdefs.ErrConflict.
func AtEpoch(epoch int64, change func(*Microvm) error) func(*Microvm) error {
	return func(m *Microvm) error {
		if m.Epoch != epoch {
			return fmt.Errorf("microvm %s: report from placement epoch %d, record is at %d: %w", m.ID, epoch, m.Epoch,
				errors.Join(ErrStaleEpoch, errdefs.ErrConflict))
		}
		return change(m)
	}
}

// ClientToken records an idempotent request: the same (account, operation,
// token) with the same InputHash returns ResourceID's current state; with a
// different hash it is a conflict.
type ClientToken struct {
	Account    string    `json:"account"`
	Operation  string    `json:"operation"`
	Token      string    `json:"token"`
	InputHash  string    `json:"inputHash"`
	ResourceID string    `json:"resourceId"`
	CreatedAt  time.Time `json:"createdAt"`
}

// Page asks for one page of a list: at most Limit items after the position
// encoded in Token (empty: from the start). Lists return the token of the
// next page, or "" after the last one.
type Page struct {
	Limit int
	Token string
}

// MicrovmFilter narrows ListMicrovms; empty fields match everything.
type MicrovmFilter struct {
	ImageName    string
	ImageVersion string
	States       []MicrovmState
}

// SettingOperatorAccount names the operator's account: the one that may
// build from host paths. It is recorded when the first admin key is made
// and never derived from keys, so deleting a key promotes nobody.
const SettingOperatorAccount = "operator_account"

// Store is kiln's state. Implementations must be safe for concurrent use.
type Store interface {
	EventStore
	UsageStore
	E2BKeyStore

	// Close releases the database. Calls after Close fail.
	Close() error

	// CreateAccessKey stores a new key; ErrConflict if the id exists.
	CreateAccessKey(ctx context.Context, k AccessKey) error
	// GetAccessKey returns the key with its secret; ErrNotFound if absent.
	GetAccessKey(ctx context.Context, id string) (AccessKey, error)
	// ListAccessKeys returns every key (secrets included), oldest first.
	ListAccessKeys(ctx context.Context) ([]AccessKey, error)
	// DeleteAccessKey removes a key; ErrNotFound if absent.
	DeleteAccessKey(ctx context.Context, id string) error
	// Implementations keep the secrets of access keys sealed at rest
	// (internal/store/seal): what CreateAccessKey is given and what Get
	// and List return is the plain secret.

	// GetSetting returns a setting kiln recorded (SettingOperatorAccount);
	// ErrNotFound if never set.
	GetSetting(ctx context.Context, name string) (string, error)
	// SetSetting records a setting durably, replacing an earlier value.
	SetSetting(ctx context.Context, name, value string) error

	// GetClientToken returns a recorded token; ErrNotFound if unused.
	GetClientToken(ctx context.Context, account, operation, token string) (ClientToken, error)

	// CreateImage stores a new image with its first version and that
	// version's builds, and tok if not nil, in one transaction. ErrConflict
	// if the name exists in the account or tok was already recorded.
	CreateImage(ctx context.Context, img Image, v ImageVersion, builds []Build, tok *ClientToken) error
	// GetImage returns an image by name; ErrNotFound if absent.
	GetImage(ctx context.Context, account, name string) (Image, error)
	// ListImages pages through an account's images, oldest first, whose
	// name contains nameFilter.
	ListImages(ctx context.Context, account, nameFilter string, p Page) ([]Image, string, error)
	// DeleteImage removes an image, its versions, builds, build logs and
	// tags; ErrNotFound if absent.
	DeleteImage(ctx context.Context, account, name string) error

	// CreateImageVersion adds the next version of an existing image: it
	// numbers v (v.Version is ignored), stores it with its builds (their
	// Version is set too), moves the image to img.State=UPDATING and records
	// tok, all in one transaction. ErrNotFound if the image is absent,
	// ErrConflict if tok was already recorded.
	CreateImageVersion(ctx context.Context, v ImageVersion, builds []Build, tok *ClientToken) (ImageVersion, []Build, error)
	// GetImageVersion returns a version; ErrNotFound if absent.
	GetImageVersion(ctx context.Context, account, image, version string) (ImageVersion, error)
	// ListImageVersions pages through an image's versions, oldest first.
	ListImageVersions(ctx context.Context, account, image string, p Page) ([]ImageVersion, string, error)
	// UpdateImageVersion replaces a version's record and, in the same
	// transaction, recomputes its image's latestActiveImageVersion (the
	// newest version SUCCESSFUL and ACTIVE); ErrNotFound if absent.
	UpdateImageVersion(ctx context.Context, v ImageVersion) error
	// DeleteImageVersion removes a version with its builds and their logs
	// and, in the same transaction, recomputes its image's
	// latestActiveImageVersion and fails the image if it was building
	// that version.
	DeleteImageVersion(ctx context.Context, account, image, version string) error

	// GetBuild returns a build; ErrNotFound if absent.
	GetBuild(ctx context.Context, account, image, version, buildID string) (Build, error)
	// ListBuilds pages through a version's builds, oldest first.
	ListBuilds(ctx context.Context, account, image, version string, p Page) ([]Build, string, error)
	// ListBuildsInState returns builds of every account in one of states
	// (for recovery after a restart).
	ListBuildsInState(ctx context.Context, states ...string) ([]Build, error)
	// UpdateBuild replaces a build's record; ErrNotFound if absent.
	UpdateBuild(ctx context.Context, b Build) error
	// StartBuild records b as IN_PROGRESS (whatever b.State says) and moves
	// its version from PENDING to IN_PROGRESS (taking b.UpdatedAt), in one
	// transaction, so that a late or repeated start never brings back a
	// build that finished, nor overwrites its version's newer record.
	// Starting an IN_PROGRESS build again (a redo after a restart) is
	// allowed. ErrNotFound if the build is absent; ErrConflict, changing
	// nothing, if it is final.
	StartBuild(ctx context.Context, b Build) error
	// FinishBuild records a final build (b.State SUCCESSFUL or FAILED)
	// and, when it is the last of its version's builds to become final,
	// the version's and the image's outcome (FinishVersion), in one
	// transaction: concurrent finishes of a version's builds, from any
	// number of processes, finalise the version exactly once; the version
	// and image take b.UpdatedAt as their update time. It reports
	// whether this call finalised it. ErrNotFound if the build is absent;
	// ErrConflict, changing nothing, if it was final already.
	FinishBuild(ctx context.Context, b Build) (finalised bool, err error)
	// AppendBuildLog appends output to a build's log. Unlike other writes
	// it need not be durable on return (it may be durable only with the
	// next write): a crash may lose the last chunks of a log, never
	// another record. Callers batch output (internal/engine flushes at
	// most every second or 256 KiB) and cap it.
	AppendBuildLog(ctx context.Context, buildID string, data []byte) error
	// ReadBuildLog returns at most limit bytes of a build's log from offset.
	ReadBuildLog(ctx context.Context, buildID string, offset int64, limit int) ([]byte, error)

	// CreateMicrovm stores a new microVM and tok if not nil, in one
	// transaction; ErrConflict if the id or tok exists.
	CreateMicrovm(ctx context.Context, m Microvm, tok *ClientToken) error
	// GetMicrovm returns a microVM of the account; ErrNotFound if absent.
	GetMicrovm(ctx context.Context, account, id string) (Microvm, error)
	// ListMicrovms pages through an account's microVMs, oldest first.
	ListMicrovms(ctx context.Context, account string, f MicrovmFilter, p Page) ([]Microvm, string, error)
	// ListMicrovmsInState returns microVMs of every account in one of
	// states, at most limit (for recovery and the lifecycle controller).
	ListMicrovmsInState(ctx context.Context, limit int, states ...MicrovmState) ([]Microvm, error)
	// ListMicrovmsDue returns microVMs, of every account, not TERMINATED or
	// TERMINATING whose DeadlineAt has passed, and SUSPENDED ones whose
	// SuspendDeadlineAt has passed, at most limit.
	ListMicrovmsDue(ctx context.Context, now time.Time, limit int) ([]Microvm, error)
	// CountMicrovms counts an account's microVMs that are not TERMINATED.
	CountMicrovms(ctx context.Context, account string) (int, error)
	// CreateMicrovmWithinQuota is CreateMicrovm that first checks, in the
	// same transaction, that one more microVM with m.MemoryMiB and m.VCPUs
	// fits the account's quota (adm.Defaults with its QuotaOverride);
	// a *QuotaError (errdefs.ErrExhausted) if not, and nothing is stored.
	// Concurrent calls never pass a limit together.
	CreateMicrovmWithinQuota(ctx context.Context, m Microvm, tok *ClientToken, adm Admission) error
	// CreateImageWithinQuota and CreateImageVersionWithinQuota are
	// CreateImage and CreateImageVersion that first check, in the same
	// transaction, that len(builds) more concurrent builds fit the
	// account's Builds quota and that its storage is not over its
	// StorageBytes quota; a *QuotaError if not.
	CreateImageWithinQuota(ctx context.Context, img Image, v ImageVersion, builds []Build, tok *ClientToken, adm Admission) error
	CreateImageVersionWithinQuota(ctx context.Context, v ImageVersion, builds []Build, tok *ClientToken, adm Admission) (ImageVersion, []Build, error)

	// QuotaUsage returns what an account uses of each quota, as the store
	// sees it (QuotaUse.StorageBytes = QuotaUse.SnapshotBytes plus the
	// account's uploads in the store).
	QuotaUsage(ctx context.Context, account string) (QuotaUse, error)
	// GetQuotaOverride returns the limits set for an account (all nil if
	// none were).
	GetQuotaOverride(ctx context.Context, account string) (QuotaOverride, error)
	// SetQuotaOverride records an account's limits durably, replacing what
	// was set; an override with every field nil removes it.
	SetQuotaOverride(ctx context.Context, account string, o QuotaOverride) error
	// ListQuotaOverrides returns every account's override.
	ListQuotaOverrides(ctx context.Context) (map[string]QuotaOverride, error)
	// UpdateMicrovm reads a microVM, checks that its state is one of from
	// (any state if from is empty), applies change and writes it back, in
	// one transaction: the compare-and-set every state transition goes
	// through. ErrNotFound if absent; ErrConflict (wrapped, naming the state)
	// if the state is not in from, or if change returns an error wrapping it.
	// Returns the record as written.
	UpdateMicrovm(ctx context.Context, account, id string, from []MicrovmState, change func(*Microvm) error) (Microvm, error)

	// CountMicrovmsByState counts the microVMs of every account by state
	// (for metrics).
	CountMicrovmsByState(ctx context.Context) (map[MicrovmState]int, error)
	// DeleteTerminatedMicrovms removes TERMINATED microVMs, of every
	// account, terminated before cutoff, with their tags, and returns how
	// many went. Records in any other state are never touched.
	DeleteTerminatedMicrovms(ctx context.Context, cutoff time.Time) (int, error)
	// DeleteClientTokens removes idempotency tokens recorded before cutoff
	// and returns how many went; a request retried with one after that
	// is a new request.
	DeleteClientTokens(ctx context.Context, cutoff time.Time) (int, error)
	// ListAllImageVersions pages through the image versions of every
	// account, oldest first (for garbage collection).
	ListAllImageVersions(ctx context.Context, p Page) ([]ImageVersion, string, error)

	// GetTags returns the tags of a resource ARN (empty map if none).
	GetTags(ctx context.Context, account, arn string) (map[string]string, error)
	// TagResource adds or replaces tags of a resource ARN; it changes
	// nothing and returns a *TooManyTagsError if the resource would have
	// more than MaxTags tags.
	TagResource(ctx context.Context, account, arn string, tags map[string]string) error
	// UntagResource removes tags of a resource ARN; absent keys are ignored.
	UntagResource(ctx context.Context, account, arn string, keys []string) error
}

// MaxTags bounds the tags of one resource, as AWS does.
const MaxTags = 50

// TooManyTagsError is TagResource's refusal; it wraps errdefs.ErrExhausted.
type TooManyTagsError struct{ Have int }

func (e *TooManyTagsError) Error() string {
	return fmt.Sprintf("a resource may have at most %d tags (would have %d)", MaxTags, e.Have)
}

func (e *TooManyTagsError) Unwrap() error { return errdefs.ErrExhausted }

// transitions lists the states each state may move to.
var transitions = map[MicrovmState][]MicrovmState{
	StatePending:     {StateRunning, StateTerminating, StateTerminated},
	StateRunning:     {StateSuspending, StateTerminating, StateTerminated},
	StateSuspending:  {StateSuspended, StateRunning, StateTerminating, StateTerminated},
	StateSuspended:   {StateRunning, StateTerminating, StateTerminated},
	StateTerminating: {StateTerminated},
}

// Allowed reports whether a microVM may move from one state to another
// (PENDING → RUNNING ⇄ SUSPENDING → SUSPENDED → RUNNING, and TERMINATING →
// TERMINATED from any of them). SUSPENDING → RUNNING is a failed suspend.
func Allowed(from, to MicrovmState) bool {
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// SetState moves m to state with reason at now and keeps the derived fields
// (suspension deadline, termination time) consistent. It does not check
// Allowed; callers do, through Store.UpdateMicrovm's from list.
func (m *Microvm) SetState(to MicrovmState, reason string, now time.Time) {
	m.State = to
	m.StateReason = reason
	m.UpdatedAt = now
	switch to {
	case StateSuspended:
		t := now
		m.SuspendedAt = &t
		if m.IdlePolicy != nil {
			d := now.Add(time.Duration(m.IdlePolicy.SuspendedDurationSeconds) * time.Second)
			m.SuspendDeadlineAt = &d
		}
	case StateRunning:
		m.SuspendedAt, m.SuspendDeadlineAt, m.PendingOp = nil, nil, ""
	case StateTerminated:
		t := now
		m.TerminatedAt = &t
		m.SuspendDeadlineAt, m.PendingOp = nil, ""
	}
}

// BuildFinal reports whether no transition leaves a build state.
func BuildFinal(state string) bool { return state == BuildSuccessful || state == BuildFailed }

// FinishVersion decides, from all the builds of v (final ones included),
// the outcome of v and its image once every build is final, and reports
// false, changing nothing, while one is still PENDING or IN_PROGRESS.
// SUCCESSFUL versions become the image's latestActiveImageVersion (image
// CREATED or UPDATED), failed ones its latestFailedImageVersion
// (CREATE_FAILED/UPDATE_FAILED). Stores call it inside FinishBuild's
// transaction.
func FinishVersion(builds []Build, v *ImageVersion, img *Image, now time.Time) bool {
	failed := ""
	for _, x := range builds {
		switch x.State {
		case BuildPending, BuildInProgress:
			return false
		case BuildSuccessful:
			if x.Platform != "" {
				v.Platform = x.Platform
			}
		case BuildFailed:
			failed = x.StateReason
			if failed == "" {
				failed = "build " + x.ID + " failed"
			}
		}
	}
	v.UpdatedAt = now
	if failed == "" {
		v.State, v.StateReason = VersionSuccessful, ""
	} else {
		v.State, v.StateReason = VersionFailed, failed
	}
	img.UpdatedAt = now
	SettleImage(img, *v)
	if failed == "" {
		img.LatestActiveVersion = v.Version
	}
	return true
}

// SettleImage gives an image the outcome of its version v, which is
// final (SUCCESSFUL or FAILED): CREATED or UPDATED, or CREATE_FAILED or
// UPDATE_FAILED with v as its latestFailedImageVersion, by whether the
// image was being created.
func SettleImage(img *Image, v ImageVersion) {
	first := img.State == ImageCreating
	switch {
	case v.State == VersionSuccessful && first:
		img.State = ImageCreated
	case v.State == VersionSuccessful:
		img.State = ImageUpdated
	case first:
		img.State, img.LatestFailedVersion = ImageCreateFailed, v.Version
	default:
		img.State, img.LatestFailedVersion = ImageUpdateFailed, v.Version
	}
}

// VersionName names an image's nth version as AWS does: the major.minor
// string ("1.0" for the first; AWS's own examples pass --image-version
// 1.0). Each CreateMicrovmImage or UpdateMicrovmImage is a new major;
// kiln has no minor releases, so the minor is always 0.
func VersionName(n int64) string { return strconv.FormatInt(n, 10) + ".0" }

// VersionAliases lists the names a version may be stored under, the asked
// one first: kiln numbered versions "1", "2", ... before it followed AWS,
// and records made then keep their names, so "1" and "1.0" name the same
// version whichever form the store holds.
func VersionAliases(v string) []string {
	if major, ok := strings.CutSuffix(v, ".0"); ok && isDigits(major) {
		return []string{v, major}
	}
	if isDigits(v) {
		return []string{v, v + ".0"}
	}
	return []string{v}
}

func isDigits(s string) bool {
	if s == "" || len(s) > 18 {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}
