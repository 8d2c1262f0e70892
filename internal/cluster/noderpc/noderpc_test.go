package noderpc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// recordingService stands in for the node's engine: the RPC layer, not
// the engine, is under test here.
type recordingService struct {
	mu    sync.Mutex
	calls []string
	vms   []store.Microvm
	fail  error
}

func (r *recordingService) rec(name string, m store.Microvm) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, name)
	r.vms = append(r.vms, m)
	return r.fail
}

func (r *recordingService) StartMicrovm(_ context.Context, m store.Microvm) error {
	return r.rec("start", m)
}
func (r *recordingService) SuspendMicrovm(_ context.Context, m store.Microvm) error {
	return r.rec("suspend", m)
}
func (r *recordingService) ResumeMicrovm(_ context.Context, m store.Microvm) error {
	return r.rec("resume", m)
}
func (r *recordingService) TerminateMicrovm(_ context.Context, m store.Microvm) error {
	return r.rec("terminate", m)
}
func (r *recordingService) BuildImage(_ context.Context, v store.ImageVersion, b []store.Build) error {
	return r.rec("build "+v.Version+fmt.Sprint(len(b)), store.Microvm{})
}
func (r *recordingService) DeleteImageVersion(_ context.Context, a, i, v string) error {
	return r.rec("delete "+a+"/"+i+"/"+v, store.Microvm{})
}
func (r *recordingService) SnapshotMicrovm(_ context.Context, m store.Microvm, i, v string) (store.SnapshotBuild, error) {
	n := int64(7)
	return store.SnapshotBuild{DiskSnapshotSizeInBytes: &n}, r.rec("snapshot "+i+"/"+v, m)
}
func (r *recordingService) MicrovmLog(_ context.Context, m store.Microvm, off int64, limit int) ([]byte, int64, error) {
	return []byte("log"), off + 3, r.rec("log", m)
}
func (r *recordingService) EnsureRunning(_ context.Context, id string) error {
	return r.rec("wake "+id, store.Microvm{})
}
func (r *recordingService) Activity(_ context.Context, seen map[string]time.Time) error {
	return r.rec(fmt.Sprintf("activity %d", len(seen)), store.Microvm{})
}

func (r *recordingService) Usage(_ context.Context, id string) (vmm.Usage, error) {
	return vmm.Usage{CPUTime: time.Second, MemorySize: 512 << 20}, r.rec("usage "+id, store.Microvm{})
}
func (r *recordingService) SetEgressPolicy(_ context.Context, id string, p netns.EgressPolicy, domains []string) error {
	return r.rec(fmt.Sprintf("egress %s %v %v", id, p.Deny, domains), store.Microvm{})
}

func (r *recordingService) ExportTemplate(_ context.Context, a, i, v string, send func(*TemplateChunk) error) error {
	if err := r.rec("export "+a+"/"+i+"/"+v, store.Microvm{}); err != nil {
		return err
	}
	if err := send(&TemplateChunk{App: []byte(`{"user":"nobody"}`), Part: vmm.TemplatePart{Manifest: &vmm.TemplateManifest{}}}); err != nil {
		return err
	}
	for i := 0; i < 3; i++ {
		if err := send(&TemplateChunk{Part: vmm.TemplatePart{File: i, Offset: int64(i), Data: []byte{byte(i + 1)}}}); err != nil {
			return err
		}
	}
	return nil
}

type cluster struct {
	ca   *clusterca.CA
	addr string
	svc  *recordingService
}

