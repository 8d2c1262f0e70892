package store

import (
	"context"
	"time"
)

// E2BKey is an API key of the E2B-compatible API (internal/e2b). Only its
// SHA-256 is stored: the key is 160 random bits, so the hash cannot be
// reversed or guessed, and a copy of the database gives no usable key.
type E2BKey struct {
	// Hash is the lower-case hex SHA-256 of the whole key.
	Hash    string
	Account string
	// Prefix is the key's first characters, to tell keys apart in lists.
	Prefix      string
	Description string
	CreatedAt   time.Time
}

// E2BSandbox is what the E2B API keeps about a sandbox beyond its microVM
// record (same id, same account): the template name it was asked for, its
// metadata and the environment variables envd gives every process.
type E2BSandbox struct {
	ID         string
	Account    string
	TemplateID string
	Metadata   map[string]string
	EnvVars    map[string]string
	// AllowOut and DenyOut are the sandbox's egress rules (IPv4 CIDR
	// blocks), as last applied to its VM.
	AllowOut []string
	DenyOut  []string
	// Traffic is how its ports are reached at PORT-ID.DOMAIN without a
	// kiln endpoint token: "public", "token" (its traffic access token),
	// or "" (not at all). Fixed at create.
	Traffic   string
	CreatedAt time.Time
}

// E2BKeyStore holds the E2B API's keys. Every Store has it, so that
// `kiln keys create --e2b` works whichever store the server runs on.
type E2BKeyStore interface {
	// CreateE2BKey stores a key; ErrConflict if its hash exists.
	CreateE2BKey(ctx context.Context, k E2BKey) error
	// GetE2BKey returns the key with this hash; ErrNotFound if absent.
	GetE2BKey(ctx context.Context, hash string) (E2BKey, error)
}

// E2BStore holds the E2B API's keys, sandboxes, templates' tags and
// builds, and snapshots. It is apart from Store so that a store without it
// still serves the AWS API.
type E2BStore interface {
	E2BKeyStore
	E2BTemplateStore
	// PutE2BSandbox records a sandbox (replacing an earlier record of the
	// same account; another account's record is left as it is).
	PutE2BSandbox(ctx context.Context, sb E2BSandbox) error
	// GetE2BSandbox returns the account's sandbox; ErrNotFound if absent.
	GetE2BSandbox(ctx context.Context, account, id string) (E2BSandbox, error)
	// ListE2BSandboxes returns the account's sandboxes whose microVM is
	// not TERMINATED, oldest first, at most limit. A sandbox's record goes
	// when its microVM's record is deleted.
	ListE2BSandboxes(ctx context.Context, account string, limit int) ([]E2BSandbox, error)
}

// MaxE2BTags bounds the tags of one template: Sandbox.create of NAME:TAG
// reads them, and a tenant should not grow a table without end.
const MaxE2BTags = 64

// E2BTag names one build of an account's template (E2B's NAME:TAG).
type E2BTag struct {
	Tag string
	// BuildID is the E2B build id, Version the image version it made.
	BuildID   string
	Version   string
	CreatedAt time.Time
}

// E2BBuild is a template build the E2B API was asked for: which image
// version it became once started.
type E2BBuild struct {
	ID       string
	Account  string
	Template string
	// Tags name the build once it starts.
	Tags     []string
	MemoryMB int64
	CPUCount int64
	// Version is the image version the build made; "" until started.
	Version   string
	CreatedAt time.Time
}

// E2BSnapshot is what the E2B API keeps about a snapshot beyond its image
// (same account, same name): the sandbox it came from and the env vars
// envd gives the processes of sandboxes made from it.
type E2BSnapshot struct {
	Account    string
	Name       string
	SandboxID  string
	TemplateID string
	EnvVars    map[string]string
	CreatedAt  time.Time
}

// E2BSnapshotQuery selects an account's snapshots: those of one sandbox
// or of one name ("" any), after the snapshot named After ("" from the
// oldest), at most Limit.
type E2BSnapshotQuery struct {
	SandboxID string
	Name      string
	After     string
	Limit     int
}

// E2BTemplateStore holds what the E2B API adds to templates (tags,
// builds) and snapshots (their origin), so that every replica of a
// cluster's control plane sees the same. Every record is its account's:
// no call reads or changes another account's. The records of a template
// or snapshot go when its image's record is deleted, however it is.
type E2BTemplateStore interface {
	// AssignE2BTags points tags of the account's template at a build (its
	// id and image version) in one transaction: all or none. ErrExhausted
	// if the template would have more than MaxE2BTags tags.
	AssignE2BTags(ctx context.Context, account, template string, tags []string, buildID, version string, at time.Time) error
	// RemoveE2BTags removes tags of the template, all or none: ErrNotFound
	// (naming the tag) if one is not a tag of it.
	RemoveE2BTags(ctx context.Context, account, template string, tags []string) error
	// GetE2BTag returns one tag of the template; ErrNotFound if absent.
	GetE2BTag(ctx context.Context, account, template, tag string) (E2BTag, error)
	// ListE2BTags returns the template's tags, by tag.
	ListE2BTags(ctx context.Context, account, template string) ([]E2BTag, error)

	// CreateE2BBuild records a build; ErrConflict if the account has one
	// of that id.
	CreateE2BBuild(ctx context.Context, b E2BBuild) error
	// GetE2BBuild returns the account's build; ErrNotFound if absent.
	GetE2BBuild(ctx context.Context, account, id string) (E2BBuild, error)
	// StartE2BBuild records the image version a build made, once:
	// ErrConflict if it was started already, ErrNotFound if absent.
	StartE2BBuild(ctx context.Context, account, id, version string) error
	// E2BBuildOfVersion returns the build that made an image version of
	// the template; ErrNotFound if none did (it was built another way).
	E2BBuildOfVersion(ctx context.Context, account, template, version string) (E2BBuild, error)

	// PutE2BSnapshot records a snapshot, replacing the account's record of
	// that name.
	PutE2BSnapshot(ctx context.Context, sn E2BSnapshot) error
	// GetE2BSnapshot returns the account's snapshot while its image
	// exists; ErrNotFound otherwise.
	GetE2BSnapshot(ctx context.Context, account, name string) (E2BSnapshot, error)
	// ListE2BSnapshots returns the account's snapshots whose image exists,
	// oldest first (then by name), as q selects.
	ListE2BSnapshots(ctx context.Context, account string, q E2BSnapshotQuery) ([]E2BSnapshot, error)
	// DeleteE2BSnapshot drops the account's snapshot record (none: nil).
	DeleteE2BSnapshot(ctx context.Context, account, name string) error
}
