package connlimit

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestCapAndRelease: the (max+1)th connection of an address is answered
// 429 and closed; past twice the cap connections are closed unanswered;
// closing connections gives their places back.
func TestCapAndRelease(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := New(inner, 2).(*Listener)
	hs := &http.Server{Handler: Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })),
		ConnContext: ConnContext, ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(ln)
	defer hs.Shutdown(context.Background())
	addr := inner.Addr().String()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ask := func(c net.Conn) (int, string, error) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, "", err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b), nil
	}
	var held []net.Conn
	for range 2 {
		held = append(held, dial())
	}
	waitOpen := func(n int) {
		deadline := time.Now().Add(5 * time.Second)
		for ln.Open("127.0.0.1") != n {
			if time.Now().After(deadline) {
				t.Fatalf("open connections %d, want %d", ln.Open("127.0.0.1"), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitOpen(2)
	over := dial()
	waitOpen(3)
	// Two more fill the grace band (up to 2×max), the next is dropped.
	held = append(held, dial())
	waitOpen(4)
	dropped := dial()
	if _, _, err := ask(dropped); err == nil {
		t.Error("a connection past twice the cap was answered")
	}
	if code, body, err := ask(over); err != nil || code != 429 || !strings.Contains(body, "too many concurrent connections") {
		t.Errorf("over the cap: %d %q %v", code, body, err)
	}
	over.Close()
	dropped.Close()
	for _, c := range held {
		c.Close()
	}
	waitOpen(0)
	c := dial()
	defer c.Close()
	if code, body, err := ask(c); err != nil || code != 200 || body != "ok" {
		t.Errorf("after release: %d %q %v", code, body, err)
	}
}
