//go:build linux

package guest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"golang.org/x/sys/unix"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

type execState struct {
	id  uint64
	pid int
	// procMu guards proc against Release racing with signals; after the
	// exit proc is nil and the pid may belong to someone else.
	procMu  sync.Mutex
	proc    *os.Process
	tty     *os.File // pty master, nil without TTY
	stdinMu sync.Mutex
	stdin   *os.File // pipe to stdin (or the pty master), nil without Stdin
	exited  chan struct{}
}

func (s *Server) exec(req proto.ExecRequest) (any, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, errors.New("exec: empty argv")
	}
	s.mu.Lock()
	frozen := s.frozen
	s.mu.Unlock()
	if frozen {
		// It would start inside the frozen cgroup and hang there.
		return nil, errors.New("exec: workloads are frozen; restore first")
	}
	id, err := lookupUser(s.cfg.Root, req.User)
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	env := withDefaults(req.Env, id)
	if req.TTY && !hasEnv(env, "TERM") {
		env = append(env, "TERM=xterm")
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = id.home
		if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
			cwd = "/"
		}
	}
	path, err := lookPath(req.Argv[0], env, cwd)
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	attr := &syscall.SysProcAttr{Setsid: true}
	if os.Getuid() == 0 {
		attr.Credential = &syscall.Credential{Uid: id.uid, Gid: id.gid, Groups: id.groups}
	}
	execPath, argv, err := capExecCmd(path, req, attr)
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	cmd := &exec.Cmd{Path: execPath, Args: argv, Env: env, Dir: cwd}
	if s.cfg.CgroupDir != "" {
		fd, err := unix.Open(s.cfg.CgroupDir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("exec: opening workload cgroup: %w", err)
		}
		defer unix.Close(fd)
		attr.UseCgroupFD, attr.CgroupFD = true, fd
	}
	cmd.SysProcAttr = attr

	st := &execState{id: s.nextID.Add(1), exited: make(chan struct{})}
	var childFiles []*os.File // closed in the agent once the child has them
	var readers []struct {
		f      *os.File
		stream proto.Stream
	}
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	if req.TTY {
		master, slave, err := pty.Open()
		if err != nil {
			return nil, fmt.Errorf("exec: opening pty: %w", err)
		}
		if req.Cols > 0 && req.Rows > 0 {
			_ = pty.Setsize(master, &pty.Winsize{Cols: req.Cols, Rows: req.Rows})
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		attr.Setctty, attr.Ctty = true, 0
		childFiles = append(childFiles, slave)
		st.tty = master
		if req.Stdin {
			st.stdin = master
		}
		readers = append(readers, struct {
			f      *os.File
			stream proto.Stream
		}{master, proto.Stdout})
	} else {
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, fmt.Errorf("exec: %w", err)
			}
			cmd.Stdin = r
			childFiles = append(childFiles, r)
			st.stdin = w
		}
		for _, stream := range []proto.Stream{proto.Stdout, proto.Stderr} {
			r, w, err := os.Pipe()
			if err != nil {
				closeAll(childFiles)
				return nil, fmt.Errorf("exec: %w", err)
			}
			if stream == proto.Stdout {
				cmd.Stdout = w
			} else {
				cmd.Stderr = w
			}
			childFiles = append(childFiles, w)
			readers = append(readers, struct {
				f      *os.File
				stream proto.Stream
			}{r, stream})
		}
	}
	cleanupParent := func() {
		for _, r := range readers {
			r.f.Close()
		}
		if st.stdin != nil && st.stdin != st.tty {
			st.stdin.Close()
		}
	}

	waitCh, err := s.reaper.start(cmd)
	closeAll(childFiles)
	if err != nil {
		cleanupParent()
		return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
	}
	st.proc, st.pid = cmd.Process, cmd.Process.Pid
	s.mu.Lock()
	s.execs[st.id] = st
	s.mu.Unlock()
	s.log.Debug("exec started", "exec_id", st.id, "pid", st.pid, "argv", req.Argv)

	out := s.out.stream(st.id, req.Background)
	// Pumps start after the response is queued (see below), so the host
	// always learns the exec id before the first output carrying it.
	start := make(chan struct{})
	var pumps sync.WaitGroup
	for _, r := range readers {
		pumps.Add(1)
		go func() {
			defer pumps.Done()
			<-start
			pump(s, out, r.f, r.stream)
		}()
	}
	pumpsDone := make(chan struct{})
	go func() {
		pumps.Wait()
		close(pumpsDone)
	}()
	go func() {
		ws := <-waitCh
		st.procMu.Lock()
		close(st.exited)
		_ = st.proc.Release()
		st.proc = nil
		st.procMu.Unlock()
		// Let the pipes drain; a daemon the workload forked may hold them
		// open for ever, so bound the wait.
		select {
		case <-pumpsDone:
		case <-time.After(s.cfg.ExitGrace):
		}
		e := proto.Exit{ExecID: st.id, Time: time.Now(), Background: req.Background}
		switch {
		case ws.Exited():
			e.Code = ws.ExitStatus()
		case ws.Signaled():
			e.Signal = int(ws.Signal())
			e.Code = 128 + e.Signal
		}
		s.out.exit(out, e)
		s.log.Debug("exec exited", "exec_id", st.id, "code", e.Code)
		st.stdinMu.Lock()
		if st.stdin != nil && st.stdin != st.tty {
			st.stdin.Close()
		}
		st.stdin = nil
		st.stdinMu.Unlock()
		<-pumpsDone
		s.out.close(out)
		if st.tty != nil {
			st.tty.Close()
		}
		s.mu.Lock()
		delete(s.execs, st.id)
		s.mu.Unlock()
	}()
	res := proto.ExecResult{ExecID: st.id, Pid: st.pid}
	// The dispatcher queues the response, then calls after: the pumps start
	// only then.
	return withAfter{body: res, after: func() { close(start) }}, nil
}

