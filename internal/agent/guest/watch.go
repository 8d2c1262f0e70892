//go:build linux

package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"golang.org/x/sys/unix"
)

// watchMask is what a watch asks inotify for: E2B's event types, plus the
// watched directory's own end.
const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// watch is one inotify instance following a directory (and, recursive,
// its subdirectories). Its reader goroutine runs with the watching user's
// file system identity, so the user can only watch what it may read.
type watch struct {
	id        uint64
	root      string
	recursive bool
	f         *os.File
	fd        int // f's descriptor: f.Fd would make it blocking

	mu     sync.Mutex
	dirs   map[int32]string // watch descriptor → directory relative to root ("" is root)
	queue  []proto.WatchEvent
	err    error // set once: overflow, the directory gone, a read failure
	closed bool
	wake   chan struct{}
}

func (w *watch) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// fail ends the watch with err (the first error wins).
func (w *watch) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.signal()
}

func (w *watch) close() {
	w.mu.Lock()
	already := w.closed
	w.closed = true
	w.mu.Unlock()
	if !already {
		w.f.Close()
	}
	w.fail(errors.New("watch closed"))
}

// push queues an event, or fails the watch when its queue is full: a
// reader that cannot keep up learns it lost events instead of the agent
// growing.
func (w *watch) push(ev proto.WatchEvent) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return
	}
	if len(w.queue) >= proto.MaxWatchQueue {
		w.err = fmt.Errorf("%s: more than %d events unread under %s; watch again", proto.WatchOverflow, proto.MaxWatchQueue, w.root)
		w.queue = nil
	} else {
		w.queue = append(w.queue, ev)
	}
	w.signal()
}

// add watches dir (relative to root) and, for a recursive watch, every
// directory under it, within proto.MaxWatchDirs. With announce (a
// directory that just appeared) what is already in it is reported as
// created: it may have been filled before its watch was in place
// (`mkdir d && echo > d/f`), and a repeated create beats a lost one.
func (w *watch) add(rel string, announce bool) error {
	abs := filepath.Join(w.root, rel)
	addOne := func(abs, rel string) error {
		w.mu.Lock()
		n, closed := len(w.dirs), w.closed
		w.mu.Unlock()
		if closed {
			return errors.New("watch closed")
		}
		if n >= proto.MaxWatchDirs {
			return fmt.Errorf("%s: more than %d directories under %s; watch a smaller tree", proto.WatchOverflow, proto.MaxWatchDirs, w.root)
		}
		wd, err := unix.InotifyAddWatch(w.fd, abs, watchMask)
		if err != nil {
			return fmt.Errorf("watching %s: %w", abs, err)
		}
		w.mu.Lock()
		w.dirs[int32(wd)] = rel
		w.mu.Unlock()
		return nil
	}
	if !w.recursive {
		return addOne(abs, rel)
	}
	return filepath.WalkDir(abs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == abs {
				return err
			}
			return nil // vanished or unreadable below: skip it
		}
		r, _ := filepath.Rel(w.root, p)
		if r == "." {
			r = ""
		}
		if announce && p != abs {
			w.push(proto.WatchEvent{Name: filepath.ToSlash(r), Op: proto.WatchCreate})
		}
		if !d.IsDir() {
			return nil
		}
		return addOne(p, r)
	})
}

// run reads inotify events until the watch is closed or fails.
func (w *watch) run() {
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			w.fail(fmt.Errorf("reading events of %s: %w", w.root, err))
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameEnd := off + unix.SizeofInotifyEvent + int(ev.Len)
			if nameEnd > n {
				break
			}
			name := string(buf[off+unix.SizeofInotifyEvent : nameEnd])
			for len(name) > 0 && name[len(name)-1] == 0 {
				name = name[:len(name)-1]
			}
			off = nameEnd
			if !w.handle(ev.Wd, ev.Mask, name) {
				return
			}
		}
	}
}

