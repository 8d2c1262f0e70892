//go:build linux

package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proc is a QEMU process, started by us or adopted after a restart. Its
// exit is noticed at once: through Wait for our children, through a pidfd
// for adopted ones (which are not our children and cannot be waited for).
type proc struct {
	pid   int
	start uint64 // start time in clock ticks, guards against PID reuse
	pidfd int
	done  chan struct{}
	// status is how the process ended; valid once done is closed.
	status string
	// onExit runs once the process has ended, before done is closed
	// (removing its cgroup).
	onExit func()
}

func (p *proc) exited() {
	if p.onExit != nil {
		p.onExit()
	}
	close(p.done)
}

func startProc(cmd *exec.Cmd, onExit func()) (*proc, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{pid: cmd.Process.Pid, pidfd: -1, done: make(chan struct{}), onExit: onExit}
	if fd, err := unix.PidfdOpen(p.pid, 0); err == nil {
		p.pidfd = fd
	}
	p.start, _ = procStartTime(p.pid)
	go func() {
		err := cmd.Wait()
		switch {
		case err == nil:
			p.status = "exited with status 0"
		default:
			p.status = err.Error() // "signal: killed", "exit status 1"
		}
		if p.pidfd >= 0 {
			unix.Close(p.pidfd)
		}
		p.exited()
	}()
	return p, nil
}

// adoptProc watches a process that a previous kiln started. It fails if
// the PID now belongs to another process.
func adoptProc(pid int, start uint64, onExit func()) (*proc, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	if st, err := procStartTime(pid); err != nil || st != start {
		unix.Close(fd)
		return nil, fmt.Errorf("process %d is not the one recorded (start time %d, recorded %d)", pid, st, start)
	}
	p := &proc{pid: pid, start: start, pidfd: fd, done: make(chan struct{}), onExit: onExit}
	go func() {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		p.status = "exited (adopted after a kiln restart: exit status unknown)"
		unix.Close(fd)
		p.exited()
	}()
	return p, nil
}

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// kill sends SIGKILL through the pidfd when there is one, so a recycled
// PID is never hit.
func (p *proc) kill() {
	if !p.alive() {
		return
	}
	if p.pidfd >= 0 {
		if err := unix.PidfdSendSignal(p.pidfd, unix.SIGKILL, nil, 0); err == nil || errors.Is(err, unix.ESRCH) {
			return
		}
	}
	syscall.Kill(p.pid, syscall.SIGKILL)
}

// waitExit waits for the process to end, killing it after grace.
func (p *proc) waitExit(grace time.Duration) {
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	p.kill()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
}

// procStat returns the fields of /proc/PID/stat from field 3 on (f[0] is
// field 3, the state; field n is f[n-3]).
func procStat(pid int) ([]string, error) {
	b, err := readProcFile(pid, "stat")
	if err != nil {
		return nil, err
	}
	// The command name (field 2) may hold spaces and parentheses; fields
	// after the last ')' are plain.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 22 {
		return nil, errors.New("malformed stat")
	}
	return f, nil
}

// procStartTime reads field 22 of /proc/PID/stat.
func procStartTime(pid int) (uint64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// procCmdline returns a process's arguments (the first maxProcRead bytes:
// kiln's QEMU names its directory well before that).
func procCmdline(pid int) ([]string, error) {
	b, err := readProcFile(pid, "cmdline")
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), nil
}

// maxProcRead bounds what is read of another process's /proc files: any
// process on the host chooses its own command line, up to megabytes.
const maxProcRead = 64 << 10

func readProcFile(pid int, name string) ([]byte, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/" + name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxProcRead))
}
