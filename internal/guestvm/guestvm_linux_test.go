//go:build linux

package guestvm_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/netns/netnstest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

var (
	env *vmmtest.Env
	drv *qemu.Driver
)

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		env = vmmtest.SetupOrSkip("guestvm")
	}
	code := func() int {
		if env == nil {
			return m.Run()
		}
		defer env.Cleanup()
		dir, err := os.MkdirTemp("", "kg")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		drv, err = qemu.New(ctx, qemu.Config{DataDir: filepath.Join(dir, "d"), KernelDir: env.KernelDir, AgentBinary: env.AgentBinary,
			Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if err != nil {
			fmt.Fprintln(os.Stderr, "qemu driver:", err)
			return 1
		}
		defer drv.Close()
		return m.Run()
	}()
	os.Exit(code)
}

func needRoot(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "network namespaces")
	hadHostTable := false
	if c, err := nftables.New(); err == nil {
		tabs, _ := c.ListTablesOfFamily(nftables.TableFamilyINet)
		for _, tb := range tabs {
			hadHostTable = hadHostTable || tb.Name == netns.TableName
		}
	}
	t.Cleanup(func() {
		if !hadHostTable {
			netns.RemoveHostRules()
		}
	})
}

func needDriver(t *testing.T) {
	t.Helper()
	needRoot(t)
	if drv == nil {
		t.Skip("no VM engine (see vmmtest.SetupOrSkip)")
	}
}

func testID(t *testing.T) string {
	b := make([]byte, 3)
	rand.Read(b)
	id := "tg" + hex.EncodeToString(b)
	t.Cleanup(func() { guestvm.Remove(context.Background(), drv, id) })
	return id
}

// sockets counts this process's open sockets: the forwarder's two and a
// test service's one are gone again once they are closed.
func sockets(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if l, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// listener is a service: a real TCP listener at the guest's gateway, which
// records what it saw of the other parts when it was closed.
type listener struct {
	net.Listener
	id       string
	mu       sync.Mutex
	closed   bool
	nsThere  bool // the namespace still existed: the network goes after
	vmGone   bool // the driver no longer had the VM: the VM goes before
	closeErr error
}

func (l *listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+l.id))
	l.nsThere = err == nil
	if drv != nil {
		_, err = drv.Inspect(context.Background(), l.id)
		l.vmGone = err != nil
	}
	l.closed = true
	l.Listener.Close()
	return l.closeErr
}

func (l *listener) wasClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

func service(name string, port int, got **listener, fail error) guestvm.Service {
	return guestvm.Service{Name: name, Start: func(ctx context.Context, n *netns.Net) (io.Closer, error) {
		if fail != nil {
			return nil, fail
		}
		l := &listener{id: n.ID}
		err := netns.RunInNS(n.NSPath, func() (err error) {
			l.Listener, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", netns.GatewayAddr, port))
			return err
		})
		if err != nil {
			return nil, err
		}
		*got = l
		return l, nil
	}}
}

func config(id string, svcs ...guestvm.Service) guestvm.Config {
	var d vmm.Driver
	if drv != nil {
		d = drv
	}
	return guestvm.Config{ID: id, Driver: d, Net: netns.Config{Egress: true},
		Upstreams: []string{"127.0.0.1:1"}, Services: svcs}
}

// A boot that fails (a root disk that does not exist) leaves neither the
// network nor the forwarder nor the service that were made before it.
func TestBootFailureUndoesAll(t *testing.T) {
	needDriver(t)
	id := testID(t)
	before := sockets(t)
	var l *listener
	_, err := guestvm.Boot(context.Background(), config(id, service("test service", 8081, &l, nil)),
		vmm.BootSpec{RootDisk: "/nonexistent/root.img", MemoryMiB: 256})
	if err == nil {
		t.Fatal("boot of a root disk that does not exist succeeded")
	}
	if l == nil || !l.wasClosed() {
		t.Error("the service was not closed")
	}
	if !l.nsThere || !l.vmGone {
		t.Errorf("service closed with namespace there=%v, vm gone=%v; want both true", l.nsThere, l.vmGone)
	}
	if n := sockets(t); n != before {
		t.Errorf("%d sockets open after the failure, %d before: the forwarder or service is left", n, before)
	}
	netnstest.AssertGone(t, id)
	if _, err := drv.Inspect(context.Background(), id); err == nil {
		t.Error("the driver still has the vm")
	}
}

