//go:build unix

package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// TestUpstreamBigHeadOnClosedConnRetried: a kept connection the guest
// closes while a request's head, larger than the writer's 4 KiB buffer,
// is still being written (the guest read a byte of it) failed with a 502;
// nothing was answered, so the request is sent again on a new
// connection, as when the close comes after the head. The guest answers
// one request per connection, reading it through a small window.
func TestUpstreamBigHeadOnClosedConnRetried(t *testing.T) {
	hdr := http.Header{}
	for i := range 50 {
		hdr.Set(fmt.Sprintf("X-Big-%d", i), strings.Repeat("x", 1000))
	}
	var whole atomic.Int32
	// A small receive buffer, set before the handshake: a small window.
	small := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 2048) })
	}}
	addr, _ := rawGuestOn(t, small, func(c net.Conn, br *bufio.Reader) {
		if b, err := br.Peek(1); err != nil || b[0] == 0x16 {
			return // speaksTLS's probe
		}
		var head strings.Builder
		for !strings.HasSuffix(head.String(), "\r\n\r\n") {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
		}
		all := true
		for k, v := range hdr {
			all = all && strings.Contains(head.String(), "\r\n"+k+": "+v[0]+"\r\n")
		}
		if all {
			whole.Add(1)
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		br.ReadByte() // the next request has begun: close, its rest unread
	})
	e := newEnvFull(t, map[string]string{"7000": addr}, func(cfg *Config) {
		dial := cfg.Dial
		cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetWriteBuffer(4096) // no room for the head: it waits for the guest
			}
			return c, err
		}
	})
	e.get(t, false, "7000", nil) // the TLS probe
	for _, h2 := range []bool{false, true} {
		if resp, body, err := e.get(t, h2, "7000", nil); err != nil || resp.StatusCode != 200 {
			t.Fatalf("h2=%v: the small request: %v, body %q", h2, err, body)
		}
		whole.Store(0)
		resp, body, err := e.get(t, h2, "7000", hdr)
		if err != nil || resp.StatusCode != 200 || string(body) != "ok" || whole.Load() != 1 {
			t.Errorf("h2=%v: the big request on the kept connection: %v, body %q, guest got it whole %d times", h2, err, body, whole.Load())
		}
	}
}
