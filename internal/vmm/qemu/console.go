//go:build linux

package qemu

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// ring keeps the last bytes the guest wrote to its serial console, for
// error messages. The guest may write without end; only size bytes stay.
type ring struct {
	mu   sync.Mutex
	buf  []byte
	size int
}

func newRing(size int) *ring { return &ring{size: size} }

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	if len(r.buf) > r.size {
		r.buf = append(r.buf[:0], r.buf[len(r.buf)-r.size:]...)
	}
	return len(p), nil
}

func (r *ring) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return string(r.buf)
}

// drain reads the console socket until the process ends, into the ring
// and sink (if not nil; it must not block: the guest writes without end).
func (r *ring) drain(path string, done <-chan struct{}, sink io.Writer) {
	var c net.Conn
	for c == nil {
		var err error
		if c, err = net.Dial("unix", path); err != nil {
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	go func() { <-done; c.Close() }()
	var w io.Writer = r
	if sink != nil {
		w = io.MultiWriter(r, sink)
	}
	io.Copy(w, c)
}

// consoleSink is where a VM's console goes besides the ring.
func (d *Driver) consoleSink(id string) io.Writer {
	if d.cfg.Console == nil {
		return nil
	}
	return d.cfg.Console(id)
}

// readTail returns up to n bytes from the end of a file.
func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	_, err = f.ReadAt(b, off)
	if err == io.EOF {
		err = nil
	}
	return b, err
}

// stepTimer records how long each step of an operation took, for logs.
type stepTimer struct {
	last  time.Time
	steps []string
}

func newStepTimer() *stepTimer { return &stepTimer{last: time.Now()} }

func (t *stepTimer) step(name string) {
	now := time.Now()
	t.steps = append(t.steps, fmt.Sprintf("%s=%.1f", name, float64(now.Sub(t.last).Microseconds())/1000))
	t.last = now
}

func (t *stepTimer) String() string { return strings.Join(t.steps, " ") }
