package edge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/kiln-sandbox/kiln/internal/cluster/clustertest"
	"github.com/kiln-sandbox/kiln/internal/cluster/tunnel"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/server/endpoint"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/token"
)

const (
	domain  = "microvm.localhost"
	account = "111122223333"
	allIn   = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS"
	noIn    = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:NO_INGRESS"
)

// Guest addresses on the nodes' host networks: two nodes' guests may
// have the same one, and the edge must never mix them up.
var (
	guestAddr  = netip.MustParseAddr("10.200.0.2")
	guestAddr2 = netip.MustParseAddr("10.200.0.3")
)

// clusterStore is what the test needs of the store: the edge's reads and
// node registration.
type clusterStore interface {
	Locator
	RegisterNode(ctx context.Context, n store.Node) (store.Node, error)
}

// recordingWaker stands in for the node's lifecycle service (reached
// over gRPC in kiln edge): it records each call, and wakes a microVM by
// recording it RUNNING and letting its node's guest run.
type recordingWaker struct {
	h     *harness
	mu    sync.Mutex
	calls []string // "node/id"
}

func (w *recordingWaker) EnsureRunning(ctx context.Context, node store.Node, id string) error {
	w.mu.Lock()
	w.calls = append(w.calls, node.Name+"/"+id)
	w.mu.Unlock()
	m, err := w.h.locator.LocateMicrovm(ctx, id)
	if err != nil {
		return err
	}
	if m.IdlePolicy == nil || !m.IdlePolicy.AutoResumeEnabled {
		return proxy.ErrSuspended
	}
	w.h.setState(id, store.StateRunning)
	g := w.h.nodes[node.Name].guests
	tgt, err := g.Lookup(ctx, id)
	if err != nil {
		return err
	}
	g.Set(id, tgt.Addr, true)
	return nil
}

func (w *recordingWaker) count() int { w.mu.Lock(); defer w.mu.Unlock(); return len(w.calls) }

// recordingReporter stands in for the node's activity RPC.
type recordingReporter struct {
	mu   sync.Mutex
	fail map[string]bool
	got  map[string]map[string]time.Time // node → microVM → last seen
}

func (r *recordingReporter) Activity(_ context.Context, node store.Node, seen map[string]time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail[node.Name] {
		return errors.New("node unreachable")
	}
	if r.got[node.Name] == nil {
		r.got[node.Name] = map[string]time.Time{}
	}
	for id, t := range seen {
		r.got[node.Name][id] = t
	}
	return nil
}

// testNode is one "kiln node": a real tunnel server whose guests are real
// HTTP servers on loopback, reached through the node's own dial as if
// guestAddr were on its host network.
type testNode struct {
	name   string
	guests *clustertest.Guests
	dials  atomic.Int32
	mu     sync.Mutex
	ports  map[string]*httptest.Server // guestAddr:port → this node's guest
	stop   func()                      // ends the tunnel server and its tunnels
}

type harness struct {
	t       *testing.T
	st      *sqlite.Store
	locator clusterStore
	nodes   map[string]*testNode
	edge    *Backend
	waker   *recordingWaker
	reports *recordingReporter
	signer  *token.Signer
	client  *http.Client // HTTP/2
	client1 *http.Client // HTTP/1.1
}

func newHarness(t *testing.T, ttl time.Duration) *harness {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h := &harness{t: t, st: st, nodes: map[string]*testNode{}, reports: &recordingReporter{fail: map[string]bool{}, got: map[string]map[string]time.Time{}}}
	h.locator = st
	h.waker = &recordingWaker{h: h}
	ca := clustertest.NewCA(t, "kiln cluster")
	for _, name := range []string{"node-a", "node-b"} {
		h.startNode(ca, name)
	}
	h.edge, err = New(Config{Store: h.locator, TLS: ca.ClientConfig(t, "edge"), Waker: h.waker, Activity: h.reports, RouteTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	// The endpoints as `kiln edge` starts them.
	sctx, cancel := context.WithCancel(ctx)
	ep, err := endpoint.Start(sctx, endpoint.Config{Addr: "127.0.0.1:0", DataDir: dir, Key: []byte(strings.Repeat("k", 32)), Domain: domain, Grace: time.Second,
		Proxy: proxy.Config{Backend: h.edge, Dial: func(context.Context, string, string) (net.Conn, error) {
			return nil, errors.New("the edge dialled a guest directly")
		}}})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); ep.Wait() })
	h.signer = ep.Signer
	pem, err := os.ReadFile(ep.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	client := func(protos ...string) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: roots, NextProtos: protos},
			ForceAttemptHTTP2: len(protos) > 1,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, ep.Addr)
			},
		}}
	}
	h.client, h.client1 = client("h2", "http/1.1"), client("http/1.1")
	// Before the proxy's shutdown (cleanups run last first), which would
	// wait its grace for kept-alive connections.
	t.Cleanup(func() { h.client.CloseIdleConnections(); h.client1.CloseIdleConnections() })
	return h
}