// handle turns one inotify event into E2B's; false ends the watch.
func (w *watch) handle(wd int32, mask uint32, name string) bool {
	if mask&unix.IN_Q_OVERFLOW != 0 {
		w.fail(fmt.Errorf("%s: the kernel's event queue for %s overflowed; watch again", proto.WatchOverflow, w.root))
		return false
	}
	w.mu.Lock()
	dir, ok := w.dirs[wd]
	if mask&unix.IN_IGNORED != 0 {
		delete(w.dirs, wd)
	}
	w.mu.Unlock()
	if !ok {
		return true
	}
	if mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 || name == "" {
		if dir == "" && mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 {
			w.fail(fmt.Errorf("the watched directory %s was removed or moved", w.root))
			return false
		}
		return true // a subdirectory's own end: its parent reported it
	}
	rel := path.Join(dir, name)
	var op string
	switch {
	case mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
		op = proto.WatchCreate
	case mask&unix.IN_MODIFY != 0:
		op = proto.WatchWrite
	case mask&unix.IN_DELETE != 0:
		op = proto.WatchRemove
	case mask&unix.IN_MOVED_FROM != 0:
		op = proto.WatchRename
	case mask&unix.IN_ATTRIB != 0:
		op = proto.WatchChmod
	default:
		return true
	}
	w.push(proto.WatchEvent{Name: rel, Op: op})
	if w.recursive && op == proto.WatchCreate && mask&unix.IN_ISDIR != 0 {
		if err := w.add(rel, true); err != nil && !errors.Is(err, fs.ErrNotExist) {
			w.fail(err)
			return false
		}
	}
	return true
}

// watchOpen answers proto.WatchOpen.
func (s *Server) watchOpen(req proto.WatchOpen) (proto.StreamResult, error) {
	if !filepath.IsAbs(req.Path) || filepath.Clean(req.Path) != req.Path {
		return proto.StreamResult{}, fmt.Errorf("watch: path %q is not clean and absolute", req.Path)
	}
	s.mu.Lock()
	n := len(s.watches)
	s.mu.Unlock()
	if n >= proto.MaxWatches {
		return proto.StreamResult{}, fmt.Errorf("watch: %d watches are open, the most the agent keeps; remove one first", n)
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return proto.StreamResult{}, fmt.Errorf("watch: %w", err)
	}
	w := &watch{id: s.nextID.Add(1), root: req.Path, recursive: req.Recursive,
		f: os.NewFile(uintptr(fd), "inotify"), fd: fd, dirs: map[int32]string{}, wake: make(chan struct{}, 1)}
	started := make(chan error, 1)
	go func() {
		// The reader adds the watches of new subdirectories: it keeps the
		// user's identity for the watch's life.
		err := s.asUser(req.User, func() error {
			fi, err := os.Stat(req.Path)
			if err != nil {
				return err
			}
			if !fi.IsDir() {
				return fmt.Errorf("%s is not a directory", req.Path)
			}
			if err := w.add("", false); err != nil {
				return err
			}
			started <- nil
			w.run()
			return nil
		})
		if err != nil {
			started <- err
		}
	}()
	if err := <-started; err != nil {
		w.f.Close()
		return proto.StreamResult{}, fmt.Errorf("watch: %w", err)
	}
	s.mu.Lock()
	s.watches[w.id] = w
	s.mu.Unlock()
	return proto.StreamResult{StreamID: w.id}, nil
}

// watchRead answers proto.WatchRead. A failed watch reports its error
// once its queued events are taken, and is closed.
func (s *Server) watchRead(ctx context.Context, req proto.WatchRead) (proto.WatchEvents, error) {
	s.mu.Lock()
	w, ok := s.watches[req.StreamID]
	s.mu.Unlock()
	if !ok {
		return proto.WatchEvents{}, fmt.Errorf("watch %d not found", req.StreamID)
	}
	wait := time.Duration(min(max(req.WaitMillis, 0), proto.MaxWatchWaitMillis)) * time.Millisecond
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		w.mu.Lock()
		if len(w.queue) > 0 {
			n := min(len(w.queue), proto.MaxWatchEvents)
			out := proto.WatchEvents{Events: append([]proto.WatchEvent(nil), w.queue[:n]...)}
			w.queue = w.queue[n:]
			w.mu.Unlock()
			return out, nil
		}
		err := w.err
		w.mu.Unlock()
		if err != nil {
			s.closeWatch(w.id)
			return proto.WatchEvents{}, err
		}
		select {
		case <-w.wake:
		case <-timer.C:
			return proto.WatchEvents{Events: []proto.WatchEvent{}}, nil
		case <-ctx.Done():
			return proto.WatchEvents{}, ctx.Err()
		}
	}
}

func (s *Server) closeWatch(id uint64) {
	s.mu.Lock()
	w, ok := s.watches[id]
	delete(s.watches, id)
	s.mu.Unlock()
	if ok {
		w.close()
	}
}

// closeWatches ends every watch (their host session is gone).
func (s *Server) closeWatches() {
	s.mu.Lock()
	all := s.watches
	s.watches = map[uint64]*watch{}
	s.mu.Unlock()
	for _, w := range all {
		w.close()
	}
}