// Close of a running VM terminates it before the services stop, and the
// services stop before the network goes; a second Close does nothing.
func TestCloseOrder(t *testing.T) {
	needDriver(t)
	id := testID(t)
	before := sockets(t)
	var l *listener
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	v, err := guestvm.Boot(ctx, config(id, service("test service", 8081, &l, nil)),
		vmm.BootSpec{RootDisk: env.RootDisk, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if !v.HasDNS() {
		t.Error("no dns forwarder for a vm with egress")
	}
	if i, err := drv.Inspect(ctx, id); err != nil || i.State != vmm.StateRunning {
		t.Fatalf("vm after Boot: %+v, %v", i, err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if !l.wasClosed() || !l.nsThere || !l.vmGone {
		t.Errorf("service closed=%v with namespace there=%v, vm gone=%v; want all true", l.wasClosed(), l.nsThere, l.vmGone)
	}
	netnstest.AssertGone(t, id)
	if n := sockets(t); n != before {
		t.Errorf("%d sockets open after Close, %d before", n, before)
	}
	if err := v.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := v.Boot(ctx, vmm.BootSpec{RootDisk: env.RootDisk}); !errors.Is(err, guestvm.ErrClosed) {
		t.Errorf("Boot after Close: %v, want ErrClosed", err)
	}
}

// A service that fails to start undoes the services before it, the
// forwarder and the network.
func TestServiceFailureUndoesAll(t *testing.T) {
	needRoot(t)
	id := testID(t)
	before := sockets(t)
	var first, second *listener
	_, err := guestvm.New(context.Background(), config(id,
		service("first", 8081, &first, nil), service("second", 8082, &second, errors.New("refused"))))
	if err == nil || !strings.Contains(err.Error(), "second") {
		t.Fatalf("New: %v, want the second service's failure", err)
	}
	if first == nil || !first.wasClosed() || !first.nsThere {
		t.Error("the first service was not closed before the network went")
	}
	if n := sockets(t); n != before {
		t.Errorf("%d sockets open after the failure, %d before", n, before)
	}
	netnstest.AssertGone(t, id)
}

// A failing step does not keep the later ones from running; Failed names
// it.
func TestCloseRunsEveryStep(t *testing.T) {
	needRoot(t)
	id := testID(t)
	var l *listener
	v, err := guestvm.New(context.Background(), config(id, service("test service", 8081, &l, nil)))
	if err != nil {
		t.Fatal(err)
	}
	l.closeErr = errors.New("stuck")
	err = v.Close()
	if !guestvm.Failed(err, "test service") || guestvm.Failed(err, guestvm.StepNetwork) || guestvm.Failed(err, guestvm.StepDNS) {
		t.Errorf("Close: %v; want only the service's failure", err)
	}
	netnstest.AssertGone(t, id)
}

// A network that outlived its process is adopted: Open finds it, Ensure
// starts the forwarder and the services again (as a restarted kiln does
// after Detach); New with Adopt takes it over too.
func TestAdopt(t *testing.T) {
	needRoot(t)
	id := testID(t)
	ctx := context.Background()
	var l *listener
	v, err := guestvm.New(ctx, config(id, service("test service", 8081, &l, nil)))
	if err != nil {
		t.Fatal(err)
	}
	before := sockets(t)
	if err := v.Detach(); err != nil {
		t.Fatal(err)
	}
	if n := sockets(t); n != before-3 {
		t.Errorf("%d sockets after Detach, %d before: want the forwarder's two and the service's gone", n, before)
	}
	if _, err := os.Stat(v.Net.NSPath); err != nil {
		t.Fatalf("Detach removed the namespace: %v", err)
	}
	if _, err := guestvm.New(ctx, config(id)); !errors.Is(err, netns.ErrExists) {
		t.Errorf("New of an existing network without Adopt: %v, want ErrExists", err)
	}
	w, err := guestvm.Open(ctx, config(id, service("test service", 8081, &l, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if w.HasDNS() || !w.Opened || !w.Net.Egress {
		t.Errorf("Open: dns %v, opened %v, egress %v; want false, true, true", w.HasDNS(), w.Opened, w.Net.Egress)
	}
	if err := w.Ensure(ctx); err != nil {
		t.Fatalf("Ensure after a Detach (the old listeners must be gone): %v", err)
	}
	if !w.HasDNS() || sockets(t) != before {
		t.Error("Ensure did not start the forwarder and the service again")
	}
	w.Detach()
	cfg := config(id)
	cfg.Adopt = true
	x, err := guestvm.New(ctx, cfg)
	if err != nil || !x.Opened || !x.HasDNS() {
		t.Fatalf("New with Adopt: %v (opened %v)", err, x != nil && x.Opened)
	}
	if err := x.Close(); err != nil {
		t.Fatal(err)
	}
	netnstest.AssertGone(t, id)
}
