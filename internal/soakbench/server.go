//go:build linux

package soakbench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// readyLine is what `kiln server` prints once its API serves.
const readyLine = "kiln API serving at "

// server is the `kiln server` child the soak kills and restarts. Its
// output goes to a file (not a pipe: the QEMUs it starts must not hold
// our end open, and a killed server must not block on a full pipe).
type server struct {
	kiln, data, log string
	api, endpoint   string
	metrics         string
	progress        io.Writer

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

func (s *server) url() string { return "http://" + s.api }

// start runs the server and waits until its API serves.
func (s *server) start(ctx context.Context) error { return s.startFor(ctx, 0) }

// startFor is start; with early > 0 it kills the server after early
// instead if it did not serve by then: a kill during start-up, while it
// recovers its VMs from the last kill.
func (s *server) startFor(ctx context.Context, early time.Duration) error {
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	fi, err := logf.Stat()
	if err != nil {
		return err
	}
	from := fi.Size()
	cmd := exec.Command(s.kiln, "--data-dir", s.data, "server", "--api-addr", s.api, "--endpoint-addr", s.endpoint,
		"--metrics-addr", s.metrics)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting kiln server: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()
	deadline := time.NewTimer(2 * time.Minute)
	defer deadline.Stop()
	var cut <-chan time.Time
	if early > 0 {
		cut = time.After(early)
	}
	for {
		b, _ := os.ReadFile(s.log)
		if int64(len(b)) > from && bytes.Contains(b[from:], []byte(readyLine)) {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("kiln server exited before serving (%v):\n%s", cmd.ProcessState, s.tail())
		case <-deadline.C:
			s.kill()
			return fmt.Errorf("kiln server did not serve within 2 minutes:\n%s", s.tail())
		case <-ctx.Done():
			s.kill()
			return ctx.Err()
		case <-cut:
			s.kill()
			return errKilledEarly
		case <-time.After(50 * time.Millisecond):
		}
	}
}

var errKilledEarly = errors.New("killed during start-up")

// kill sends SIGKILL to the server alone (its QEMUs live on, as after a
// crash) and waits until it is gone.
func (s *server) kill() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

// stop asks the server to shut down (SIGTERM), killing it after a minute.
func (s *server) stop() error {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return nil
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(time.Minute):
		cmd.Process.Signal(syscall.SIGKILL)
		<-exited
		return fmt.Errorf("kiln server did not stop within a minute of SIGTERM; killed it")
	}
}

// tail is the end of the server's log, for error messages.
func (s *server) tail() string {
	b, _ := os.ReadFile(s.log)
	if len(b) > 8<<10 {
		b = b[len(b)-8<<10:]
	}
	return string(b)
}