func (h *harness) startNode(ca *clustertest.CA, name string) {
	t := h.t
	n := &testNode{name: name, guests: clustertest.NewGuests(), ports: map[string]*httptest.Server{}}
	srv, err := tunnel.NewServer(tunnel.ServerConfig{TLS: ca.ServerConfig(t, name), Resolver: n.guests,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			n.dials.Add(1)
			n.mu.Lock()
			g, ok := n.ports[addr]
			n.mu.Unlock()
			if !ok {
				return nil, fmt.Errorf("dial %s: connection refused", addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, g.Listener.Addr().String())
		}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	n.stop = sync.OnceFunc(func() { cancel(); <-done })
	t.Cleanup(n.stop)
	if _, err := h.locator.RegisterNode(ctx, store.Node{Name: name, TunnelAddr: ln.Addr().String(), RPCAddr: "127.0.0.1:1",
		CapacityMiB: 1 << 20, LeaseExpiresAt: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	h.nodes[name] = n
}

// guest starts microVM id's app on port 8080 of addr on node, answering
// with its name, and records the microVM placed there.
func (h *harness) guest(node, id string, addr netip.Addr, state store.MicrovmState, ingress []string, autoResume bool) *httptest.Server {
	g := h.app(node, id, addr, state == store.StateRunning)
	now := time.Now().UTC()
	m := store.Microvm{ID: id, Account: account, ARN: "arn:aws:lambda:us-east-1:" + account + ":microvm:" + id, State: state,
		ImageName: "img", ImageVersion: "1", IngressNetworkConnectors: ingress, MaximumDurationInSeconds: 600,
		IdlePolicy: &store.IdlePolicy{AutoResumeEnabled: autoResume}, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute)}
	if err := h.st.CreateMicrovm(context.Background(), m, nil); err != nil {
		h.t.Fatal(err)
	}
	h.moveRecord(id, node)
	return g
}

// app starts microVM id's app on node: port 8080 of addr answers with
// the node's and the microVM's name.
func (h *harness) app(node, id string, addr netip.Addr, running bool) *httptest.Server {
	n := h.nodes[node]
	g := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" {
			echo(w, r, node+"/"+id)
			return
		}
		json.NewEncoder(w).Encode(map[string]string{"guest": node + "/" + id, "auth": r.Header.Get(proxy.HeaderAuth)})
	}))
	h.t.Cleanup(g.Close)
	n.mu.Lock()
	n.ports[netip.AddrPortFrom(addr, 8080).String()] = g
	n.mu.Unlock()
	n.guests.Set(id, addr, running)
	return g
}

func (h *harness) moveRecord(id, node string) {
	if _, err := h.st.UpdateMicrovm(context.Background(), account, id, nil, func(m *store.Microvm) error {
		m.Node = node
		return nil
	}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) setState(id string, s store.MicrovmState) {
	if _, err := h.st.UpdateMicrovm(context.Background(), account, id, nil, func(m *store.Microvm) error {
		m.State = s
		return nil
	}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) token(id string) string {
	tok, _, err := h.signer.Mint(account, id, token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	if err != nil {
		h.t.Fatal(err)
	}
	return tok
}

// get requests https://id.DOMAIN/ with tok and returns the status and
// the guest that answered.
func (h *harness) get(c *http.Client, id, tok string) (int, string) {
	h.t.Helper()
	req, _ := http.NewRequest("GET", "https://"+id+"."+domain+"/", nil)
	if tok != "" {
		req.Header.Set(proxy.HeaderAuth, tok)
	}
	resp, err := c.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var got map[string]string
	json.Unmarshal(body, &got)
	if got["auth"] != "" {
		h.t.Fatalf("the guest saw the token")
	}
	if got["guest"] == "" {
		return resp.StatusCode, string(body)
	}
	return resp.StatusCode, got["guest"]
}

// echo serves a WebSocket that answers each message with name and it.
func echo(w http.ResponseWriter, r *http.Request, name string) {
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer c.CloseNow()
	for {
		typ, msg, err := c.Read(r.Context())
		if err != nil {
			return
		}
		if c.Write(r.Context(), typ, append([]byte(name+":"), msg...)) != nil {
			return
		}
	}
}
