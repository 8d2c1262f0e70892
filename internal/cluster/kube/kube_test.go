package kube

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// standInAPIServer is a STAND-IN for the Kubernetes API server (no
// cluster is available here): an httptest TLS server that serves one
// Node object at GET /api/v1/nodes/NAME and its changes as a watch stream
// at GET /api/v1/nodes?watch=true&fieldSelector=metadata.name=NAME, in the
// API server's JSON. It checks the bearer token on every request and
// records the tokens it saw. It is not a test of the API server: what a
// real one does (RBAC, field selector authorization, bookmarks, 410 after
// compaction) is listed in docs/CLUSTER.md as needing a real cluster.
type standInAPIServer struct {
	*httptest.Server
	name string

	mu      sync.Mutex
	node    corev1.Node
	rv      int
	changed chan struct{} // closed and replaced on every change
	token   string        // the valid bearer token
	tokens  []string      // tokens seen
	watches int
	expire  bool // answer the next watch with a 410 ERROR event
}

func newStandIn(t *testing.T, name string) *standInAPIServer {
	s := &standInAPIServer{name: name, changed: make(chan struct{}), token: "token-1"}
	s.node = corev1.Node{TypeMeta: metav1.TypeMeta{Kind: "Node", APIVersion: "v1"}, ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"}}
	s.rv = 1
	s.Server = httptest.NewTLSServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func (s *standInAPIServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.tokens = append(s.tokens, tok)
	ok := tok == s.token
	s.mu.Unlock()
	if !ok {
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(metav1.Status{Status: "Failure", Message: "Unauthorized", Code: 401})
		return
	}
	switch {
	case r.URL.Path == "/api/v1/nodes/"+s.name:
		s.mu.Lock()
		n := s.node
		s.mu.Unlock()
		json.NewEncoder(w).Encode(n)
	case r.URL.Path == "/api/v1/nodes" && r.URL.Query().Get("watch") == "true":
		if r.URL.Query().Get("fieldSelector") != "metadata.name="+s.name {
			http.Error(w, "watch without the field selector", http.StatusBadRequest)
			return
		}
		s.watch(w, r)
	default:
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(metav1.Status{Status: "Failure", Message: "nodes \"x\" not found", Code: 404})
	}
}

// watch sends every change after the requested resource version, then
// waits for more until the client goes or timeoutSeconds pass.
func (s *standInAPIServer) watch(w http.ResponseWriter, r *http.Request) {
	var from, timeout int
	fmt.Sscan(r.URL.Query().Get("resourceVersion"), &from)
	fmt.Sscan(r.URL.Query().Get("timeoutSeconds"), &timeout)
	end := time.After(time.Duration(max(timeout, 1)) * time.Second)
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	s.mu.Lock()
	s.watches++
	if s.expire {
		s.expire = false
		s.mu.Unlock()
		enc.Encode(map[string]any{"type": "ERROR", "object": metav1.Status{Status: "Failure", Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old resource version"}})
		return
	}
	s.mu.Unlock()
	for {
		s.mu.Lock()
		n, rv, ch := s.node, s.rv, s.changed
		s.mu.Unlock()
		if rv > from {
			enc.Encode(map[string]any{"type": "MODIFIED", "object": n})
			// A bookmark as the API server sends them: only the version.
			enc.Encode(map[string]any{"type": "BOOKMARK", "object": corev1.Node{TypeMeta: n.TypeMeta, ObjectMeta: metav1.ObjectMeta{ResourceVersion: n.ResourceVersion}}})
			w.(http.Flusher).Flush()
			from = rv
		}
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-end:
			return // the watch's timeoutSeconds: the client watches again
		}
	}
}

func (s *standInAPIServer) set(f func(n *corev1.Node)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.node)
	s.rv++
	s.node.ResourceVersion = fmt.Sprint(s.rv)
	close(s.changed)
	s.changed = make(chan struct{})
}

// serviceAccountDir writes the token and the CA as the kubelet mounts
// them, and points KUBERNETES_SERVICE_HOST/PORT at the stand-in.
func serviceAccountDir(t *testing.T, s *standInAPIServer) string {
	dir := t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(s.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(s.Listener.Addr().String())
	t.Setenv("KUBERNETES_SERVICE_HOST", host)
	t.Setenv("KUBERNETES_SERVICE_PORT", port)
	return dir
}

func sqliteStore(t *testing.T) *sqlite.Store {
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestCordonWatcherFollowsNode: against the stand-in API server and a real
// SQLite store, the watcher records a node's cordon once it registers,
// follows cordon and uncordon through the watch, survives a 410 Gone and
// a rotated token, and reads the in-cluster configuration as the kubelet
// provides it.
func TestCordonWatcherFollowsNode(t *testing.T) {
	api := newStandIn(t, "host-a")
	dir := serviceAccountDir(t, api)
	if !InCluster() {
		t.Fatal("InCluster with KUBERNETES_SERVICE_HOST set")
	}
	c, err := NewInCluster(dir)
	if err != nil {
		t.Fatal(err)
	}
	st := sqliteStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The Node is cordoned before kiln's node has registered: the
	// watcher must keep trying until it can record it.
	api.set(func(n *corev1.Node) { n.Spec.Unschedulable = true })
	w := &CordonWatcher{Client: c, KubeNode: "host-a", KilnNode: "kiln-a", Store: st, Retry: 50 * time.Millisecond, WatchTimeout: time.Second}
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	time.Sleep(200 * time.Millisecond)
	if _, err := st.RegisterNode(ctx, store.Node{Name: "kiln-a", RPCAddr: "127.0.0.1:1", CapacityMiB: 1024, LeaseExpiresAt: time.Now().Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	waitCordoned(t, st, "kiln-a", true)

	api.set(func(n *corev1.Node) { n.Spec.Unschedulable = false })
	waitCordoned(t, st, "kiln-a", false)

	// An unrelated change (a label) leaves a manual cordon alone.
	if err := st.SetNodeCordoned(ctx, "kiln-a", true); err != nil {
		t.Fatal(err)
	}
	api.set(func(n *corev1.Node) { n.Labels = map[string]string{"x": "y"} })
	time.Sleep(200 * time.Millisecond)
	waitCordoned(t, st, "kiln-a", true)
	if err := st.SetNodeCordoned(ctx, "kiln-a", false); err != nil {
		t.Fatal(err)
	}

	// 410 Gone: the watcher reads the Node afresh and goes on.
	api.mu.Lock()
	api.expire = true
	watches := api.watches
	api.mu.Unlock()
	api.set(func(n *corev1.Node) { n.Labels = map[string]string{"x": "z"} }) // ends the current watch's wait
	deadline := time.Now().Add(10 * time.Second)
	for {
		api.mu.Lock()
		w, e := api.watches, api.expire
		api.mu.Unlock()
		if !e && w > watches+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no watch after the 410")
		}
		time.Sleep(20 * time.Millisecond)
	}
	api.set(func(n *corev1.Node) { n.Spec.Unschedulable = true })
	waitCordoned(t, st, "kiln-a", true)

	// The kubelet rotates the token in place: the next request uses it.
	api.mu.Lock()
	api.token = "token-2"
	api.mu.Unlock()
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte("token-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // past one WatchTimeout
	api.set(func(n *corev1.Node) { n.Spec.Unschedulable = false })
	waitCordoned(t, st, "kiln-a", false)
	api.mu.Lock()
	last := api.tokens[len(api.tokens)-1]
	api.mu.Unlock()
	if last != "token-2" {
		t.Errorf("last token %q, want the rotated token-2", last)
	}
	cancel()
	<-done
}

func waitCordoned(t *testing.T, st store.Cluster, name string, want bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := st.GetNode(context.Background(), name)
		if err == nil && n.Cordoned == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s: cordoned %v (err %v), want %v", name, n.Cordoned, err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestClientErrors: the errors say what to fix.
func TestClientErrors(t *testing.T) {
	api := newStandIn(t, "host-a")
	dir := serviceAccountDir(t, api)
	c, err := NewInCluster(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetNode(context.Background(), "other"); err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), "--kube-node") {
		t.Errorf("unknown node: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "token"), []byte("wrong"), 0o600)
	if _, err := c.GetNode(context.Background(), "host-a"); err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "rbac.yaml") {
		t.Errorf("bad token: %v", err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	if _, err := NewInCluster(dir); err == nil {
		t.Error("NewInCluster outside a Pod succeeded")
	}
}

// TestDecodeEvents: the watch stream parser keeps what it should and
// refuses what it should.
func TestDecodeEvents(t *testing.T) {
	var got []string
	fn := func(n *corev1.Node) error {
		got = append(got, fmt.Sprintf("%s/%s/%v", n.Name, n.ResourceVersion, n.Spec.Unschedulable))
		return nil
	}
	ok := `{"type":"ADDED","object":{"kind":"Node","metadata":{"name":"a","resourceVersion":"5"}}}
{"type":"MODIFIED","object":{"kind":"Node","metadata":{"name":"a","resourceVersion":"6"},"spec":{"unschedulable":true}}}
{"type":"BOOKMARK","object":{"kind":"Node","metadata":{"resourceVersion":"9"}}}
{"type":"DELETED","object":{"kind":"Node","metadata":{"name":"a","resourceVersion":"10"}}}
`
	if err := DecodeEvents(strings.NewReader(ok), "a", fn); err != nil {
		t.Fatal(err)
	}
	if want := "a/5/false a/6/true /9/false"; strings.Join(got, " ") != want {
		t.Errorf("events %q, want %q", strings.Join(got, " "), want)
	}
	for name, in := range map[string]string{
		"other node": `{"type":"MODIFIED","object":{"metadata":{"name":"b"}}}`,
		"bad type":   `{"type":"SHRUG","object":{}}`,
		"error":      `{"type":"ERROR","object":{"code":500,"message":"boom"}}`,
		"garbage":    `{"type":`,
	} {
		if err := DecodeEvents(strings.NewReader(in), "a", fn); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if err := DecodeEvents(strings.NewReader(`{"type":"ERROR","object":{"code":410}}`), "a", fn); err != ErrExpired {
		t.Errorf("410: %v, want ErrExpired", err)
	}
}

// FuzzDecodeEvents: no watch stream makes the parser panic or hand fn a
// Node of another name.
func FuzzDecodeEvents(f *testing.F) {
	f.Add([]byte(`{"type":"MODIFIED","object":{"kind":"Node","metadata":{"name":"a","resourceVersion":"6"},"spec":{"unschedulable":true}}}`))
	f.Add([]byte(`{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}` + "\n" + `{"type":"ERROR","object":{"code":410}}`))
	f.Add([]byte(`{"type":"ADDED","object":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		DecodeEvents(strings.NewReader(string(b)), "a", func(n *corev1.Node) error {
			if n.Name != "a" && n.Name != "" {
				t.Fatalf("handed node %q", n.Name)
			}
			return nil
		})
	})
}