// withAfter is a handler result whose after func runs once the response is
// queued.
type withAfter struct {
	body  any
	after func()
}

// pump copies a workload's output into the outbox. It never blocks on the
// host: the outbox drops old output instead.
func pump(s *Server, out *outStream, f *os.File, stream proto.Stream) {
	defer f.Close()
	for {
		buf := make([]byte, proto.MaxChunk)
		n, err := f.Read(buf)
		if n > 0 {
			s.out.output(out, stream, buf[:n:n])
		}
		if err != nil {
			// EOF for pipes, EIO for a pty whose slave side is gone.
			return
		}
	}
}

func (s *Server) lookupExec(id uint64) (*execState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.execs[id]
	if !ok {
		return nil, fmt.Errorf("exec %d not found", id)
	}
	return st, nil
}

func (s *Server) stdin(req proto.StdinRequest) error {
	st, err := s.lookupExec(req.ExecID)
	if err != nil {
		return err
	}
	if len(req.Data) == 0 && !req.Close {
		// The host's probe whether the workload is still tracked (Adopt):
		// answered at once, not behind a write the workload does not read.
		return nil
	}
	st.stdinMu.Lock()
	defer st.stdinMu.Unlock()
	if st.stdin == nil {
		return fmt.Errorf("exec %d: stdin is closed", req.ExecID)
	}
	if len(req.Data) > 0 {
		if _, err := st.stdin.Write(req.Data); err != nil {
			return fmt.Errorf("writing stdin: %w", err)
		}
	}
	if req.Close {
		if st.stdin == st.tty {
			// A pty has no half-close: send EOF (^D) the way a terminal does.
			_, err := st.tty.Write([]byte{4})
			st.stdin = nil
			return err
		}
		err := st.stdin.Close()
		st.stdin = nil
		return err
	}
	return nil
}

func (s *Server) resize(req proto.ResizeRequest) error {
	st, err := s.lookupExec(req.ExecID)
	if err != nil {
		return err
	}
	if st.tty == nil {
		return fmt.Errorf("exec %d has no tty", req.ExecID)
	}
	return pty.Setsize(st.tty, &pty.Winsize{Cols: req.Cols, Rows: req.Rows})
}

func (s *Server) signal(req proto.SignalRequest) error {
	st, err := s.lookupExec(req.ExecID)
	if err != nil {
		return err
	}
	if req.Signal <= 0 || req.Signal > 64 {
		return fmt.Errorf("invalid signal %d", req.Signal)
	}
	st.procMu.Lock()
	defer st.procMu.Unlock()
	if st.proc == nil {
		return fmt.Errorf("exec %d already exited", req.ExecID)
	}
	return st.proc.Signal(syscall.Signal(req.Signal))
}

// signalAll signals every running workload's process group.
func (s *Server) signalAll(sig int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.execs {
		st.procMu.Lock()
		if st.proc != nil {
			// Workloads run in their own session: signal the whole group.
			// The leader is not reaped yet (proc is set), so its pid is
			// still its own.
			_ = unix.Kill(-st.pid, syscall.Signal(sig))
			_ = st.proc.Signal(syscall.Signal(sig))
		}
		st.procMu.Unlock()
	}
}

func (s *Server) running() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, st := range s.execs {
		select {
		case <-st.exited:
		default:
			n++
		}
	}
	return n
}

func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return true
		}
	}
	return false
}

// withDefaults fills in the PATH and HOME a workload expects.
func withDefaults(env []string, id identity) []string {
	out := make([]string, 0, len(env)+2)
	hasPath, hasHome := false, false
	for _, kv := range env {
		switch {
		case strings.HasPrefix(kv, "PATH="):
			hasPath = true
		case strings.HasPrefix(kv, "HOME="):
			hasHome = true
		}
		out = append(out, kv)
	}
	if !hasPath {
		out = append(out, "PATH="+defaultPath)
	}
	if !hasHome {
		out = append(out, "HOME="+id.home)
	}
	return out
}

// lookPath resolves argv0 against the workload's PATH (not the agent's).
func lookPath(argv0 string, env []string, cwd string) (string, error) {
	if strings.Contains(argv0, "/") {
		p := argv0
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		return p, nil
	}
	pathEnv := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(cwd, dir)
		}
		p := filepath.Join(dir, argv0)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: executable file not found in $PATH", argv0)
}
