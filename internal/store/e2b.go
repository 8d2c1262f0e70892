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

// E2BStore holds the E2B API's keys and sandboxes. The sandboxes are apart
// from Store so that a store without them still serves the AWS API.
type E2BStore interface {
	E2BKeyStore
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
