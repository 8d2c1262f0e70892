package applog

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Writer appends to one VM's log. Write never blocks on the disk and never
// fails; Manager.Close or Detach end it.
type Writer struct {
	m   *Manager
	id  string
	dir string

	mu      sync.Mutex
	pend    []byte // waiting for the flusher, at most Options.Buffer
	dropped int64  // bytes refused since the last flush
	closed  bool
	queued  int64 // bytes accepted so far
	flushed int64 // of which written out

	kick    chan struct{}
	done    chan struct{} // closed by stop
	stopped chan struct{} // closed when the flusher has written everything

	// Owned by the flusher.
	f                 *os.File
	segStart, segSize int64
	segs              []segment
}

// Write queues p. What does not fit in the buffer is dropped and counted;
// Write always reports len(p), so that a copying caller keeps going.
func (w *Writer) Write(p []byte) (int, error) {
	n := len(p)
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return n, nil
	}
	if room := w.m.opts.Buffer - len(w.pend); len(p) > room {
		w.dropped += int64(len(p) - room)
		p = p[:max(room, 0)]
	}
	w.pend = append(w.pend, p...)
	w.queued += int64(len(p))
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
	return n, nil
}

// Dropped returns how many bytes wait to be reported as dropped (for
// tests and metrics).
func (w *Writer) Dropped() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dropped
}

func (w *Writer) stop() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.stopped
		return
	}
	w.closed = true
	w.mu.Unlock()
	close(w.done)
	<-w.stopped
}

// Sync waits until what was written before it is on disk (page cache).
func (w *Writer) Sync() {
	w.mu.Lock()
	want := w.queued
	w.mu.Unlock()
	for {
		w.mu.Lock()
		done := w.flushed >= want && w.dropped == 0
		w.mu.Unlock()
		if done {
			return
		}
		select {
		case w.kick <- struct{}{}:
		default:
		}
		select {
		case <-w.stopped:
			return
		case <-timeAfter():
		}
	}
}

func (w *Writer) flusher() {
	defer close(w.stopped)
	var buf []byte
	for {
		select {
		case <-w.kick:
		case <-w.done:
			w.flushOnce(&buf)
			if w.f != nil {
				w.f.Sync()
				w.f.Close()
				w.f = nil
			}
			return
		}
		w.flushOnce(&buf)
	}
}

// flushOnce writes what is pending. The pending slice is swapped with the
// flusher's own, so that writers append while the disk is busy.
func (w *Writer) flushOnce(buf *[]byte) {
	w.mu.Lock()
	data, dropped := w.pend, w.dropped
	w.pend, w.dropped = (*buf)[:0], 0
	w.mu.Unlock()
	*buf = data
	if len(data) > 0 {
		w.write(data)
	}
	if dropped > 0 {
		w.write(fmt.Appendf(nil, "\n[kiln] %d bytes of output dropped: the guest wrote faster than its log is kept\n", dropped))
	}
	w.mu.Lock()
	w.flushed += int64(len(data))
	w.mu.Unlock()
}

// write appends b, starting a new segment whenever the current one is
// full, so that no segment outgrows MaxBytes/Segments.
func (w *Writer) write(b []byte) {
	segCap := w.m.segCap()
	for len(b) > 0 {
		if w.f == nil || w.segSize >= segCap {
			if err := w.rotate(); err != nil {
				w.m.log.Warn("app log: dropping output", "vm", w.id, "bytes", len(b), "err", err)
				return
			}
		}
		chunk := b[:min(int64(len(b)), segCap-w.segSize)]
		n, err := w.f.Write(chunk)
		w.segSize += int64(n)
		if err != nil {
			w.m.log.Warn("app log: write failed", "vm", w.id, "err", err)
			w.f.Close()
			w.f = nil
			return
		}
		b = b[n:]
	}
}

// rotate opens the segment to write: the last one if it has room (after a
// restart), else a new one named by the current end offset, removing the
// oldest beyond the cap.
func (w *Writer) rotate() error {
	segCap := w.m.segCap()
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
	if n := len(w.segs); n > 0 && w.segSize < segCap {
		f, err := os.OpenFile(filepath.Join(w.dir, w.segs[n-1].name), os.O_WRONLY|os.O_APPEND, 0o600)
		if err == nil {
			w.f = f
			return nil
		}
	}
	start := w.segStart + w.segSize
	name := segName(start)
	f, err := os.OpenFile(filepath.Join(w.dir, name), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	w.f, w.segStart, w.segSize = f, start, 0
	w.segs = append(w.segs, segment{name: name, start: start})
	for len(w.segs) > w.m.opts.Segments {
		os.Remove(filepath.Join(w.dir, w.segs[0].name))
		w.segs = w.segs[1:]
	}
	return nil
}

func timeAfter() <-chan time.Time { return time.After(5 * time.Millisecond) }
