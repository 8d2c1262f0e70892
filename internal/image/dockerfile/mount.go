package dockerfile

import (
	"errors"
	"fmt"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
)

// MountType is a RUN --mount type that kiln supports.
type MountType string

const (
	// MountCache is a folder kept between builds of the same account,
	// never part of the image.
	MountCache MountType = "cache"
	// MountBind shows files of the build context during the step.
	MountBind MountType = "bind"
	// MountTmpfs is an empty in-memory folder for the step.
	MountTmpfs MountType = "tmpfs"
)

// Cache sharing modes (BuildKit's sharing=).
const (
	SharingShared  = "shared"
	SharingPrivate = "private"
	SharingLocked  = "locked"
)

// Mount is one RUN --mount, with its words as written (Step.Expand
// substitutes variables in Target, Source and ID).
type Mount struct {
	Type MountType
	// Target is where the step sees the mount; a relative one is
	// relative to WORKDIR.
	Target string
	// Source is, for bind, the path in the build context; "" is its root.
	Source   string
	ReadOnly bool
	// ID names a cache; "" = the target.
	ID string
	// Sharing is the cache's sharing mode; "" = shared.
	Sharing string
	// Mode, UID and GID are the owner and mode of a cache's folder when
	// it is first made (BuildKit's defaults: 0755, root).
	Mode     uint32
	UID, GID uint32
	// SizeBytes bounds a tmpfs; 0 = kiln's default.
	SizeBytes int64
}

// supportedMounts is what the errors for refused mounts list.
const supportedMounts = "kiln supports type=cache, type=bind (from the build context) and type=tmpfs"

// runMounts reads a RUN's --mount flags with BuildKit's own parser (the
// same keys, defaults and checks), then keeps what kiln supports. Values
// are kept as written: the parser's expander here returns them as they
// are, and Step.Expand substitutes variables once the stage's environment
// is known. So a variable in type, mode, uid or gid (which BuildKit
// would expand) is refused here.
func runMounts(c *instructions.RunCommand) ([]Mount, error) {
	if err := c.Expand(func(w string) (string, error) { return w, nil }); err != nil {
		return nil, fmt.Errorf("RUN --mount: %v (%s)", err, supportedMounts)
	}
	var out []Mount
	for _, m := range instructions.GetMounts(c) {
		if m == nil {
			return nil, errors.New("RUN --mount: empty mount")
		}
		km := Mount{Type: MountType(m.Type), Target: m.Target, Source: m.Source, ReadOnly: m.ReadOnly, ID: m.CacheID, Sharing: string(m.CacheSharing), Mode: 0o755, SizeBytes: m.SizeLimit}
		switch km.Type {
		case MountCache, MountBind, MountTmpfs:
		default:
			return nil, fmt.Errorf("RUN --mount=type=%s is not supported: %s", m.Type, supportedMounts)
		}
		if m.From != "" {
			return nil, fmt.Errorf("RUN --mount=type=%s,from=%s is not supported: kiln mounts files of the build context only; leave out from=, or COPY --from=%s what the step needs", m.Type, m.From, m.From)
		}
		if m.Target == "" {
			return nil, fmt.Errorf("RUN --mount=type=%s: target= is required (where the step sees the mount)", m.Type)
		}
		if km.Type != MountBind && km.Source != "" {
			return nil, fmt.Errorf("RUN --mount=type=%s: source= applies to type=bind only", m.Type)
		}
		if km.Type != MountCache && km.ID != "" {
			return nil, fmt.Errorf("RUN --mount=type=%s: id= applies to type=cache only", m.Type)
		}
		if m.Mode != nil {
			km.Mode = uint32(*m.Mode)
		}
		if km.Mode > 0o7777 {
			return nil, fmt.Errorf("RUN --mount: mode=%o is not a file mode (at most 7777)", km.Mode)
		}
		if m.UID != nil {
			km.UID = uint32(*m.UID)
		}
		if m.GID != nil {
			km.GID = uint32(*m.GID)
		}
		if km.SizeBytes < 0 {
			return nil, fmt.Errorf("RUN --mount=type=tmpfs: size must not be negative")
		}
		out = append(out, km)
	}
	return out, nil
}
