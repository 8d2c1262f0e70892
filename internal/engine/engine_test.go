//go:build linux

package engine_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/vishvananda/netlink"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/token"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu/qemutest"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// These tests run real microVMs (TCG here) in the server `kiln server`
// runs, assembled by internal/server: its life cycle, API, endpoint proxy
// and engine. They live in package engine_test because internal/server
// imports this package; export_test.go lends them the few internals they
// read. Outside CI they skip when the engine is not set up; in CI they
// fail. One driver and one template, made once in TestMain, serve every
// test that does not need a driver of its own.

const (
	testAccount = "123456789012"
	testImage   = "app"
	testDomain  = "microvm.localhost"
)

var fx *qemutest.AppFixture

func TestMain(m *testing.M) {
	if testenv.SkipMain("engine", "network namespaces and VMs") {
		os.Exit(m.Run())
	}
	env := vmmtest.SetupOrSkip("engine")
	if env == nil {
		os.Exit(m.Run())
	}
	fx = qemutest.NewAppFixture(env, "ke", "./testdata/app")
	code := m.Run()
	fx.Close()
	env.Cleanup()
	os.Exit(code)
}

// harness is one kiln server as `kiln server` assembles it
// (internal/server: store, engine, life cycle, API, endpoint proxy) on a
// driver the test owns, with handles on its parts.
type harness struct {
	t      *testing.T
	drv    vmm.Driver
	stop   func() // ends the server and waits until it has stopped
	keep   bool   // the VMs outlive this harness (a restart test)
	st     store.Store
	eng    *engine.Engine
	srv    *api.Server
	signer *token.Signer
	addr   string // endpoint listener
	client *http.Client
	ids    []string
	hooks  *store.Hooks // the version's, copied into each record as RunMicrovm does
}

func newHarness(t *testing.T, opts ...func(*engine.Config)) *harness {
	t.Helper()
	needFixture(t)
	return newHarnessAt(t, fx.Driver, t.TempDir(), true, opts...)
}

func needFixture(t *testing.T) {
	t.Helper()
	if fx == nil {
		t.Skip("engine not set up")
	}
	if fx.Err != nil {
		t.Fatalf("fixture: %v", fx.Err)
	}
}

