package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/clustertest"
	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// guestPort is a real TCP listener on loopback standing in for a guest
// port: it reads until the client half-closes, answers "got:" and what
// it read, and closes.
func guestPort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(append([]byte("got:"), b...))
			}()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

type node struct {
	addr string
	vms  *clustertest.Guests
}

func startNode(t *testing.T, ca *clustertest.CA, timeout time.Duration) *node {
	return startNodeWith(t, ca, ServerConfig{HandshakeTimeout: timeout})
}

// startNodeWith starts a node's tunnel server with cfg's TLS and resolver
// filled in.
func startNodeWith(t *testing.T, ca *clustertest.CA, cfg ServerConfig) *node {
	t.Helper()
	vms := clustertest.NewGuests()
	cfg.TLS, cfg.Resolver = ca.ServerConfig(t, "node"), vms
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &node{addr: ln.Addr().String(), vms: vms}
}

var loopback = netip.MustParseAddr("127.0.0.1")

func TestTunnelCarriesBytesBothWaysWithHalfClose(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	n := startNode(t, ca, time.Second)
	n.vms.Set("mvm-1", loopback, true)
	port := guestPort(t)
	ctx := context.Background()
	c, err := Dial(ctx, n.addr, ca.ClientConfig(t, "edge"), "mvm-1", port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	// The guest answers only after the FIN: the half-close must pass
	// through the tunnel, and the answer must come back after it.
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "got:hello" {
		t.Fatalf("read %q, %v; want got:hello", got, err)
	}
}

// A host port is served by the node's own handler (the shell, envd):
// plain requests on a kept tunnel, and an upgrade whose connection the
// handler takes over, each knowing its microVM and account.
func TestTunnelServesHostPorts(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who := proxy.MicrovmID(r.Context()) + "/" + proxy.Account(r.Context())
		if r.Header.Get("Upgrade") == "" {
			io.WriteString(w, who+" "+r.URL.Path)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n" + who + "\n")
		brw.Flush()
		line, _ := brw.ReadString('\n')
		c.Write([]byte("echo:" + line))
	})
	n := startNodeWith(t, ca, ServerConfig{HandshakeTimeout: 2 * time.Second, HostPorts: map[uint16]http.Handler{8022: h}})
	n.vms.Set("mvm-1", loopback, true)
	n.vms.Set("mvm-off", loopback, false)
	ctx := context.Background()

	c, err := Dial(ctx, n.addr, ca.ClientConfig(t, "edge"), "mvm-1", 8022)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	for _, path := range []string{"/exec", "/copy-out"} { // two requests, one tunnel
		req, _ := http.NewRequest("GET", "http://mvm-1"+path, nil)
		if err := req.Write(c); err != nil {
			t.Fatal(err)
		}
		res, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if want := "mvm-1/" + clustertest.GuestAccount + " " + path; string(b) != want {
			t.Fatalf("host port answered %q, want %q", b, want)
		}
	}
	req, _ := http.NewRequest("GET", "http://mvm-1/", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "echo")
	if err := req.Write(c); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(br, req)
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", res, err)
	}
	if who, _ := br.ReadString('\n'); who != "mvm-1/"+clustertest.GuestAccount+"\n" {
		t.Fatalf("upgraded handler saw %q", who)
	}
	c.Write([]byte("ping\n"))
	if got, _ := io.ReadAll(br); string(got) != "echo:ping\n" {
		t.Fatalf("after the upgrade: %q", got)
	}

	// Only for a microVM that runs here.
	if _, err := Dial(ctx, n.addr, ca.ClientConfig(t, "edge"), "mvm-none", 8022); !errors.Is(err, ErrNoSuchMicrovm) {
		t.Errorf("host port of a microVM the node lacks: %v", err)
	}
	if _, err := Dial(ctx, n.addr, ca.ClientConfig(t, "edge"), "mvm-off", 8022); !errors.Is(err, ErrUnavailable) {
		t.Errorf("host port of a stopped microVM: %v", err)
	}
}

func TestTunnelRefusals(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	n := startNode(t, ca, time.Second)
	port := guestPort(t)
	n.vms.Set("mvm-up", loopback, true)
	n.vms.Set("mvm-asleep", loopback, false)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := uint16(closed.Addr().(*net.TCPAddr).Port)
	closed.Close()
	cfg := ca.ClientConfig(t, "edge")
	for _, c := range []struct {
		id   string
		port uint16
		want error
	}{
		{"mvm-other", port, ErrNoSuchMicrovm},
		{"mvm-asleep", port, ErrUnavailable},
		{"mvm-up", closedPort, ErrRefused},
	} {
		_, err := Dial(context.Background(), n.addr, cfg, c.id, c.port)
		if !errors.Is(err, c.want) {
			t.Errorf("Dial %s:%d: %v, want %v", c.id, c.port, err, c.want)
		}
		var re *ReplyError
		if !errors.As(err, &re) || !strings.Contains(err.Error(), c.id) {
			t.Errorf("Dial %s: %v does not carry the node's explanation", c.id, err)
		}
	}
	// The client refuses what it would not send.
	if _, err := Dial(context.Background(), n.addr, cfg, "MVM/../x", port); err == nil {
		t.Error("Dial accepted an id outside a-z0-9-")
	}
}

func TestTunnelNeedsAClusterCertificate(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	n := startNode(t, ca, time.Second)
	n.vms.Set("mvm-1", loopback, true)
	port := guestPort(t)
	noCert := &tls.Config{RootCAs: ca.Pool}
	if _, err := Dial(context.Background(), n.addr, noCert, "mvm-1", port); err == nil {
		t.Error("a client without a certificate opened a tunnel")
	}
	other := clustertest.NewCA(t, "another cluster")
	foreign := other.ClientConfig(t, "edge")
	foreign.RootCAs = ca.Pool
	if _, err := Dial(context.Background(), n.addr, foreign, "mvm-1", port); err == nil {
		t.Error("a client with another CA's certificate opened a tunnel")
	}
	if _, err := NewServer(ServerConfig{TLS: &tls.Config{}, Resolver: n.vms}); err == nil {
		t.Error("NewServer accepted a TLS config that does not verify clients")
	}
}

