//go:build linux

package guest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// userServer is a Server whose /etc/passwd names "user" (uid and gid 4242),
// with a world-writable scratch dir and a root-only one.
func userServer(t *testing.T) (*Server, string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("acting as another user needs root")
	}
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\nuser:x:4242:4242::/home/user:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nuser:x:4242:\n"), 0o644)
	os.Chmod(root, 0o755)
	os.Chmod(filepath.Dir(root), 0o755) // t.TempDir's parent is 0700
	os.MkdirAll(filepath.Join(root, "open"), 0o777)
	os.Chmod(filepath.Join(root, "open"), 0o777)
	os.MkdirAll(filepath.Join(root, "closed"), 0o700)
	return NewServer(Config{Root: root}), root
}

func owner(t *testing.T, p string) uint32 {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Uid
}

// TestFileOpAsUser proves that mkdir, move and remove act with the user's
// uid: what it makes belongs to it, and root's files are out of its reach.
func TestFileOpAsUser(t *testing.T) {
	s, root := userServer(t)
	d := filepath.Join(root, "open/a/b")
	res, err := s.fileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: d, User: "user"})
	if err != nil || !res.Created || res.Entry == nil || res.Entry.Type != proto.FileDir {
		t.Fatalf("mkdir as user: %+v, %v", res, err)
	}
	if u := owner(t, d); u != 4242 {
		t.Fatalf("dir made as user belongs to %d", u)
	}
	if err := proto.ValidateFileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: d}, res); err != nil {
		t.Fatalf("own answer invalid: %v", err)
	}
	res, err = s.fileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: d, User: "user"})
	if err != nil || res.Created {
		t.Fatalf("mkdir of an existing dir: %+v, %v (want created false)", res, err)
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: filepath.Join(root, "closed/x"), User: "user"}); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("mkdir in root's 0700 dir as user: %v", err)
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: filepath.Join(root, "closed/x")}); err != nil {
		t.Fatalf("mkdir as root: %v", err)
	}
	dst := filepath.Join(root, "open/c/moved")
	res, err = s.fileOp(proto.FileOpRequest{Op: proto.OpMove, Path: d, Dest: dst, User: "user"})
	if err != nil || res.Entry == nil || res.Entry.Path != dst {
		t.Fatalf("move as user: %+v, %v", res, err)
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpRemove, Path: filepath.Join(root, "closed/x"), User: "user"}); err == nil {
		t.Fatal("user removed a dir inside root's 0700 dir")
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpRemove, Path: filepath.Join(root, "open/c"), User: "user"}); err != nil {
		t.Fatalf("remove as user: %v", err)
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpRemove, Path: filepath.Join(root, "open/c")}); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("remove of a missing path: %v", err)
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpRemove, Path: "/"}); err == nil {
		t.Fatal("remove / accepted")
	}
	if _, err := s.fileOp(proto.FileOpRequest{Op: proto.OpMkdir, Path: filepath.Join(root, "open/z"), User: "nobody-here"}); err == nil {
		t.Fatal("unknown user accepted")
	}
	// The agent itself keeps root's identity.
	if uid, _, _ := syscall.RawSyscall(syscall.SYS_SETFSUID, uintptr(^uint32(0)), 0, 0); uid != 0 {
		t.Fatalf("agent thread left with fsuid %d", uid)
	}
}

// TestCopyInAsUser proves an upload as a user makes files it owns and
// cannot write where the user may not.
func TestCopyInAsUser(t *testing.T) {
	s, root := userServer(t)
	if _, err := s.copyInOpen(proto.CopyInOpen{Dir: filepath.Join(root, "closed/sub"), User: "user"}); err == nil {
		t.Fatal("copy in as user into root's 0700 dir accepted")
	}
	st, err := s.copyInOpen(proto.CopyInOpen{Dir: filepath.Join(root, "open/up"), User: "user"})
	if err != nil {
		t.Fatal(err)
	}
	if u := owner(t, filepath.Join(root, "open/up")); u != 4242 {
		t.Fatalf("upload dir belongs to %d", u)
	}
	s.closeStream(st.StreamID)
}