func identity(t *testing.T, ca *clusterca.CA, role clusterca.Role, name string, hosts ...string) *clusterca.Identity {
	t.Helper()
	dir := t.TempDir()
	if err := ca.Issue(dir, role, name, hosts); err != nil {
		t.Fatal(err)
	}
	id, err := clusterca.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func startNode(t *testing.T) *cluster {
	ca, err := clusterca.Init(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	svc := &recordingService{}
	srv := NewServer(identity(t, ca, clusterca.Node, "node-a", "127.0.0.1"), svc)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return &cluster{ca: ca, addr: ln.Addr().String(), svc: svc}
}

func (c *cluster) client(t *testing.T, role clusterca.Role) *Client {
	cl, err := Dial("node-a", c.addr, identity(t, c.ca, role, string(role)+"-0").ClientTLS(clusterca.Node))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func TestCallsCarryTheRecord(t *testing.T) {
	c := startNode(t)
	ctl := c.client(t, clusterca.Control)
	ctx := context.Background()
	m := store.Microvm{ID: "mvm-1", Account: "A", ImageName: "app", ImageVersion: "1", Node: "node-a", Epoch: 7,
		MemoryMiB: 512, RunHookPayload: "payload\x00with a NUL", IngressNetworkConnectors: []string{"x"}}
	if err := ctl.StartMicrovm(ctx, m); err != nil {
		t.Fatal(err)
	}
	if err := ctl.TerminateMicrovm(ctx, m); err != nil {
		t.Fatal(err)
	}
	data, next, err := ctl.MicrovmLog(ctx, m, 10, 100)
	if err != nil || string(data) != "log" || next != 13 {
		t.Fatalf("log: %q %d %v", data, next, err)
	}
	if err := ctl.BuildImage(ctx, store.ImageVersion{Version: "3"}, []store.Build{{ID: "b"}}); err != nil {
		t.Fatal(err)
	}
	sb, err := ctl.SnapshotMicrovm(ctx, m, "snap", "1.0")
	if err != nil || sb.DiskSnapshotSizeInBytes == nil || *sb.DiskSnapshotSizeInBytes != 7 {
		t.Fatalf("snapshot: %+v %v", sb, err)
	}
	u, err := ctl.Usage(ctx, "mvm-1")
	if err != nil || u.CPUTime != time.Second || u.MemorySize != 512<<20 {
		t.Fatalf("usage: %+v %v", u, err)
	}
	deny := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	if err := ctl.SetEgressPolicy(ctx, "mvm-1", netns.EgressPolicy{Deny: deny}, []string{"example.com"}); err != nil {
		t.Fatal(err)
	}
	got := c.svc.vms[0]
	if got.ID != m.ID || got.Epoch != 7 || got.Node != "node-a" || got.RunHookPayload != m.RunHookPayload || got.MemoryMiB != 512 {
		t.Fatalf("node got %+v", got)
	}
	if strings.Join(c.svc.calls, ",") != "start,terminate,log,build 31,snapshot snap/1.0,usage mvm-1,egress mvm-1 [192.0.2.0/24] [example.com]" {
		t.Fatalf("calls %v", c.svc.calls)
	}
}

func TestErrorsKeepTheirCategory(t *testing.T) {
	c := startNode(t)
	ctl := c.client(t, clusterca.Control)
	for _, want := range []error{errdefs.ErrNotFound, errdefs.ErrConflict, errdefs.ErrExhausted, errdefs.ErrInvalid, errdefs.ErrUnavailable} {
		c.svc.fail = fmt.Errorf("the reason: %w", want)
		err := ctl.SuspendMicrovm(context.Background(), store.Microvm{ID: "x"})
		if !errors.Is(err, want) || !strings.Contains(err.Error(), "the reason") || !strings.Contains(err.Error(), "node-a") {
			t.Errorf("want %v, got %v", want, err)
		}
	}
}

func TestRolesPerMethod(t *testing.T) {
	c := startNode(t)
	edge := c.client(t, clusterca.Edge)
	ctx := context.Background()
	if err := edge.EnsureRunning(ctx, "mvm-1"); err != nil {
		t.Fatalf("edge wake: %v", err)
	}
	if err := edge.Activity(ctx, map[string]time.Time{"mvm-1": time.Now()}); err != nil {
		t.Fatalf("edge activity: %v", err)
	}
	err := edge.TerminateMicrovm(ctx, store.Microvm{ID: "mvm-1"})
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != codes.PermissionDenied {
		t.Fatalf("edge terminating: %v", err)
	}
	if err := edge.SetEgressPolicy(ctx, "mvm-1", netns.EgressPolicy{}, nil); !errors.As(err, &re) || re.Code != codes.PermissionDenied {
		t.Fatalf("edge setting network rules: %v", err)
	}
	// Another node may fetch a template, and nothing else.
	other := c.client(t, clusterca.Node)
	if err := other.StartMicrovm(ctx, store.Microvm{ID: "mvm-1"}); !errors.As(err, &re) || re.Code != codes.PermissionDenied {
		t.Fatalf("a node commanding another node: %v", err)
	}
	var got []*TemplateChunk
	err = other.ExportTemplate(ctx, "A", "app", "1", func(ch *TemplateChunk) error { got = append(got, ch); return nil })
	if err != nil || len(got) != 4 || string(got[0].App) != `{"user":"nobody"}` || got[0].Part.Manifest == nil || got[3].Part.Data[0] != 3 {
		t.Fatalf("template stream: %v, %d chunks", err, len(got))
	}
	ctl := c.client(t, clusterca.Control)
	if err := ctl.ExportTemplate(ctx, "A", "app", "1", func(*TemplateChunk) error { return nil }); !errors.As(err, &re) || re.Code != codes.PermissionDenied {
		t.Fatalf("control fetching a template: %v", err)
	}
	c.svc.fail = fmt.Errorf("no template here: %w", errdefs.ErrNotFound)
	if err := other.ExportTemplate(ctx, "A", "app", "2", func(*TemplateChunk) error { return nil }); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a template the node lacks: %v", err)
	}
	if strings.Join(c.svc.calls, ",") != "wake mvm-1,activity 1,export A/app/1,export A/app/2" {
		t.Fatalf("calls %v", c.svc.calls)
	}
}
