package proto

import (
	"fmt"
	"path"
	"strings"
)

// File operations and directory watches (E2B's envd filesystem calls).
const (
	TypeFileOp     Type = "file_op"
	TypeWatchOpen  Type = "watch_open"
	TypeWatchRead  Type = "watch_read"
	TypeWatchClose Type = "watch_close"
)

// Operations of FileOpRequest.
const (
	OpMkdir  = "mkdir"
	OpMove   = "move"
	OpRemove = "remove"
)

// FileOpRequest changes the guest's file system as User (see
// ExecRequest.User; "" is root): the agent acts with the user's file
// system uid, gid and groups, so the kernel checks the user's
// permissions and new files belong to the user.
//
//   - OpMkdir makes Path and its missing parents; Created is false when
//     Path already was a directory (a non-directory there is an error).
//   - OpMove renames Path to Dest, making Dest's missing parents.
//   - OpRemove removes Path and everything under it; a missing Path is
//     an error ("no such file or directory").
type FileOpRequest struct {
	Op   string `json:"op"`
	Path string `json:"path"`
	Dest string `json:"dest,omitempty"`
	User string `json:"user,omitempty"`
}

// FileOpResult answers FileOpRequest: for mkdir and move, the entry of
// the directory made or of Dest.
type FileOpResult struct {
	Created bool      `json:"created,omitempty"`
	Entry   *DirEntry `json:"entry,omitempty"`
}

// ValidateFileOp checks the guest's answer to req before the host relays
// it: mkdir and move answer with exactly the entry of the path they made
// (a directory for mkdir), remove with no entry.
func ValidateFileOp(req FileOpRequest, res FileOpResult) error {
	switch req.Op {
	case OpRemove:
		if res.Entry != nil || res.Created {
			return fmt.Errorf("remove answered with an entry")
		}
		return nil
	case OpMkdir, OpMove:
	default:
		return fmt.Errorf("unknown operation %q", req.Op)
	}
	want := req.Path
	if req.Op == OpMove {
		want = req.Dest
	}
	if res.Entry == nil {
		return fmt.Errorf("%s answered without the entry of %q", req.Op, want)
	}
	if err := ValidateListing(want, 0, ListDirResult{Entries: []DirEntry{*res.Entry}}); err != nil {
		return err
	}
	if req.Op == OpMkdir && res.Entry.Type != FileDir {
		return fmt.Errorf("mkdir answered with a %s", res.Entry.Type)
	}
	if res.Entry.Name != path.Base(res.Entry.Path) {
		return fmt.Errorf("name %q does not end path %q", res.Entry.Name, res.Entry.Path)
	}
	return nil
}

// Bounds of a directory watch, so a busy directory cannot make the agent
// (or the host relaying its events) grow without limit: past them a
// watch fails with an overflow error instead of growing.
const (
	// MaxWatches bounds the open watches of one guest.
	MaxWatches = 64
	// MaxWatchDirs bounds the directories one recursive watch follows.
	MaxWatchDirs = 4096
	// MaxWatchQueue bounds the events a watch holds unread.
	MaxWatchQueue = 4096
	// MaxWatchEvents bounds the events one WatchEvents answer carries.
	MaxWatchEvents = 256
	// MaxWatchWait bounds how long a WatchRead waits for an event.
	MaxWatchWaitMillis = 30_000
)

// WatchOverflow starts the error of a watch that lost events (its queue
// filled, the kernel's inotify queue overflowed, or a recursive watch met
// more than MaxWatchDirs directories). The watch is closed then.
const WatchOverflow = "watch overflow"

// WatchOpen starts watching directory Path (absolute), with its
// subdirectories when Recursive, as User (who must be able to read it).
// The answer is a StreamResult whose id names the watch.
type WatchOpen struct {
	Path      string `json:"path"`
	Recursive bool   `json:"recursive,omitempty"`
	User      string `json:"user,omitempty"`
}

// WatchRead takes the queued events of watch StreamID, waiting up to
// WaitMillis (at most MaxWatchWaitMillis) for the first.
type WatchRead struct {
	StreamID   uint64 `json:"stream_id"`
	WaitMillis int64  `json:"wait_ms,omitempty"`
}

// Operations of WatchEvent, E2B's event types.
const (
	WatchCreate = "create"
	WatchWrite  = "write"
	WatchRemove = "remove"
	WatchRename = "rename"
	WatchChmod  = "chmod"
)

// WatchEvent is one change under a watched directory. Name is the path
// relative to the watched directory ("f", "sub/f" in a recursive watch).
type WatchEvent struct {
	Name string `json:"name"`
	Op   string `json:"op"`
}

// WatchEvents answers WatchRead: at most MaxWatchEvents events, oldest
// first (empty when the wait ended without one).
type WatchEvents struct {
	Events []WatchEvent `json:"events"`
}

// ValidateWatchEvents checks a WatchEvents the guest sent before the host
// relays it: bounded, known operations, and names that are clean relative
// paths (one element unless the watch is recursive).
func ValidateWatchEvents(recursive bool, res WatchEvents) error {
	if len(res.Events) > MaxWatchEvents {
		return fmt.Errorf("%d events, more than %d", len(res.Events), MaxWatchEvents)
	}
	for i, e := range res.Events {
		switch e.Op {
		case WatchCreate, WatchWrite, WatchRemove, WatchRename, WatchChmod:
		default:
			return fmt.Errorf("event %d: unknown operation %q", i, e.Op)
		}
		if e.Name == "" || len(e.Name) > maxPathLen || strings.ContainsRune(e.Name, 0) {
			return fmt.Errorf("event %d: empty, long or NUL name", i)
		}
		if path.IsAbs(e.Name) || path.Clean(e.Name) != e.Name || e.Name == ".." || strings.HasPrefix(e.Name, "../") {
			return fmt.Errorf("event %d: name %q is not a clean relative path", i, e.Name)
		}
		if !recursive && strings.Contains(e.Name, "/") {
			return fmt.Errorf("event %d: %q is below the watched directory of a flat watch", i, e.Name)
		}
	}
	return nil
}
