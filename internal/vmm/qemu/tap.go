//go:build linux

package qemu

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"golang.org/x/sys/unix"
)

// openTap opens an existing TAP device inside a network namespace and
// returns its file, which QEMU receives as an inherited fd. QEMU itself
// stays in the host namespace; only the TAP queue lives in the VM's.
func openTap(netnsPath, name string) (*os.File, error) {
	runtime.LockOSThread()
	// The thread is left locked on purpose if switching back fails: Go
	// then discards it instead of reusing a thread in the wrong netns.
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := os.Open(netnsPath)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("opening netns %s: %w", netnsPath, errdefs.ErrUnavailable)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("entering netns %s: %w", netnsPath, err)
	}
	f, openErr := openTapHere(name)
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("returning from netns %s: %w", netnsPath, err)
	}
	runtime.UnlockOSThread()
	return f, openErr
}

func openTapHere(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	var ifr [unix.IFNAMSIZ + 64]byte
	copy(ifr[:unix.IFNAMSIZ-1], name)
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	*(*uint16)(unsafe.Pointer(&ifr[unix.IFNAMSIZ])) = flags
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(unix.TUNSETIFF), uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("attaching to tap %s: %w", name, errno)
	}
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}
