package edge

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestEdgeRoutesEachMicrovmToItsNode: two microVMs on two nodes with the
// same guest address, and a third on one of the nodes, each get their
// own answers, over HTTP/1.1 and HTTP/2, while the proxy keeps tunnels
// alive between requests.
func TestEdgeRoutesEachMicrovmToItsNode(t *testing.T) {
	h := newHarness(t, time.Minute)
	h.guest("node-a", "mvm-a", guestAddr, store.StateRunning, []string{allIn}, false)
	h.guest("node-b", "mvm-b", guestAddr, store.StateRunning, nil, false)
	h.guest("node-a", "mvm-c", guestAddr2, store.StateRunning, nil, false)
	toks := map[string]string{"mvm-a": h.token("mvm-a"), "mvm-b": h.token("mvm-b"), "mvm-c": h.token("mvm-c")}
	vms := []struct{ id, want string }{{"mvm-a", "node-a/mvm-a"}, {"mvm-b", "node-b/mvm-b"}, {"mvm-c", "node-a/mvm-c"}}
	const rounds = 20
	start := time.Now()
	for i := range rounds {
		for _, c := range vms {
			client := h.client
			if i%2 == 1 {
				client = h.client1
			}
			if code, got := h.get(client, c.id, toks[c.id]); code != 200 || got != c.want {
				t.Fatalf("round %d: %s answered %d by %q, want %s", i, c.id, code, got, c.want)
			}
		}
	}
	took := time.Since(start)
	for _, name := range []string{"node-a", "node-b"} {
		n := h.nodes[name].dials.Load()
		t.Logf("%s: %d tunnels for its requests", name, n)
		if n > 6 {
			t.Errorf("%s: %d tunnels for %d requests: the proxy does not keep them", name, n, rounds)
		}
	}
	t.Logf("%d requests in %v (%v each, TLS to the edge and tunnels kept alive)", 3*rounds, took, took/(3*rounds))
	if n := h.waker.count(); n != 0 {
		t.Errorf("running microVMs were woken %d times", n)
	}
}

// TestEdgeFollowsAMovedMicrovm: a node that no longer runs the microVM
// makes the edge drop its route and use the node the store names now,
// within the route's TTL; a terminated one is 404.
func TestEdgeFollowsAMovedMicrovm(t *testing.T) {
	h := newHarness(t, time.Hour) // only the tunnel's answer invalidates the route
	old := h.guest("node-a", "mvm-m", guestAddr, store.StateRunning, nil, false)
	tok := h.token("mvm-m")
	if code, got := h.get(h.client, "mvm-m", tok); code != 200 || got != "node-a/mvm-m" {
		t.Fatalf("before the move: %d %q", code, got)
	}
	// The microVM leaves node-a (its app ends with it) for node-b.
	h.nodes["node-a"].guests.Remove("mvm-m")
	old.Close()
	moved := h.app("node-b", "mvm-m", guestAddr2, true)
	h.moveRecord("mvm-m", "node-b")
	for i := range 3 {
		if code, got := h.get(h.client, "mvm-m", tok); code != 200 || got != "node-b/mvm-m" {
			t.Fatalf("after the move, request %d: %d %q", i, code, got)
		}
	}
	// Terminated: gone from its node and TERMINATED in the store.
	h.nodes["node-b"].guests.Remove("mvm-m")
	moved.Close()
	h.setState("mvm-m", store.StateTerminated)
	if code, got := h.get(h.client, "mvm-m", tok); code != 404 {
		t.Fatalf("terminated: %d %q, want 404", code, got)
	}
	if code, got := h.get(h.client1, "mvm-m", tok); code != 404 {
		t.Fatalf("terminated, once more: %d %q, want 404", code, got)
	}
	if n := h.waker.count(); n != 0 {
		t.Errorf("woken %d times", n)
	}
}