// newHarnessAt runs a server over drv with its state in dir (server.New
// recovers what dir's store records, as a restarted `kiln server` does);
// fresh makes the image records (a restarted server finds them instead).
// opts adjust the engine's configuration after the server's own.
func newHarnessAt(t *testing.T, drv vmm.Driver, dir string, fresh bool, opts ...func(*engine.Config)) *harness {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := server.New(ctx, server.Options{Backend: "engine", Driver: drv, DataDir: dir,
		APIAddr: "127.0.0.1:0", EndpointAddr: "127.0.0.1:0", Domain: testDomain, Region: "us-east-1",
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
		EngineConfig: func(c *engine.Config) {
			c.IdleInterval = 200 * time.Millisecond
			for _, o := range opts {
				o(c)
			}
		}})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }()
	var once sync.Once
	h := &harness{t: t, st: s.Store, drv: drv, eng: s.Engine, srv: s.API, signer: s.EndpointSigner, addr: s.EndpointAddr}
	h.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-served; err != nil {
				t.Errorf("server: %v", err)
			}
		})
	}

	// The client trusts DATA_DIR/ca.pem only, as curl --cacert would.
	pem, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		h.stop()
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		h.stop()
		t.Fatal("ca.pem holds no certificate")
	}
	h.client = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, h.addr) // *.microvm.localhost is loopback
		},
	}}

	img := store.Image{Account: testAccount, Name: testImage, ARN: "arn:aws:lambda:us-east-1:" + testAccount + ":microvm-image:" + testImage,
		State: store.ImageCreated, LatestVersion: "1", LatestActiveVersion: "1", CreatedAt: time.Now(), UpdatedAt: time.Now()}
	port := int64(8080)
	v := store.ImageVersion{Account: testAccount, ImageName: testImage, ImageARN: img.ARN, Version: "1",
		State: store.VersionSuccessful, Status: store.VersionActive, CreatedAt: time.Now(), UpdatedAt: time.Now(),
		Config: store.ImageConfig{Hooks: &store.Hooks{Port: &port, MicrovmHooks: &store.MicrovmHooks{Run: "ENABLED", Resume: "ENABLED", Suspend: "ENABLED", Terminate: "ENABLED"}}}}
	h.hooks = v.Config.Hooks
	t.Cleanup(func() {
		// Whatever happened, no VM or network of this test stays.
		for _, id := range h.ids {
			if !h.keep {
				drv.Terminate(context.Background(), id)
			}
			netns.Teardown(context.Background(), id)
		}
		h.stop()
	})
	if fresh {
		if err := h.st.CreateImage(ctx, img, v, nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := h.eng.SetTemplate(testAccount, testImage, "1", fx.Template); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

var seq int

// run creates a microVM record as RunMicrovm does and starts it.
func (h *harness) run(ingress []string, idle *store.IdlePolicy) store.Microvm {
	h.t.Helper()
	return h.runWith(ingress, nil, idle)
}

func (h *harness) runWith(ingress, egress []string, idle *store.IdlePolicy) store.Microvm {
	h.t.Helper()
	seq++
	now := time.Now().UTC()
	id := fmt.Sprintf("mvm-%08x%04x", os.Getpid(), seq)
	m := store.Microvm{ID: id, Account: testAccount, ARN: "arn:aws:lambda:us-east-1:" + testAccount + ":microvm:" + id,
		State: store.StatePending, ImageName: testImage, ImageVersion: "1", IdlePolicy: idle, MaximumDurationInSeconds: 600,
		RunHookPayload: "payload-" + id, IngressNetworkConnectors: ingress, EgressNetworkConnectors: egress, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute),
		Hooks: h.hooks}
	ctx := context.Background()
	if err := h.st.CreateMicrovm(ctx, m, nil); err != nil {
		h.t.Fatal(err)
	}
	h.ids = append(h.ids, id)
	if err := h.eng.StartMicrovm(ctx, m); err != nil {
		h.t.Fatal(err)
	}
	return h.wait(id, store.StateRunning, 60*time.Second)
}

func (h *harness) wait(id string, want store.MicrovmState, timeout time.Duration) store.Microvm {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, err := h.st.GetMicrovm(context.Background(), testAccount, id)
		if err != nil {
			h.t.Fatal(err)
		}
		if m.State == want {
			return m
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("microvm %s is %s (%s), want %s", id, m.State, m.StateReason, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *harness) token(id string, ports ...token.PortRange) string {
	h.t.Helper()
	if len(ports) == 0 {
		ports = []token.PortRange{token.AllPorts}
	}
	tok, _, err := h.signer.Mint(testAccount, id, token.KindEndpoint, ports, 5*time.Minute)
	if err != nil {
		h.t.Fatal(err)
	}
	return tok
}

// get sends GET path to the microVM's endpoint and returns status and body.
func (h *harness) get(id, path, tok string, hdr map[string]string) (int, string) {
	h.t.Helper()
	req, _ := http.NewRequest("GET", "https://"+id+"."+testDomain+path, nil)
	if tok != "" {
		req.Header.Set(proxy.HeaderAuth, tok)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		h.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b)
}

const (
	allIngress   = "arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnAllIngress
	shellIngress = "arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnShellIngress
)

func TestEndpointLifecycle(t *testing.T) {
	h := newHarness(t)
	m := h.run([]string{allIngress, shellIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 3, SuspendedDurationSeconds: 600, AutoResumeEnabled: true})
	tok := h.token(m.ID)

	t.Run("requests", func(t *testing.T) {
		tests := []struct {
			name     string
			path     string
			tok      string
			hdr      map[string]string
			wantCode int
			wantBody string
		}{
			{name: "reaches port 8080", path: "/count", tok: tok, wantCode: 200, wantBody: "count=1"},
			{name: "run hook got the payload", path: "/payload", tok: tok, wantCode: 200, wantBody: "payload-" + m.ID},
			{name: "X-aws-proxy-port selects 8081", path: "/", tok: tok, hdr: map[string]string{proxy.HeaderPort: "8081"}, wantCode: 200, wantBody: "port 8081"},
			{name: "no token", path: "/count", wantCode: 401},
			{name: "garbage token", path: "/count", tok: "kt1.nope.nope", wantCode: 401},
			{name: "token of another microvm", path: "/count", tok: h.token("mvm-other"), wantCode: 403},
			{name: "token for another port", path: "/", tok: h.token(m.ID, token.Port(8080)), hdr: map[string]string{proxy.HeaderPort: "8081"}, wantCode: 403},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				code, body := h.get(m.ID, tc.path, tc.tok, tc.hdr)
				if code != tc.wantCode || (tc.wantBody != "" && body != tc.wantBody) {
					t.Fatalf("got %d %q, want %d %q", code, body, tc.wantCode, tc.wantBody)
				}
			})
		}
	})

	t.Run("shell over websocket", func(t *testing.T) {
		shellTok, _, err := h.signer.Mint(testAccount, m.ID, token.KindShell, []token.PortRange{token.Port(proxy.ShellPort)}, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, _, err := websocket.Dial(ctx, "wss://"+m.ID+"."+testDomain+"/?cols=100&rows=30", &websocket.DialOptions{
			HTTPClient:   h.client,
			Subprotocols: []string{proxy.SubprotoAuth + shellTok, proxy.SubprotoPort + "8022"},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		if err := c.Write(ctx, websocket.MessageText, []byte(`{"cols":120,"rows":40}`)); err != nil {
			t.Fatal(err)
		}
		if err := c.Write(ctx, websocket.MessageBinary, []byte("echo hi-$((40+2)); stty size; exit 3\n")); err != nil {
			t.Fatal(err)
		}
		var out []byte
		for {
			_, b, err := c.Read(ctx)
			if err != nil {
				if websocket.CloseStatus(err) != websocket.StatusNormalClosure || !strings.Contains(err.Error(), "exit 3") {
					t.Errorf("close: %v, want normal closure with exit 3", err)
				}
				break
			}
			out = append(out, b...)
		}
		if !strings.Contains(string(out), "hi-42") || !strings.Contains(string(out), "40 120") {
			t.Errorf("shell output %q lacks hi-42 and the size 40 120", out)
		}
	})

	t.Run("app output is kept", func(t *testing.T) {
		deadline := time.Now().Add(5 * time.Second)
		for {
			data, _, err := h.eng.MicrovmLog(context.Background(), m, 0, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(data), "served count=1") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("log %q lacks the app's output", data)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("idle suspend then auto-resume keeps memory", func(t *testing.T) {
		s := h.wait(m.ID, store.StateSuspended, 30*time.Second)
		if !strings.HasPrefix(s.StateReason, "IdleTimeout") {
			t.Errorf("stateReason %q, want IdleTimeout...", s.StateReason)
		}
		if info, err := h.drv.Inspect(context.Background(), m.ID); err != nil || info.State != vmm.StateSuspended {
			t.Fatalf("driver: %+v %v, want suspended", info, err)
		}
		start := time.Now()
		code, body := h.get(m.ID, "/count", tok, nil)
		if code != 200 || body != "count=2" {
			t.Fatalf("after resume: %d %q, want 200 count=2 (state kept)", code, body)
		}
		t.Logf("request to a suspended microVM answered in %s", time.Since(start).Round(time.Millisecond))
		h.wait(m.ID, store.StateRunning, time.Second)
		code, body = h.get(m.ID, "/hooks", tok, nil)
		// (More rounds if a slow machine idled the VM during the requests.)
		if code != 200 || !strings.HasPrefix(body, "[run suspend resume") {
			t.Errorf("hooks seen by the app: %d %q, want [run suspend resume]", code, body)
		}
	})

	t.Run("a request during a suspend waits for it and resumes", func(t *testing.T) {
		// RunningNow vouched for the VM a moment ago; from the suspend on
		// the request must take EnsureRunning's path, not reach a VM that
		// is being paused.
		if !h.eng.RunningNow(m.ID) {
			t.Fatal("RunningNow false for a running VM")
		}
		if err := h.srv.Suspend(context.Background(), testAccount, m.ID, "UserRequested: test"); err != nil {
			t.Fatal(err)
		}
		if h.eng.RunningNow(m.ID) {
			t.Error("RunningNow still true once a suspend began")
		}
		code, body := h.get(m.ID, "/count", tok, nil)
		if code != 200 || !strings.HasPrefix(body, "count=") {
			t.Fatalf("request during the suspend: %d %q, want 200 count=N", code, body)
		}
		h.wait(m.ID, store.StateRunning, 30*time.Second)
	})

	t.Run("terminate leaves nothing", func(t *testing.T) {
		if err := h.srv.Terminate(context.Background(), testAccount, m.ID, "UserRequested: test"); err != nil {
			t.Fatal(err)
		}
		// At once, before TERMINATED: RunningNow no longer vouches for it,
		// and the store says TERMINATING.
		if code, _ := h.get(m.ID, "/count", tok, nil); code != 404 {
			t.Errorf("endpoint of a terminating microvm: %d, want 404", code)
		}
		h.wait(m.ID, store.StateTerminated, 30*time.Second)
		if _, err := h.drv.Inspect(context.Background(), m.ID); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("driver still knows the vm: %v", err)
		}
		if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+m.ID)); !os.IsNotExist(err) {
			t.Errorf("namespace still there: %v", err)
		}
		if _, err := netlink.LinkByName(netns.HostLinkName(m.ID)); err == nil {
			t.Errorf("host link %s still there", netns.HostLinkName(m.ID))
		}
		if code, _ := h.get(m.ID, "/count", tok, nil); code != 404 {
			t.Errorf("endpoint of a terminated microvm: %d, want 404", code)
		}
	})
}

func TestNoIngressAndNoAutoResume(t *testing.T) {
	h := newHarness(t)
	noIngress := "arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnNoIngress
	a := h.runWith([]string{noIngress}, []string{"arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnInternetEgress}, nil)
	if code, _ := h.get(a.ID, "/count", h.token(a.ID), nil); code != 403 {
		t.Errorf("NO_INGRESS: %d, want 403", code)
	}
	if g, _ := h.eng.Guest(a.ID); g == nil || !g.HasDNS() || !g.Net.Egress {
		t.Errorf("INTERNET_EGRESS: no dns forwarder or egress network: %+v", g)
	}
	b := h.run([]string{allIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: false})
	if err := h.srv.Suspend(context.Background(), testAccount, b.ID, "UserRequested: test"); err != nil {
		t.Fatal(err)
	}
	h.wait(b.ID, store.StateSuspended, 30*time.Second)
	if code, body := h.get(b.ID, "/count", h.token(b.ID), nil); code != 503 || !strings.Contains(body, "suspended") {
		t.Errorf("autoResumeEnabled false: %d %q, want 503 saying suspended", code, body)
	}
	// Explicit resume still works, with memory intact.
	if err := h.srv.Resume(context.Background(), testAccount, b.ID); err != nil {
		t.Fatal(err)
	}
	h.wait(b.ID, store.StateRunning, 30*time.Second)
	for _, m := range []store.Microvm{a, b} {
		if err := h.srv.Terminate(context.Background(), testAccount, m.ID, "UserRequested: test"); err != nil {
			t.Fatal(err)
		}
	}
	h.wait(a.ID, store.StateTerminated, 30*time.Second)
	h.wait(b.ID, store.StateTerminated, 30*time.Second)
}

// TestRecoverAfterRestart kills nothing but the server: a new driver and
// server on the same data directory and store adopt the running microVM
// (memory intact), end the record whose VM vanished with a reason, and
// then notice when the adopted VM's QEMU dies.
func TestRecoverAfterRestart(t *testing.T) {
	needFixture(t)
	work := shortDir(t)
	dataDir := filepath.Join(work, "d")
	newDrv := func() *qemu.Driver {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		d, err := qemu.New(ctx, qemu.Config{DataDir: dataDir, KernelDir: fx.Env.KernelDir, AgentBinary: fx.Env.AgentBinary,
			Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	stateDir := filepath.Join(work, "s")
	drvA := newDrv()
	h := newHarnessAt(t, drvA, stateDir, true)
	m := h.run([]string{allIngress}, nil)
	if code, body := h.get(m.ID, "/count", h.token(m.ID), nil); code != 200 || body != "count=1" {
		t.Fatalf("before restart: %d %q", code, body)
	}
	// One suspended before the restart, woken by a request after it.
	sus := h.run([]string{allIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: true})
	if code, body := h.get(sus.ID, "/count", h.token(sus.ID), nil); code != 200 || body != "count=1" {
		t.Fatalf("before restart: %d %q", code, body)
	}
	if err := h.srv.Suspend(context.Background(), testAccount, sus.ID, "UserRequested: test"); err != nil {
		t.Fatal(err)
	}
	h.wait(sus.ID, store.StateSuspended, 30*time.Second)
	// A record whose VM is gone (as if its QEMU died while kiln was down).
	now := time.Now().UTC()
	lostID := m.ID + "x"
	lost := m
	lost.ID, lost.ARN, lost.State, lost.StartedAt, lost.UpdatedAt = lostID, m.ARN+"x", store.StateRunning, now, now
	if err := h.st.CreateMicrovm(context.Background(), lost, nil); err != nil {
		t.Fatal(err)
	}

	// "Restart": the old server and driver go away, the VM keeps running.
	h.keep = true
	h.stop()
	drvA.Close()

	drvB := newDrv()
	t.Cleanup(func() {
		for _, id := range []string{m.ID, lostID, sus.ID} {
			drvB.Terminate(context.Background(), id)
			netns.Teardown(context.Background(), id)
		}
		drvB.Close()
	})
	h2 := newHarnessAt(t, drvB, stateDir, false)
	h2.ids = []string{m.ID, lostID, sus.ID}
	if s := h2.wait(lostID, store.StateTerminated, 10*time.Second); !strings.HasPrefix(s.StateReason, "VMLost") {
		t.Errorf("vanished vm: reason %q, want VMLost...", s.StateReason)
	}
	if code, body := h2.get(m.ID, "/count", h2.token(m.ID), nil); code != 200 || body != "count=2" {
		t.Fatalf("after restart: %d %q, want count=2 (adopted, memory intact)", code, body)
	}

	if code, body := h2.get(sus.ID, "/count", h2.token(sus.ID), nil); code != 200 || body != "count=2" {
		t.Fatalf("suspended across the restart: %d %q, want count=2 (auto-resumed, memory intact)", code, body)
	}
	h2.wait(sus.ID, store.StateRunning, time.Second)

	info, err := drvB.Inspect(context.Background(), m.ID)
	if err != nil || info.PID == 0 {
		t.Fatalf("inspect: %+v %v", info, err)
	}
	if err := syscall.Kill(info.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if s := h2.wait(m.ID, store.StateTerminated, 20*time.Second); !strings.HasPrefix(s.StateReason, "VMExited") {
		t.Errorf("killed vm: reason %q, want VMExited...", s.StateReason)
	}
	if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+m.ID)); !os.IsNotExist(err) {
		t.Errorf("namespace of the dead vm still there: %v", err)
	}
}

// TestServersShareADriver: servers on one driver (as these tests and the
// benchmarks run them) each recover as they start. A new server's
// recovery leaves another server's running microVM alone, though its own
// store has no record of it; a VM its own data directory made, whose
// record ended while the server was down, it removes.
func TestServersShareADriver(t *testing.T) {
	needFixture(t)
	ctx := context.Background()
	a := newHarness(t)
	other := a.run([]string{allIngress}, nil)

	dir := t.TempDir()
	b := newHarnessAt(t, fx.Driver, dir, true)
	stale := b.run([]string{allIngress}, nil)
	// b stops with its VM running, and the record ends meanwhile.
	b.keep = true
	b.stop()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.UpdateMicrovm(ctx, testAccount, stale.ID, nil, func(m *store.Microvm) error {
		m.State, m.StateReason = store.StateTerminated, "UserRequested: while kiln was down"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	c := newHarnessAt(t, fx.Driver, dir, false)
	c.ids = []string{stale.ID}
	if _, err := fx.Driver.Inspect(ctx, stale.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the VM of an ended record of this data directory survived recovery: %v", err)
	}
	if code, body := a.get(other.ID, "/count", a.token(other.ID), nil); code != 200 || body != "count=1" {
		t.Fatalf("another server's microVM after a recovery on the shared driver: %d %q, want 200 count=1", code, body)
	}
}

func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "ke")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// fakeBuilder stands in for internal/imagebuild (our own interface): it
// writes a log line and returns the shared template, or fails, or panics
// as a bug in the builder would.
type fakeBuilder struct {
	err   error
	panic string
}

func (f fakeBuilder) Build(ctx context.Context, req engine.BuildRequest) (engine.BuildResult, error) {
	fmt.Fprintf(req.Log, "step 1/1 for build %s\n", req.Build.ID)
	if f.panic != "" {
		panic(f.panic)
	}
	if f.err != nil {
		return engine.BuildResult{}, f.err
	}
	n := int64(42)
	return engine.BuildResult{TemplateDir: fx.Template, Snapshot: &store.SnapshotBuild{MemorySnapshotSizeInBytes: &n}}, nil
}

func TestBuildImage(t *testing.T) {
	needFixture(t)
	tests := []struct {
		name        string
		builder     engine.Builder
		wantVersion string
		wantImage   string
		wantReason  string
	}{
		{name: "success records the template", builder: fakeBuilder{}, wantVersion: store.VersionSuccessful, wantImage: store.ImageCreated},
		{name: "failure records the reason", builder: fakeBuilder{err: errors.New("RUN exited 1")}, wantVersion: store.VersionFailed, wantImage: store.ImageCreateFailed, wantReason: "RUN exited 1"},
		{name: "a panic in the builder fails the build, not the server", builder: fakeBuilder{panic: "nil map"}, wantVersion: store.VersionFailed, wantImage: store.ImageCreateFailed, wantReason: "internal error in kiln's image builder (the server log has the details): nil map"},
		{name: "no builder", builder: nil, wantVersion: store.VersionFailed, wantImage: store.ImageCreateFailed, wantReason: "no image builder"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			e, err := engine.New(ctx, engine.Config{Driver: fx.Driver, Control: lifecycle.NewStoreControl(st), Builder: tc.builder, DataDir: dir})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			name := fmt.Sprintf("img%d", i)
			now := time.Now().UTC()
			img := store.Image{Account: testAccount, Name: name, ARN: "arn:img/" + name, State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
			v := store.ImageVersion{Account: testAccount, ImageName: name, ImageARN: img.ARN, Version: "1", State: store.VersionPending, Status: store.VersionActive, CreatedAt: now, UpdatedAt: now}
			b := store.Build{Account: testAccount, ImageName: name, ImageARN: img.ARN, Version: "1", ID: fmt.Sprintf("b%d", i), State: store.BuildPending, Architecture: "X86_64", CreatedAt: now, UpdatedAt: now}
			if err := st.CreateImage(ctx, img, v, []store.Build{b}, nil); err != nil {
				t.Fatal(err)
			}
			if err := e.BuildImage(ctx, v, []store.Build{b}); err != nil {
				t.Fatal(err)
			}
			e.WaitBuilds()
			gotV, err := st.GetImageVersion(ctx, testAccount, name, "1")
			if err != nil {
				t.Fatal(err)
			}
			gotI, _ := st.GetImage(ctx, testAccount, name)
			if gotV.State != tc.wantVersion || gotI.State != tc.wantImage || !strings.Contains(gotV.StateReason, tc.wantReason) {
				t.Fatalf("version %s (%q), image %s; want %s (%q), %s", gotV.State, gotV.StateReason, gotI.State, tc.wantVersion, tc.wantReason, tc.wantImage)
			}
			if tc.builder != nil {
				logb, _ := st.ReadBuildLog(ctx, b.ID, 0, 1<<20)
				if !strings.Contains(string(logb), "step 1/1 for build "+b.ID) {
					t.Errorf("build log %q lacks the builder's output", logb)
				}
			}
			tmpl, err := e.TemplateFor(testAccount, name, "1")
			if tc.wantVersion == store.VersionSuccessful && tmpl != fx.Template {
				t.Errorf("template %q (%v), want %q", tmpl, err, fx.Template)
			}
			// Deleting the version's record and files.
			if err := st.DeleteImageVersion(ctx, testAccount, name, "1"); err != nil {
				t.Fatal(err)
			}
			e.DeleteImageVersion(ctx, testAccount, name, "1")
			if _, err := os.Stat(e.ImageDir(testAccount, name, "1")); !os.IsNotExist(err) {
				t.Errorf("version files still there: %v", err)
			}
		})
	}
}

// hostAddr returns the host's IPv4 address on its default-route link (on
// these hosts a private 10/8 one).
func hostAddr(t *testing.T) string {
	t.Helper()
	routes, _ := netlink.RouteList(nil, netlink.FAMILY_V4)
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() != "0.0.0.0/0" {
			continue
		}
		l, err := netlink.LinkByIndex(r.LinkIndex)
		if err != nil {
			continue
		}
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		if len(addrs) > 0 {
			return addrs[0].IP.String()
		}
	}
	t.Skip("no default route")
	return ""
}

// TestNetworkIsolation: from inside real guests, with and without
// INTERNET_EGRESS, neither the host (its own address or its end of the
// VM link) nor another microVM is reachable.
func TestNetworkIsolation(t *testing.T) {
	h := newHarness(t)
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "host") }))
	port := ln.Addr().(*net.TCPAddr).Port
	egress := "arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnInternetEgress
	closed := h.runWith([]string{allIngress}, nil, nil)
	open := h.runWith([]string{allIngress}, []string{egress}, nil)
	host := hostAddr(t)
	for _, tc := range []struct {
		name string
		self store.Microvm
		peer store.Microvm
	}{
		{name: "no egress", self: closed, peer: open},
		{name: "internet egress", self: open, peer: closed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			self, _ := h.eng.Guest(tc.self.ID)
			peer, _ := h.eng.Guest(tc.peer.ID)
			targets := []string{
				fmt.Sprintf("%s:%d", host, port),
				fmt.Sprintf("%s:%d", self.Net.HostPeer, port),
				fmt.Sprintf("%s:8080", peer.Net.HostAddr),
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			a, err := h.drv.Agent(ctx, tc.self.ID)
			if err != nil {
				t.Fatal(err)
			}
			argv := append([]string{"/opt/app", "probe", "127.0.0.1:8080"}, targets...)
			out, errOut, _, err := a.Run(ctx, client.ExecRequest{Argv: argv})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, "reached 127.0.0.1:8080") {
				t.Fatalf("the probe does not work inside the guest: %q %q", out, errOut)
			}
			for _, a := range targets {
				if !strings.Contains(out, "blocked "+a) {
					t.Errorf("guest reached %s: %q", a, out)
				}
			}
		})
	}
	for _, m := range []store.Microvm{closed, open} {
		h.srv.Terminate(context.Background(), testAccount, m.ID, "UserRequested: test")
		h.wait(m.ID, store.StateTerminated, 30*time.Second)
	}
}

// TestStartFailure: a version without a template on this host ends the
// microVM TERMINATED with the reason, and its network is removed.
func TestStartFailure(t *testing.T) {
	h := newHarness(t)
	now := time.Now().UTC()
	id := fmt.Sprintf("mvm-%08xffff", os.Getpid())
	m := store.Microvm{ID: id, Account: testAccount, ARN: "arn:x:" + id, State: store.StatePending, ImageName: testImage, ImageVersion: "9",
		MaximumDurationInSeconds: 60, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(time.Minute)}
	if err := h.st.CreateMicrovm(context.Background(), m, nil); err != nil {
		t.Fatal(err)
	}
	h.ids = append(h.ids, id)
	if err := h.eng.StartMicrovm(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	got := h.wait(id, store.StateTerminated, 30*time.Second)
	if !strings.HasPrefix(got.StateReason, "StartFailed") || !strings.Contains(got.StateReason, "no snapshot template") {
		t.Errorf("reason %q, want StartFailed: ... no snapshot template ...", got.StateReason)
	}
	if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+id)); !os.IsNotExist(err) {
		t.Errorf("namespace still there: %v", err)
	}
	if _, err := h.eng.Lookup(context.Background(), id); !errors.Is(err, proxy.ErrNotFound) {
		t.Errorf("Lookup after a failed start: %v, want ErrNotFound", err)
	}
}
