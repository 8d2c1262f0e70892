// Package image builds a microVM image's root disk from a code package
// and its Dockerfile.
//
// The Dockerfile's host-side steps (COPY, ADD, WORKDIR, ENV, USER, …) run
// on a root folder on the host, written only through internal/image/layer;
// RUN steps run inside a build microVM booted from the root being built,
// behind the Runner interface that the VM engine implements. Every step's
// result is cached under DATA_DIR/image-cache, per account, by a key of its
// inputs, so an unchanged rebuild by the same account reuses it. The result is an image Config and a
// read-only ext4 root disk.
package image

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
)

// RunStep is one RUN instruction, resolved for execution.
type RunStep struct {
	// Args is the full argv: for the shell form the SHELL (default
	// ["/bin/sh", "-c"]) with the command line appended.
	Args []string
	// Env is the environment, KEY=VALUE: the stage's ENV plus ARG values.
	Env []string
	// WorkDir is the absolute working directory. It may not exist yet in
	// the root; the runner creates it (mkdir -p, owned by root) first.
	WorkDir string
	// User is USER as written ("" = root). The builder has checked that
	// the root names it; runners hand it to the guest agent, which
	// resolves it in that root as runc does (supplementary groups from
	// /etc/group unless a group is given).
	User string
	// Timeout bounds the step; the runner kills the command and fails
	// when it expires.
	Timeout time.Duration
	// Line and Instruction identify the step in logs.
	Line        int
	Instruction string
	// Mounts are the step's RUN --mount flags, resolved: the runner shows
	// each at its Target while the command runs and leaves nothing of
	// them in the root but the mount point.
	Mounts []RunMount
}

// RunMount is one RUN --mount, resolved for the runner.
type RunMount struct {
	Type dockerfile.MountType
	// Target is absolute and clean, never "/".
	Target   string
	ReadOnly bool
	// Disk (cache and bind) is a raw ext4 image the runner attaches to
	// the build VM and the guest mounts: for a cache the account's own,
	// kept across builds (the builder holds its lock during Run), for a
	// bind one made for this step from the build context. The host never
	// reads what a guest wrote to it.
	Disk string
	// Sub is the path in Disk's file system shown at Target; "" = its
	// root.
	Sub string
	// Fresh says Disk was just made: its root folder gets Mode, UID and
	// GID (BuildKit sets a cache's owner and mode when it creates it).
	Fresh          bool
	Mode, UID, GID uint32
	// SizeBytes bounds a tmpfs; 0 = the kernel's default.
	SizeBytes int64
	// Name says which mount it is in messages ("cache apt").
	Name string
}

// MountError is a mount of a RUN step that the build VM could not set up.
type MountError struct {
	Index int // in RunStep.Mounts
	Err   error
}

func (e *MountError) Error() string { return "RUN --mount: " + e.Err.Error() }
func (e *MountError) Unwrap() error { return e.Err }

// MountFullError says a cache mount had no room left when the step failed.
type MountFullError struct {
	Err       error // the step's own failure
	Name      string
	Target    string
	SizeBytes uint64
}

func (e *MountFullError) Error() string {
	return fmt.Sprintf("%v; the %s mounted at %s is full: %d MiB is kiln's limit for one cache mount; clean it up in the step (or use another id=)",
		e.Err, e.Name, e.Target, e.SizeBytes>>20)
}
func (e *MountFullError) Unwrap() error { return e.Err }

// Runner runs RUN steps inside build microVMs. The VM engine implements it.
type Runner interface {
	// Run boots a build microVM whose root file system is the ext4 image
	// rootDisk, runs step in it with egress to the internet (so apt-get
	// works), streams the command's stdout and stderr to log as they
	// arrive, shuts the VM down cleanly (file system synced and
	// unmounted, so the image is consistent), and returns the path of the
	// resulting root disk.
	//
	// rootDisk is a private, writable copy owned by the builder: the
	// runner may change it in place and return the same path, or write a
	// new image and return that path (the builder then owns and removes
	// both). The image has free space for the step (the builder sizes it).
	// The root may lack kiln-agent (FROM scratch, OCI bases): the runner
	// provides its agent itself (e.g. from an initramfs) and must not
	// leave files of its own in the root.
	//
	// A command that exits non-zero returns an error wrapping
	// *ExitError. Cancelling ctx stops the VM and returns ctx's error.
	// Run is called for one step at a time per build; different builds
	// may call it concurrently.
	Run(ctx context.Context, rootDisk string, step RunStep, log io.Writer) (newRootDisk string, err error)
}

// ExitError reports a RUN command that exited non-zero.
type ExitError struct {
	Code int
}

func (e *ExitError) Error() string { return "command exited with status " + strconv.Itoa(e.Code) }

// Config is the runtime configuration of a built image, as the Dockerfile
// (and the base image) left it. The VM engine starts the app from it.
type Config struct {
	Env          []string          `json:"env"`
	User         string            `json:"user,omitempty"`
	WorkingDir   string            `json:"workingDir,omitempty"`
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	ExposedPorts []string          `json:"exposedPorts,omitempty"` // "8080/tcp"
	StopSignal   string            `json:"stopSignal,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	Shell        []string          `json:"shell,omitempty"`
}

// Argv is the command the image starts: ENTRYPOINT followed by CMD.
func (c Config) Argv() []string {
	return append(append([]string(nil), c.Entrypoint...), c.Cmd...)
}

// ResolvedBase is a FROM resolved to a root and a config.
type ResolvedBase struct {
	// Key identifies the base's content (a managed base version, an OCI
	// image digest); it seeds the stage's cache keys.
	Key string
	// Shared says the base is one kiln built from its own configured
	// sources (a managed base), not from anything a tenant supplied or
	// chose the content of, so its cache entry may serve every account.
	// Leave it false for archives and registry images.
	Shared bool
	// Config is the base image's runtime config.
	Config Config
	// Materialize writes the base's root into dst, an empty folder.
	Materialize func(ctx context.Context, dst string) error
	// Release, if set, frees what reading the base needs (an unpacked
	// archive). The builder calls it exactly once when done with the
	// base, whether or not it called Materialize.
	Release func()
}

// BaseResolver turns a FROM (other than scratch or an earlier stage) into
// a base. contextDir is the build context (oci-archive paths are relative
// to it). internal/image/base implements it for managed, OCI archive and
// registry bases.
type BaseResolver interface {
	Resolve(ctx context.Context, b dockerfile.Base, contextDir string) (ResolvedBase, error)
}