// readUntil reads a watch until it has reported every event of want
// ("op name"), or for 5 s. A count would not do: a new subdirectory's
// content may be reported twice (by its scan and by its own watch), and
// the repeats could stand in for events that are still to come.
func readUntil(t *testing.T, s *Server, id uint64, want ...string) []proto.WatchEvent {
	t.Helper()
	var got []proto.WatchEvent
	missing := map[string]bool{}
	for _, w := range want {
		missing[w] = true
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(missing) > 0 && time.Now().Before(deadline) {
		evs, err := s.watchRead(context.Background(), proto.WatchRead{StreamID: id, WaitMillis: 200})
		if err != nil {
			t.Fatalf("watch read: %v (so far %v)", err, got)
		}
		for _, e := range evs.Events {
			delete(missing, e.Op+" "+e.Name)
		}
		got = append(got, evs.Events...)
	}
	return got
}

// TestWatch proves a recursive watch reports create, write, chmod, rename
// and remove with names relative to the watched dir, follows new
// subdirectories, and that its answers pass the host's check.
func TestWatch(t *testing.T) {
	s := NewServer(Config{})
	dir := t.TempDir()
	st, err := s.watchOpen(proto.WatchOpen{Path: dir, Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.closeWatch(st.StreamID)
	os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644)
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	got := readUntil(t, s, st.StreamID, "create f", "write f", "create sub")
	// A directory filled before its watch can be in place: its content
	// is reported as created all the same.
	os.MkdirAll(filepath.Join(dir, "sub2/deep"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub2/deep/early"), nil, 0o644)
	got = append(got, readUntil(t, s, st.StreamID, "create sub2", "create sub2/deep", "create sub2/deep/early")...)
	os.WriteFile(filepath.Join(dir, "sub/g"), nil, 0o644)
	os.Chmod(filepath.Join(dir, "f"), 0o600)
	os.Rename(filepath.Join(dir, "f"), filepath.Join(dir, "h"))
	os.Remove(filepath.Join(dir, "h"))
	got = append(got, readUntil(t, s, st.StreamID, "create sub/g", "chmod f", "rename f", "create h", "remove h")...)
	seen := map[string]bool{}
	for _, e := range got {
		seen[e.Op+" "+e.Name] = true
	}
	for _, w := range []string{"create f", "write f", "create sub", "create sub/g", "chmod f", "rename f", "create h", "remove h",
		"create sub2", "create sub2/deep", "create sub2/deep/early"} {
		if !seen[w] {
			t.Errorf("missing event %q in %v", w, got)
		}
	}
	if err := proto.ValidateWatchEvents(true, proto.WatchEvents{Events: got}); err != nil {
		t.Fatalf("own events invalid: %v", err)
	}
}

// TestWatchOverflow proves a watch whose reader falls behind fails with an
// overflow error instead of queueing without bound, and is closed.
func TestWatchOverflow(t *testing.T) {
	s := NewServer(Config{})
	dir := t.TempDir()
	st, err := s.watchOpen(proto.WatchOpen{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	// Distinct names: inotify merges repeats of one event.
	for i := 0; i < proto.MaxWatchQueue+100; i++ {
		os.Mkdir(filepath.Join(dir, strconv.Itoa(i)), 0o755)
	}
	// Reading drains the queue: first let the watch's reader take in the
	// events (on a busy host it may lag far behind the mkdirs).
	s.mu.Lock()
	w := s.watches[st.StreamID]
	s.mu.Unlock()
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		w.mu.Lock()
		done := w.err != nil
		w.mu.Unlock()
		if done {
			break
		}
	}
	var rerr error
	for i := 0; i < 100 && rerr == nil; i++ {
		_, rerr = s.watchRead(context.Background(), proto.WatchRead{StreamID: st.StreamID, WaitMillis: 100})
	}
	if rerr == nil || !strings.Contains(rerr.Error(), proto.WatchOverflow) {
		t.Fatalf("want an overflow error, got %v", rerr)
	}
	if _, err := s.watchRead(context.Background(), proto.WatchRead{StreamID: st.StreamID}); err == nil {
		t.Fatal("overflowed watch still open")
	}
	s.mu.Lock()
	n := len(s.watches)
	s.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d watches left", n)
	}
}

// TestWatchAsUser proves a user cannot watch a directory it cannot read.
func TestWatchAsUser(t *testing.T) {
	s, root := userServer(t)
	if _, err := s.watchOpen(proto.WatchOpen{Path: filepath.Join(root, "closed"), User: "user"}); err == nil {
		t.Fatal("user watches root's 0700 dir")
	}
	st, err := s.watchOpen(proto.WatchOpen{Path: filepath.Join(root, "open"), User: "user"})
	if err != nil {
		t.Fatal(err)
	}
	s.closeWatch(st.StreamID)
}