// rawTLS opens a TLS connection to the node and sends b as the header.
func rawTLS(t *testing.T, ca *clustertest.CA, addr string, b []byte) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, ca.ClientConfig(t, "edge"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	return c
}

func TestTunnelAnswersMalformedHeaders(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	n := startNode(t, ca, 300*time.Millisecond)
	for name, c := range map[string]struct {
		hdr  []byte
		want Code
	}{
		"garbage":     {[]byte("GET / HTTP/1.1\r\n\r\n"), CodeBadRequest},
		"version 2":   {[]byte("KTUN\x02\x01a\x00\x50"), CodeVersion},
		"empty id":    {[]byte("KTUN\x01\x00\x00\x50"), CodeBadRequest},
		"id too long": {[]byte("KTUN\x01\x41"), CodeBadRequest},
		"bad id":      {[]byte("KTUN\x01\x01A\x00\x50"), CodeBadRequest},
		"port 0":      {[]byte("KTUN\x01\x01a\x00\x00"), CodeBadRequest},
	} {
		rep, err := ReadReply(rawTLS(t, ca, n.addr, c.hdr))
		if err != nil || rep.Code != c.want || rep.Version != Version {
			t.Errorf("%s: reply %+v, %v; want code %d", name, rep, err, c.want)
		}
	}
	// A client that stops mid-header is cut off after HandshakeTimeout.
	start := time.Now()
	c := rawTLS(t, ca, n.addr, []byte("KTUN\x01\x05mv"))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("a stalled header got an answer")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stalled header held for %v (HandshakeTimeout 300ms)", d)
	}
}

func TestServeEndsOpenTunnels(t *testing.T) {
	ca := clustertest.NewCA(t, "cluster")
	vms := clustertest.NewGuests()
	vms.Set("mvm-1", loopback, true)
	s, err := NewServer(ServerConfig{TLS: ca.ServerConfig(t, "node"), Resolver: vms})
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	c, err := Dial(context.Background(), ln.Addr().String(), ca.ClientConfig(t, "edge"), "mvm-1", guestPort(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return with a tunnel open")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("tunnel still open after Serve ended: %v", err)
	}
}

func FuzzReadRequest(f *testing.F) {
	for _, r := range []Request{{"mvm-0123456789abcdef0123", 8080}, {"a", 1}, {strings.Repeat("z", MaxIDLen), 65535}} {
		b, _ := AppendRequest(nil, r)
		f.Add(b)
	}
	f.Add([]byte("KTUN\x02\x01a\x00\x50"))
	f.Add([]byte("KTUN\x01\xff"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rd := bytes.NewReader(data)
		req, err := ReadRequest(rd)
		if err != nil {
			return
		}
		used := data[:len(data)-rd.Len()]
		if len(used) > MaxRequestLen {
			t.Fatalf("read %d bytes, more than a request has", len(used))
		}
		b, err := AppendRequest(nil, req)
		if err != nil || !bytes.Equal(b, used) {
			t.Fatalf("accepted %q as %+v, which encodes as %q (%v)", used, req, b, err)
		}
	})
}

func FuzzReadReply(f *testing.F) {
	for _, r := range []Reply{{Version, CodeOK, ""}, {Version, CodeNotFound, "this node does not run microVM mvm-1"}, {7, CodeVersion, "x"}} {
		f.Add(AppendReply(nil, r))
	}
	f.Add([]byte("KTUN\x01\x09\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rd := bytes.NewReader(data)
		rep, err := ReadReply(rd)
		if err != nil {
			return
		}
		used := data[:len(data)-rd.Len()]
		if b := AppendReply(nil, rep); !bytes.Equal(b, used) {
			t.Fatalf("accepted %q as %+v, which encodes as %q", used, rep, b)
		}
		if rep.Code != CodeOK {
			_ = (&ReplyError{Code: rep.Code, Msg: rep.Msg}).Error()
		}
	})
}

// sinkPort is a guest port that reads everything and answers with one
// byte when the client half-closes.
func sinkPort(b *testing.B) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(io.Discard, c)
				c.Write([]byte{1})
			}()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

func benchNode(b *testing.B) (string, *tls.Config, uint16) {
	ca := clustertest.NewCA(b, "cluster")
	vms := clustertest.NewGuests()
	vms.Set("mvm-1", loopback, true)
	s, err := NewServer(ServerConfig{TLS: ca.ServerConfig(b, "node"), Resolver: vms})
	if err != nil {
		b.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, ln); close(done) }()
	b.Cleanup(func() { cancel(); <-done })
	return ln.Addr().String(), ca.ClientConfig(b, "edge"), sinkPort(b)
}

// BenchmarkTunnelOpen: one tunnel per op (TCP, TLS 1.3 with client
// certificates, header, guest dial, reply), closed at once.
func BenchmarkTunnelOpen(b *testing.B) {
	addr, cfg, port := benchNode(b)
	for b.Loop() {
		c, err := Dial(context.Background(), addr, cfg, "mvm-1", port)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkTunnelThroughput: bytes through one open tunnel to a guest.
func BenchmarkTunnelThroughput(b *testing.B) {
	addr, cfg, port := benchNode(b)
	c, err := Dial(context.Background(), addr, cfg, "mvm-1", port)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		b.Fatal(err)
	}
}
