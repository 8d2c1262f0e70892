//go:build linux

// Package netnstest stands in for a guest on a VM network made by
// internal/netns, without a VM: a namespace holding a TAP "eth0" with the
// guest address, wired frame by frame to the VM namespace's tap0 the way
// QEMU's virtio-net backend is. Servers run inside it bind 172.30.0.2 and
// see exactly the traffic a guest would. For tests (here and in the
// engine, proxy and lifecycle packages).
package netnstest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/netns"
)

// Guest is a fake guest attached to a VM network.
type Guest struct {
	// NSPath is the guest's own namespace: run guest-side code here.
	NSPath string
}

// NewNS creates a plain named namespace, removed at test end; fn runs
// inside it on creation.
func NewNS(t testing.TB, name string, fn func() error) string {
	t.Helper()
	t.Cleanup(func() { _ = vnetns.DeleteNamed(name) })
	if err := os.MkdirAll(netns.NetnsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		// Runs on a thread that is thrown away afterwards (never unlocked),
		// so the namespace switch cannot leak to other goroutines.
		runtime.LockOSThread()
		h, err := vnetns.NewNamed(name)
		if err != nil {
			errc <- err
			return
		}
		h.Close()
		if fn != nil {
			err = fn()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	return filepath.Join(netns.NetnsDir, name)
}

// StartGuest attaches a fake guest to n (which must have no QEMU on it).
func StartGuest(t testing.TB, n *netns.Net) *Guest {
	t.Helper()
	var gtap *os.File
	path := NewNS(t, "kilntest-g-"+n.ID, func() error {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, Mode: netlink.TUNTAP_MODE_TAP,
			Flags: netlink.TUNTAP_NO_PI, NonPersist: true, Queues: 1}
		if err := netlink.LinkAdd(tap); err != nil {
			return err
		}
		gtap = tap.Fds[0]
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetHardwareAddr(l, netns.GuestMAC); err != nil {
			return err
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(netns.GuestAddr.AsSlice()), Mask: net.CIDRMask(30, 32)}}
		if err := netlink.AddrAdd(l, a); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.IP(netns.GatewayAddr.AsSlice())})
	})
	t.Cleanup(func() { gtap.Close() })
	vtap, err := openTap(n.NSPath, n.Tap)
	if err != nil {
		t.Fatalf("opening %s in %s: %v", n.Tap, n.NSPath, err)
	}
	t.Cleanup(func() { vtap.Close() })
	go wire(gtap, vtap)
	go wire(vtap, gtap)
	return &Guest{NSPath: path}
}

func wire(dst, src *os.File) {
	buf := make([]byte, 65536)
	for {
		k, err := src.Read(buf)
		if err != nil {
			return
		}
		dst.Write(buf[:k])
	}
}

type ifreq struct {
	Name  [16]byte
	Flags uint16
	_     [22]byte
}

// openTap attaches to an existing TAP the way QEMU does: TUNSETIFF by
// name from inside its namespace.
func openTap(nsPath, name string) (*os.File, error) {
	var f *os.File
	err := netns.RunInNS(nsPath, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		var req ifreq
		copy(req.Name[:], name)
		req.Flags = unix.IFF_TAP | unix.IFF_NO_PI
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); e != 0 {
			unix.Close(fd)
			return e
		}
		unix.SetNonblock(fd, true)
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	return f, err
}

// Listen opens a TCP listener on addr inside nsPath ("" = this namespace).
func Listen(t testing.TB, nsPath, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	listen := func() (err error) { ln, err = net.Listen("tcp4", addr); return err }
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = netns.RunInNS(nsPath, listen)
	}
	if err != nil {
		t.Fatalf("listen %s in %q: %v", addr, nsPath, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// ServeTCP answers every connection on addr in nsPath with
// "MSG from REMOTE-IP" and closes it.
func ServeTCP(t testing.TB, nsPath, addr, msg string) {
	ln := Listen(t, nsPath, addr)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ip, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "%s from %s", msg, ip)
			c.Close()
		}
	}()
}

// ServeHTTP serves h on the guest's port.
func (g *Guest) ServeHTTP(t testing.TB, port uint16, h http.Handler) {
	ln := Listen(t, g.NSPath, netip.AddrPortFrom(netns.GuestAddr, port).String())
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// ServeTCP serves "MSG from REMOTE-IP" on the guest's port.
func (g *Guest) ServeTCP(t testing.TB, port uint16, msg string) {
	ServeTCP(t, g.NSPath, netip.AddrPortFrom(netns.GuestAddr, port).String(), msg)
}

// Dial connects to addr from inside nsPath ("" = this namespace) with
// netns.HostDialer and returns up to 256 bytes it reads.
func Dial(nsPath, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	dial := func() (err error) { c, err = netns.HostDialer(timeout).Dial("tcp4", addr); return err }
	var err error
	if nsPath == "" {
		err = dial()
	} else {
		err = netns.RunInNS(nsPath, dial)
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b, err := io.ReadAll(io.LimitReader(c, 256))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = nil
	}
	return string(b), err
}

// AssertGone fails t if anything of VM id's network is left: its
// namespace or its host link.
func AssertGone(t testing.TB, id string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("namespace of %s still there: %v", id, err)
	}
	if _, err := netlink.LinkByName(netns.HostLinkName(id)); err == nil {
		t.Errorf("host link of %s still there", id)
	}
}
