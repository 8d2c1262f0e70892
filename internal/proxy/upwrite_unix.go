//go:build unix

package proxy

import (
	"os"
	"syscall"
)

// Write writes p to the guest. Armed (the last write of a request, from
// send's Flush), it also waits on the same raw-socket call until the
// answer can be read: Go's read tries the socket before it waits, and
// right after a request that try always finds nothing (EAGAIN), one
// syscall per request that nginx does not make. Waiting is safe only
// because it starts before the write: the wait's reset of the socket's
// readiness cannot drop the answer's.
func (w *upWriter) Write(p []byte) (int, error) {
	if !w.armed || w.raw == nil {
		return w.c.Write(p)
	}
	if w.fn == nil {
		w.fn = w.writeThenWait
	}
	w.p, w.n, w.err, w.wrote = p, 0, nil, false
	// An error of the wait (a deadline, a close) is the next read's too:
	// that read reports it.
	w.raw.Read(w.fn)
	n, err := w.n, w.err
	w.p = nil
	if err != nil {
		return n, os.NewSyscallError("write", err)
	}
	if n < len(p) {
		// Not written whole without blocking (or the wait failed before
		// the write was tried): the rest the ordinary way.
		if upWriteRest != nil {
			upWriteRest()
		}
		m, err := w.c.Write(p[n:])
		return n + m, err
	}
	return n, nil
}

// upWriteRest, if set, is called when Write falls back (tests).
var upWriteRest func()

// writeThenWait is raw.Read's callback: the first call writes and asks
// to wait for readability (false) if all went out; the next one ends.
func (w *upWriter) writeThenWait(fd uintptr) bool {
	if w.wrote {
		return true
	}
	w.wrote = true
	for {
		n, err := syscall.Write(int(fd), w.p)
		if err == syscall.EINTR {
			continue
		}
		if n > 0 {
			w.n = n
		}
		if err == syscall.EAGAIN {
			return true
		}
		if err != nil {
			w.err = err
			return true
		}
		return n < len(w.p)
	}
}
