//go:build linux

package guest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"unsafe"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"golang.org/x/sys/unix"
)

// asUser runs fn with the file system identity of user spec (see
// proto.ExecRequest.User): on a thread of its own whose fsuid, fsgid and
// supplementary groups are the user's, so the kernel checks the user's
// permissions (the fsuid change drops root's file capabilities) and what
// fn creates belongs to the user. The thread is never unlocked: it ends
// with the goroutine, its credentials with it, and threads the runtime
// starts meanwhile come from its clean template thread. "" and root run
// fn as the agent.
func (s *Server) asUser(spec string, fn func() error) error {
	if spec == "" || spec == "root" || spec == "0" {
		return fn()
	}
	id, err := lookupUser(s.cfg.Root, spec)
	if err != nil {
		return err
	}
	if id.uid == 0 && id.gid == 0 {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := setThreadCreds(id); err != nil {
			errc <- fmt.Errorf("acting as %s: %w", spec, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// setThreadCreds sets the calling thread's file system identity. Raw
// syscalls: the libc-style wrappers (syscall.Setgroups) change every
// thread of the process.
func setThreadCreds(id identity) error {
	gs := id.groups
	if len(gs) == 0 {
		gs = []uint32{id.gid}
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(gs)), uintptr(unsafe.Pointer(&gs[0])), 0); e != 0 {
		return fmt.Errorf("setgroups: %w", e)
	}
	unix.RawSyscall(unix.SYS_SETFSGID, uintptr(id.gid), 0, 0)
	unix.RawSyscall(unix.SYS_SETFSUID, uintptr(id.uid), 0, 0)
	// setfsuid and setfsgid report no error: read both back (-1 changes
	// nothing and returns the current value).
	uid, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, uintptr(^uint32(0)), 0, 0)
	gid, _, _ := unix.RawSyscall(unix.SYS_SETFSGID, uintptr(^uint32(0)), 0, 0)
	if uint32(uid) != id.uid || uint32(gid) != id.gid {
		return fmt.Errorf("file system ids are %d:%d, not %d:%d", uint32(uid), uint32(gid), id.uid, id.gid)
	}
	return nil
}

// fileOp answers proto.FileOpRequest.
func (s *Server) fileOp(req proto.FileOpRequest) (proto.FileOpResult, error) {
	var res proto.FileOpResult
	if !filepath.IsAbs(req.Path) || filepath.Clean(req.Path) != req.Path {
		return res, fmt.Errorf("%s: path %q is not clean and absolute", req.Op, req.Path)
	}
	if req.Op == proto.OpMove && (!filepath.IsAbs(req.Dest) || filepath.Clean(req.Dest) != req.Dest) {
		return res, fmt.Errorf("move: destination %q is not clean and absolute", req.Dest)
	}
	if req.Path == "/" && req.Op != proto.OpMkdir || req.Op == proto.OpMove && req.Dest == "/" {
		return res, fmt.Errorf("%s: refusing to change /", req.Op)
	}
	entry := func(p string) error {
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		e := dirEntry(p, fi, ownerNames())
		res.Entry = &e
		return nil
	}
	err := s.asUser(req.User, func() error {
		switch req.Op {
		case proto.OpMkdir:
			fi, err := os.Stat(req.Path)
			switch {
			case err == nil && !fi.IsDir():
				return fmt.Errorf("%s exists and is not a directory: %w", req.Path, syscall.ENOTDIR)
			case err == nil:
			case errors.Is(err, fs.ErrNotExist):
				if err := os.MkdirAll(req.Path, 0o755); err != nil {
					return err
				}
				res.Created = true
			default:
				return err
			}
			return entry(req.Path)
		case proto.OpMove:
			if _, err := os.Lstat(req.Path); err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(req.Dest), 0o755); err != nil {
				return err
			}
			if err := os.Rename(req.Path, req.Dest); err != nil {
				return err
			}
			return entry(req.Dest)
		case proto.OpRemove:
			if _, err := os.Lstat(req.Path); err != nil {
				return err
			}
			return os.RemoveAll(req.Path)
		}
		return fmt.Errorf("unknown file operation %q", req.Op)
	})
	if err != nil {
		return proto.FileOpResult{}, fmt.Errorf("%s: %w", req.Op, err)
	}
	return res, nil
}
