//go:build linux

package clusterbench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// proc is one kiln role running as a child process. Its output goes to a
// file, not a pipe: the QEMUs a node starts must not hold our end open.
type proc struct {
	name, data, log string
	cmd             *exec.Cmd
	exited          chan struct{}
}

// startProc runs kiln --data-dir data args... and waits until ready
// appears in its output.
func startProc(ctx context.Context, kiln, name, data, logFile, ready string, args ...string) (*proc, error) {
	p := &proc{name: name, data: data, log: logFile, exited: make(chan struct{})}
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p.cmd = exec.Command(kiln, append([]string{"--data-dir", data}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting kiln %s: %w", name, err)
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	deadline := time.After(2 * time.Minute)
	for {
		b, _ := os.ReadFile(logFile)
		if bytes.Contains(b, []byte(ready)) {
			return p, nil
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("kiln %s exited before it was ready:\n%s", name, p.tail())
		case <-deadline:
			p.stop()
			return nil, fmt.Errorf("kiln %s not ready within 2 minutes:\n%s", name, p.tail())
		case <-ctx.Done():
			p.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop asks the process to end (SIGTERM) and kills it after 30 s.
func (p *proc) stop() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("kiln %s did not stop within 30s of SIGTERM; killed it", p.name)
	}
}

// tail is the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 8<<10 {
		b = b[len(b)-8<<10:]
	}
	return string(b)
}

// freeAddr is a loopback address with a port free right now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return "127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}

// copyShared copies the keys every role of one cluster shares (the
// sealing key of access keys, the endpoint token key, the admin
// credentials) from control's data directory into to.
func copyShared(from, to string) error {
	for _, f := range []string{"secrets.key", "token.key", "credentials"} {
		b, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			return fmt.Errorf("sharing %s of control: %w", f, err)
		}
		if err := os.WriteFile(filepath.Join(to, f), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}
