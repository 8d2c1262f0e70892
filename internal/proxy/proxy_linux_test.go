//go:build linux

package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/netns/netnstest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
	"golang.org/x/sys/unix"
)

// TestThroughNamespace sends a request through the whole host side of the
// path: TLS endpoint → proxy → VM namespace DNAT → TAP → a guest stand-in
// on 172.30.0.2:8080. Only QEMU is missing.
func TestThroughNamespace(t *testing.T) {
	testenv.NeedRoot(t, "namespaces, mounts or other users")
	b := make([]byte, 3)
	rand.Read(b)
	id := "tpx" + hex.EncodeToString(b)
	n, err := netns.Setup(context.Background(), netns.Config{ID: id})
	t.Cleanup(func() {
		netns.Teardown(context.Background(), id)
		netns.RemoveHostRules() // no-op while other VM networks exist
	})
	if err != nil {
		t.Fatal(err)
	}
	g := netnstest.StartGuest(t, n)
	g.ServeHTTP(t, 8080, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "guest %s saw client %s", r.Host, r.RemoteAddr)
	}))

	dir := t.TempDir()
	ca, err := tlsca.Open(tlsca.Config{Domain: domain, Dir: dir, CAExport: filepath.Join(dir, "ca.pem")})
	if err != nil {
		t.Fatal(err)
	}
	signer, _ := token.NewSigner([]byte(strings.Repeat("z", 32)))
	backend := &fakeBackend{ensures: map[string]int{}, open: map[string]int{}, vms: map[string]*fakeVM{
		id: {tgt: Target{Addr: n.HostAddr, Ingress: true}},
	}}
	srv, err := New(Config{Domain: domain, Backend: backend, Tokens: signer})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln, ca.TLSConfig(), time.Second); close(done) }()
	defer func() { cancel(); <-done }()

	e := &env{roots: rootsFromFile(t, filepath.Join(dir, "ca.pem")), addr: ln.Addr().String()}
	tok, _, _ := signer.Mint("", id, token.KindEndpoint, []token.PortRange{token.Port(8080)}, time.Minute)
	req, _ := http.NewRequest("GET", "https://"+id+"."+domain+"/", nil)
	req.Header.Set(HeaderAuth, tok)
	resp, err := (&http.Client{Transport: e.transport(true), Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	want := "guest " + id + "." + domain + " saw client 172.30.0.1:"
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), want) {
		t.Fatalf("status %d body %q, want prefix %q", resp.StatusCode, body, want)
	}
}

// waitDelivered waits until the peer has acknowledged everything written
// on c (SIOCOUTQ is 0), so those bytes are in the peer's socket, or until
// the peer reset the connection (nothing more will be acknowledged).
func waitDelivered(c net.Conn) {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return
	}
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(time.Millisecond) {
		n, closed := -1, false
		raw.Control(func(fd uintptr) {
			n, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
			info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
			closed = err == nil && info.State == unix.BPF_TCP_CLOSE
		})
		if n == 0 || closed {
			return
		}
	}
}