// TestEdgeChecksTokensBeforeWaking: a request without a valid token for
// the microVM, or to one without ingress, never wakes it; a valid one
// wakes it through its node, once.
func TestEdgeChecksTokensBeforeWaking(t *testing.T) {
	h := newHarness(t, time.Minute)
	h.guest("node-a", "mvm-s", guestAddr, store.StateSuspended, []string{allIn}, true)
	h.guest("node-b", "mvm-n", guestAddr, store.StateSuspended, []string{noIn}, true)
	h.guest("node-b", "mvm-f", guestAddr2, store.StateSuspended, nil, false)
	for _, c := range []struct {
		name, id, tok string
		want          int
	}{
		{"no token", "mvm-s", "", 401},
		{"garbage token", "mvm-s", "not-a-token", 401},
		{"another microVM's token", "mvm-s", h.token("mvm-n"), 403},
		{"no ingress", "mvm-n", h.token("mvm-n"), 403},
		{"unknown microVM", "mvm-zzz", h.token("mvm-zzz"), 404},
	} {
		if code, body := h.get(h.client, c.id, c.tok); code != c.want {
			t.Errorf("%s: %d (%s), want %d", c.name, code, body, c.want)
		}
	}
	if n := h.waker.count(); n != 0 {
		t.Fatalf("refused requests woke microVMs %d times: %v", n, h.waker.calls)
	}
	tok := h.token("mvm-s")
	for i := range 3 {
		if code, got := h.get(h.client, "mvm-s", tok); code != 200 || got != "node-a/mvm-s" {
			t.Fatalf("request %d: %d %q", i, code, got)
		}
	}
	if fmt.Sprint(h.waker.calls) != "[node-a/mvm-s]" {
		t.Errorf("waker calls %v, want one for node-a/mvm-s", h.waker.calls)
	}
	if code, body := h.get(h.client, "mvm-f", h.token("mvm-f")); code != 503 {
		t.Errorf("suspended without auto-resume: %d (%s), want 503", code, body)
	}
}

// TestEdgeWakesAfterAStaleRoute: the cached route said RUNNING, but the
// microVM was suspended meanwhile; the node's "not running" makes the
// edge wake it and retry instead of failing the request.
func TestEdgeWakesAfterAStaleRoute(t *testing.T) {
	h := newHarness(t, time.Hour)
	g := h.guest("node-a", "mvm-x", guestAddr, store.StateRunning, nil, true)
	tok := h.token("mvm-x")
	if code, got := h.get(h.client, "mvm-x", tok); code != 200 || got != "node-a/mvm-x" {
		t.Fatalf("%d %q", code, got)
	}
	h.setState("mvm-x", store.StateSuspended)
	h.nodes["node-a"].guests.Set("mvm-x", guestAddr, false)
	g.CloseClientConnections()
	if code, got := h.get(h.client, "mvm-x", tok); code != 200 || got != "node-a/mvm-x" {
		t.Fatalf("after a suspend behind the cache: %d %q", code, got)
	}
	if fmt.Sprint(h.waker.calls) != "[node-a/mvm-x]" {
		t.Errorf("waker calls %v, want one for node-a/mvm-x", h.waker.calls)
	}
}

