//go:build unix

package proxy

import (
	"errors"
	"syscall"
)

// peeker is the peek upAlive runs on a connection's raw socket, made
// once per connection: made per call, it and the raw socket were three
// allocations per request.
type peeker struct {
	fn    func(fd uintptr) bool
	alive bool
}

// upAlive reports whether an idle guest connection (nothing left in its
// reader: h1Upstream.send checks that first) is still open: no end of
// stream and no stray bytes wait on it. It peeks without blocking (a
// past read deadline would fail before any read, telling nothing).
func upAlive(pc *upConn) bool {
	p := &pc.peek
	if pc.w.raw == nil {
		return true // not a socket: as before, the send will tell
	}
	if p.fn == nil {
		var b [1]byte
		p.fn = func(fd uintptr) bool {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			// Nothing to read yet: open. 0 bytes (the guest's FIN), a byte
			// no request asked for, or a reset: do not reuse it.
			p.alive = errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EWOULDBLOCK)
			return true
		}
	}
	p.alive = false
	err := pc.w.raw.Read(p.fn)
	return err == nil && p.alive
}
