//go:build unix

package proxy

import (
	"errors"
	"syscall"
)

// peeker is a connection's raw socket and the peek upAlive runs on it,
// made once per connection: made per call, they were three allocations
// per request.
type peeker struct {
	raw   syscall.RawConn
	fn    func(fd uintptr) bool
	alive bool
}

// upAlive reports whether an idle guest connection (nothing left in its
// reader: h1Upstream.send checks that first) is still open: no end of
// stream and no stray bytes wait on it. It peeks without blocking (a
// past read deadline would fail before any read, telling nothing).
func upAlive(pc *upConn) bool {
	p := &pc.peek
	if p.fn == nil {
		sc, ok := pc.c.(syscall.Conn)
		if !ok {
			return true // not a socket: as before, the send will tell
		}
		raw, err := sc.SyscallConn()
		if err != nil {
			return false
		}
		var b [1]byte
		p.raw, p.fn = raw, func(fd uintptr) bool {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			// Nothing to read yet: open. 0 bytes (the guest's FIN), a byte
			// no request asked for, or a reset: do not reuse it.
			p.alive = errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EWOULDBLOCK)
			return true
		}
	}
	p.alive = false
	err := p.raw.Read(p.fn)
	return err == nil && p.alive
}