// TestEdgeReportsActivity: each node hears of its own microVMs' traffic;
// a microVM with a request open is active now; a node that could not be
// told hears it with the next report.
func TestEdgeReportsActivity(t *testing.T) {
	h := newHarness(t, time.Minute)
	h.guest("node-a", "mvm-a", guestAddr, store.StateRunning, nil, false)
	h.guest("node-b", "mvm-b", guestAddr, store.StateRunning, nil, false)
	before := time.Now()
	for _, id := range []string{"mvm-a", "mvm-b"} {
		if code, _ := h.get(h.client, id, h.token(id)); code != 200 {
			t.Fatalf("%s: %d", id, code)
		}
	}
	ctx := context.Background()
	h.edge.Report(ctx)
	got := h.reports.got
	if a, b := got["node-a"]["mvm-a"], got["node-b"]["mvm-b"]; a.Before(before) || b.Before(before) || len(got["node-a"]) != 1 || len(got["node-b"]) != 1 {
		t.Fatalf("reports %v", got)
	}
	// A request still open (a stream) keeps its microVM active.
	h.edge.ConnOpened("mvm-a")
	time.Sleep(10 * time.Millisecond)
	mark := time.Now()
	h.edge.Report(ctx)
	if a := got["node-a"]["mvm-a"]; a.Before(mark) {
		t.Errorf("open request reported as active at %v, before the report (%v)", a, mark)
	}
	h.edge.ConnClosed("mvm-a")
	// A node that is unreachable keeps its entries.
	h.reports.fail["node-b"] = true
	h.edge.ConnOpened("mvm-b")
	h.edge.ConnClosed("mvm-b")
	closed := time.Now()
	h.edge.Report(ctx)
	h.reports.fail["node-b"] = false
	h.edge.Report(ctx)
	if b := got["node-b"]["mvm-b"]; b.After(closed) || b.Before(mark) {
		t.Errorf("node-b heard %v, want the close before %v", b, closed)
	}
	h.edge.Report(ctx)
	h.edge.mu.Lock()
	left := len(h.edge.acts)
	h.edge.mu.Unlock()
	if left != 0 {
		t.Errorf("%d activity entries left after everything was reported", left)
	}

	// Run reports by itself, every ReportEvery.
	h.edge.cfg.ReportEvery = 10 * time.Millisecond
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { h.edge.Run(rctx); close(done) }()
	defer func() { cancel(); <-done }()
	h.edge.ConnOpened("mvm-b")
	mark = time.Now()
	deadline := time.Now().Add(5 * time.Second)
	for {
		h.reports.mu.Lock()
		b := got["node-b"]["mvm-b"]
		h.reports.mu.Unlock()
		if !b.Before(mark) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Run did not report an open request within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	h.edge.ConnClosed("mvm-b")
}

// TestEdgeForgetsAnUnreachableNode: a node that does not answer at the
// address cached for it costs one failed request; the next one reads the
// store, which names its new address.
func TestEdgeForgetsAnUnreachableNode(t *testing.T) {
	h := newHarness(t, time.Hour)
	h.guest("node-a", "mvm-u", guestAddr, store.StateRunning, nil, false)
	tok := h.token("mvm-u")
	if code, got := h.get(h.client, "mvm-u", tok); code != 200 {
		t.Fatalf("%d %q", code, got)
	}
	// node-a re-registers at node-b's address (a restart on another
	// port, say); what it had is gone with the old address.
	ctx := context.Background()
	nb, _ := h.locator.GetNode(ctx, "node-b")
	na, _ := h.locator.GetNode(ctx, "node-a")
	na.TunnelAddr = nb.TunnelAddr
	if _, err := h.locator.RegisterNode(ctx, na); err != nil {
		t.Fatal(err)
	}
	h.app("node-b", "mvm-u", guestAddr2, true)
	h.nodes["node-a"].stop()
	code, _ := h.get(h.client, "mvm-u", tok)
	if code == 200 {
		t.Fatal("reached a stopped node")
	}
	if code, got := h.get(h.client, "mvm-u", tok); code != 200 || got != "node-b/mvm-u" {
		t.Fatalf("after the node's new address: %d %q", code, got)
	}
}

// TestRouteCache: routes are reused within RouteTTL, read again after it,
// and the cache stays within MaxRoutes.
func TestRouteCache(t *testing.T) {
	h := newHarness(t, time.Minute)
	now := time.Now()
	clock := func() time.Time { return now }
	b, err := New(Config{Store: h.locator, TLS: h.edge.cfg.TLS, Waker: h.waker, Activity: h.reports,
		RouteTTL: time.Second, MaxRoutes: 8, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 20 {
		h.guest("node-a", fmt.Sprintf("mvm-%02d", i), guestAddr, store.StateRunning, nil, false)
	}
	tgt, err := b.Lookup(ctx, "mvm-00")
	if err != nil || !tgt.Ingress || tgt.Account != account {
		t.Fatalf("Lookup: %+v, %v", tgt, err)
	}
	h.moveRecord("mvm-00", "node-b")
	if tgt2, _ := b.Lookup(ctx, "mvm-00"); tgt2.Route != tgt.Route {
		t.Error("the route was read again within RouteTTL")
	}
	now = now.Add(time.Second)
	if tgt2, _ := b.Lookup(ctx, "mvm-00"); tgt2.Route == tgt.Route {
		t.Error("the route was not read again after RouteTTL")
	}
	for i := range 20 {
		if _, err := b.Lookup(ctx, fmt.Sprintf("mvm-%02d", i)); err != nil {
			t.Fatal(err)
		}
		if n := len(b.routes); n > 8 {
			t.Fatalf("%d routes cached, MaxRoutes 8", n)
		}
	}
	h.setState("mvm-05", store.StateTerminated)
	now = now.Add(time.Second)
	if _, err := b.Lookup(ctx, "mvm-05"); !errors.Is(err, proxy.ErrNotFound) {
		t.Errorf("terminated: %v, want proxy.ErrNotFound", err)
	}
}

// TestEdgeWhileStoreAndNodeDisagree: the store still names a node that no
// longer has the microVM (a move not recorded yet): 503, for the client
// to retry, and the route is not kept.
func TestEdgeWhileStoreAndNodeDisagree(t *testing.T) {
	h := newHarness(t, time.Hour)
	g := h.guest("node-a", "mvm-d", guestAddr, store.StateRunning, nil, false)
	tok := h.token("mvm-d")
	if code, got := h.get(h.client, "mvm-d", tok); code != 200 {
		t.Fatalf("%d %q", code, got)
	}
	h.nodes["node-a"].guests.Remove("mvm-d")
	g.Close()
	if code, got := h.get(h.client, "mvm-d", tok); code != 503 {
		t.Fatalf("node without the microVM the store places there: %d %q, want 503", code, got)
	}
	if _, ok := h.edge.cached("mvm-d"); ok {
		t.Error("the route the node refused is still cached")
	}
}

// TestEdgeWebSocket: a WebSocket reaches its own microVM through the
// tunnel (two nodes, the same guest address), and while it is open its
// microVM is reported active now.
func TestEdgeWebSocket(t *testing.T) {
	h := newHarness(t, time.Minute)
	h.guest("node-a", "mvm-a", guestAddr, store.StateRunning, nil, false)
	h.guest("node-b", "mvm-b", guestAddr, store.StateRunning, nil, false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conns := map[string]*websocket.Conn{}
	for _, id := range []string{"mvm-a", "mvm-b"} {
		c, resp, err := websocket.Dial(ctx, "wss://"+id+"."+domain+"/ws", &websocket.DialOptions{
			HTTPClient: h.client1, Subprotocols: []string{proxy.SubprotoAuth + h.token(id)}})
		if err != nil {
			t.Fatalf("%s: %v (%v)", id, err, resp)
		}
		defer c.CloseNow()
		conns[id] = c
	}
	for i := range 3 {
		for id, c := range conns {
			msg := fmt.Sprintf("m%d", i)
			if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
				t.Fatal(err)
			}
			_, got, err := c.Read(ctx)
			node := map[string]string{"mvm-a": "node-a", "mvm-b": "node-b"}[id]
			if err != nil || string(got) != node+"/"+id+":"+msg {
				t.Fatalf("%s: %q, %v", id, got, err)
			}
		}
	}
	mark := time.Now()
	h.edge.Report(ctx)
	for node, id := range map[string]string{"node-a": "mvm-a", "node-b": "mvm-b"} {
		if seen := h.reports.got[node][id]; seen.Before(mark) {
			t.Errorf("%s with a WebSocket open reported at %v, before the report", id, seen)
		}
	}
}
