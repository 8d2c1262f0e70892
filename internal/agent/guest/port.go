//go:build linux

package guest

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PortName is the virtio-serial port the host talks to the agent on.
const PortName = "kiln.agent"

// FindPort returns the device path of the virtio-serial port named name
// (/sys/class/virtio-ports/vportNpM/name → /dev/vportNpM).
func FindPort(name string) (string, error) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		return "/dev/" + filepath.Base(filepath.Dir(n)), nil
	}
	return "", fmt.Errorf("virtio-serial port %q not found", name)
}

// Port is a virtio-serial port as a transport that survives host
// disconnects. While no host is connected, read returns 0 at once and
// poll reports POLLHUP; the kernel sends SIGIO when the host side opens or
// closes (O_ASYNC). Read waits for the next host and then returns
// ErrReconnect so the server drops half-read frames of the old session.
// Writes block in the kernel while no host is connected; the server's
// outbox keeps that from blocking workloads.
type Port struct {
	fd    int
	sigio chan os.Signal
	log   *slog.Logger
}

// OpenPort opens the port device at path.
func OpenPort(path string, log *slog.Logger) (*Port, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	p := &Port{fd: fd, sigio: make(chan os.Signal, 1), log: log}
	signal.Notify(p.sigio, syscall.SIGIO)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETOWN, os.Getpid()); err == nil {
		fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_ASYNC)
	}
	return p, nil
}

// Read reads from the port; see Port.
func (p *Port) Read(b []byte) (int, error) {
	for {
		n, err := unix.Read(p.fd, b)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("reading port: %w", err)
		}
		if n > 0 {
			return n, nil
		}
		// n == 0: no host connected. Wait for one.
		p.log.Debug("host disconnected")
		p.waitHost()
		return 0, ErrReconnect
	}
}

func (p *Port) connected() bool {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n >= 0 && fds[0].Revents&unix.POLLHUP == 0
}

func (p *Port) waitHost() {
	for !p.connected() {
		// SIGIO announces the host; the timer covers a lost signal.
		select {
		case <-p.sigio:
			p.log.Debug("sigio")
		case <-time.After(200 * time.Millisecond):
			p.log.Debug("port poll timer")
		}
	}
}

// Write writes all of b, blocking while no host is connected.
func (p *Port) Write(b []byte) (int, error) {
	done := 0
	for done < len(b) {
		n, err := unix.Write(p.fd, b[done:])
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("writing port: %w", err)
		}
		done += n
	}
	return done, nil
}

// Close closes the port.
func (p *Port) Close() error {
	signal.Stop(p.sigio)
	return unix.Close(p.fd)
}
