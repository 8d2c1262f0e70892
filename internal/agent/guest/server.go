//go:build linux

// Package guest is the in-guest side of the kiln agent: the request handler
// (Server), which runs on any Linux host for tests, and the PID 1 duties
// (Boot, System) that only make sense inside a microVM.
package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// ErrReconnect is returned by a transport's Read when the host side went
// away and came back: the server drops any partial frame and reads on.
var ErrReconnect = errors.New("host reconnected")

// System performs the privileged, machine-wide operations. The real one
// (NewSystem) acts on the guest kernel; tests use a fake.
type System interface {
	// Freeze stops every workload (cgroup freezer) and syncs filesystems.
	Freeze(ctx context.Context) error
	// Thaw resumes the workloads. Thawing thawed workloads is a no-op.
	Thaw(ctx context.Context) error
	// Reseed mixes entropy into the kernel RNG and forces a reseed.
	Reseed(entropy []byte) error
	SetClock(t time.Time) error
	SetHostname(name string) error
	// KillAll sends sig to every workload process, including ones the
	// agent did not start directly (daemons forked by workloads).
	KillAll(sig int) error
	// Running counts workload processes still alive (any process in the
	// workload cgroup, not only those the agent started).
	Running() int
	// PowerOff syncs, unmounts and powers the machine off. It returns only
	// on failure.
	PowerOff() error
}

// Config configures a Server.
type Config struct {
	// Root is where /etc/passwd and /etc/group are read ("/" in a guest).
	Root string
	// CgroupDir, when set, is the cgroup v2 directory every workload is
	// started in (the one System freezes).
	CgroupDir string
	System    System
	Log       *slog.Logger
	// MaxOutputPerExec bounds output buffered per workload (bytes).
	MaxOutputPerExec int
	// ExitGrace is how long to wait for a workload's output pipes to close
	// after it exited (a daemon it forked may hold them open).
	ExitGrace time.Duration
	// RootDisk, if set, mounts the deferred root disk (TypeRootDisk).
	RootDisk func() error
}

// Server answers the host's requests. One Server lives for the guest's whole
// life; host sessions come and go (Serve may be called again).
type Server struct {
	cfg    Config
	log    *slog.Logger
	out    *outbox
	reaper *reaper

	nextID atomic.Uint64 // exec and stream ids, unique for the guest's life
	// epoch counts host sessions (hellos). A handler of an older session
	// that finishes late must not answer: its request id may be reused by
	// the new session.
	epoch atomic.Uint64

	mu      sync.Mutex
	execs   map[uint64]*execState
	streams map[uint64]*copyStream
	watches map[uint64]*watch
	frozen  bool
	bootID  string // cached by the first hello

	handlers sync.WaitGroup
	sem      chan struct{}
}

// NewServer returns a Server. Call Run to start reaping children.
func NewServer(cfg Config) *Server {
	if cfg.Root == "" {
		cfg.Root = "/"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxOutputPerExec <= 0 {
		cfg.MaxOutputPerExec = 4 << 20
	}
	if cfg.ExitGrace <= 0 {
		cfg.ExitGrace = time.Second
	}
	return &Server{
		cfg:     cfg,
		log:     cfg.Log,
		out:     newOutbox(cfg.MaxOutputPerExec),
		reaper:  newReaper(),
		execs:   map[uint64]*execState{},
		streams: map[uint64]*copyStream{},
		watches: map[uint64]*watch{},
		sem:     make(chan struct{}, 256),
	}
}

// Reap runs the child reaper until ctx ends. Run it exactly once.
func (s *Server) Reap(ctx context.Context) { s.reaper.run(ctx) }

// Serve reads requests from r and writes answers and events to w until ctx
// ends or r fails. A Read returning ErrReconnect starts a fresh frame reader
// (a new host connection) and serving goes on.
func (s *Server) Serve(ctx context.Context, r io.Reader, w io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	writeDone := make(chan struct{})
	go func() {
		defer close(writeDone)
		s.writeLoop(ctx, w)
	}()
	defer func() {
		cancel()
		// The writer may sit in a write the transport blocks (virtio-serial
		// blocks writers while no host is connected): wait only briefly.
		select {
		case <-writeDone:
		case <-time.After(time.Second):
		}
	}()

	fr := proto.NewReader(r)
	for {
		payload, err := fr.ReadFrame()
		if errors.Is(err, ErrReconnect) {
			s.log.Info("host reconnected", "skipped_bytes", fr.Skipped())
			fr.Reset(r)
			continue
		}
		if err != nil {
			return err
		}
		m, err := proto.Decode(payload)
		if err != nil {
			s.log.Warn("dropping undecodable message", "err", err)
			continue
		}
		s.dispatch(ctx, m)
	}
}

func (s *Server) writeLoop(ctx context.Context, w io.Writer) {
	for {
		m, ok := s.out.pop()
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-s.out.wake:
			}
			continue
		}
		err := proto.WriteFrame(w, m.payload)
		if m.sent != nil {
			close(m.sent)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("writing to host", "err", err)
			// The transport may come back (virtio-serial reconnect); do not spin.
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

// reply queues the answer to request id.
func (s *Server) reply(id uint64, body any, err error) <-chan struct{} {
	msg := ""
	if err != nil {
		msg = err.Error()
		if msg == "" {
			msg = "error"
		}
	}
	var data []byte
	if sd, ok := body.(proto.StreamData); ok {
		data = sd.Data
	}
	p, encErr := proto.EncodeData(proto.TypeResponse, id, msg, body, data)
	if encErr != nil {
		p, _ = proto.Encode(proto.TypeResponse, id, encErr.Error(), nil)
	}
	return s.out.sendCtrl(p)
}

func (s *Server) dispatch(ctx context.Context, m proto.Message) {
	if m.Type == proto.TypeHello {
		// Handled inline: a new session must be in place before any request
		// that follows it on the wire.
		s.hello(m)
		return
	}
	select {
	case s.sem <- struct{}{}:
	default:
		s.reply(m.ID, nil, errors.New("agent busy: too many requests in flight"))
		return
	}
	epoch := s.epoch.Load()
	s.handlers.Add(1)
	go func() {
		defer s.handlers.Done()
		defer func() { <-s.sem }()
		body, err := s.handle(ctx, m)
		if m.Type == proto.TypeShutdown {
			s.finishShutdown(m.ID, err)
			return
		}
		wa, hasAfter := body.(withAfter)
		if hasAfter {
			body = wa.body
		}
		if s.epoch.Load() == epoch {
			s.reply(m.ID, body, err)
		} else {
			s.log.Debug("dropping answer of an ended session", "type", m.Type, "id", m.ID)
		}
		if hasAfter {
			wa.after()
		}
	}()
}

func (s *Server) hello(m proto.Message) {
	s.log.Debug("hello", "id", m.ID)
	var h proto.Hello
	if err := proto.DecodeBody(m, &h); err != nil {
		s.reply(m.ID, nil, err)
		return
	}
	// Whatever was queued for the previous session has no reader any more.
	s.epoch.Add(1)
	s.out.purgeCtrl()
	s.closeStreams()
	s.closeWatches()
	if h.Version != proto.Version {
		s.reply(m.ID, proto.HelloResult{Version: proto.Version, Nonce: h.Nonce},
			fmt.Errorf("protocol version mismatch: host %d, agent %d", h.Version, proto.Version))
		return
	}
	if h.Restore != nil {
		if err := s.restore(context.Background(), *h.Restore); err != nil {
			s.reply(m.ID, proto.HelloResult{Version: proto.Version, Nonce: h.Nonce}, err)
			return
		}
	}
	s.mu.Lock()
	frozen := s.frozen
	if s.bootID == "" {
		// Read once: it never changes, and clones share it.
		b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
		s.bootID = strings.TrimSpace(string(b))
	}
	bootID := s.bootID
	s.mu.Unlock()
	s.reply(m.ID, proto.HelloResult{Version: proto.Version, Nonce: h.Nonce, BootID: bootID, Frozen: frozen}, nil)
}

func (s *Server) handle(ctx context.Context, m proto.Message) (any, error) {
	switch m.Type {
	case proto.TypePing:
		return nil, nil
	case proto.TypeExec:
		var req proto.ExecRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.exec(req)
	case proto.TypeStdin:
		var req proto.StdinRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		req.Data = m.Data
		return nil, s.stdin(req)
	case proto.TypeResize:
		var req proto.ResizeRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, s.resize(req)
	case proto.TypeSignal:
		var req proto.SignalRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, s.signal(req)
	case proto.TypeFreeze:
		return nil, s.freeze(ctx)
	case proto.TypeRestore:
		var req proto.RestoreRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, s.restore(ctx, req)
	case proto.TypeShutdown:
		var req proto.ShutdownRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, s.shutdown(ctx, req)
	case proto.TypeWaitPort:
		var req proto.WaitPortRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, waitPort(ctx, req)
	case proto.TypeHTTP:
		var req proto.HTTPRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return doHTTP(ctx, req)
	case proto.TypeCopyInOpen:
		var req proto.CopyInOpen
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.copyInOpen(req)
	case proto.TypeCopyInData:
		var req proto.StreamData
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		req.Data = m.Data
		return nil, s.copyInData(ctx, req)
	case proto.TypeCopyOutOpen:
		var req proto.CopyOutOpen
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.copyOutOpen(req)
	case proto.TypeCopyOutRead:
		var req proto.StreamData
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.copyOutRead(ctx, req)
	case proto.TypeListDir:
		var req proto.ListDirRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		var res proto.ListDirResult
		err := s.asUser(req.User, func() (err error) {
			res, err = listDir(req)
			return err
		})
		return res, err
	case proto.TypeFileOp:
		var req proto.FileOpRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.fileOp(req)
	case proto.TypeWatchOpen:
		var req proto.WatchOpen
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.watchOpen(req)
	case proto.TypeWatchRead:
		var req proto.WatchRead
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return s.watchRead(ctx, req)
	case proto.TypeWatchClose:
		var req proto.StreamClose
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		s.closeWatch(req.StreamID)
		return nil, nil
	case proto.TypeMount:
		var req proto.MountRequest
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		return nil, s.mount(req)
	case proto.TypeUnmount:
		return s.unmount()
	case proto.TypeRootDisk:
		if s.cfg.RootDisk == nil {
			return nil, errors.New("root disk: this guest did not boot with kiln.root=defer")
		}
		return nil, s.cfg.RootDisk()
	case proto.TypeStreamClose:
		var req proto.StreamClose
		if err := proto.DecodeBody(m, &req); err != nil {
			return nil, err
		}
		s.closeStream(req.StreamID)
		return nil, nil
	default:
		return nil, fmt.Errorf("unknown request type %q", m.Type)
	}
}

func (s *Server) freeze(ctx context.Context) error {
	if s.cfg.System == nil {
		return errors.New("freeze: no system support")
	}
	if err := s.cfg.System.Freeze(ctx); err != nil {
		return fmt.Errorf("freezing workloads: %w", err)
	}
	s.mu.Lock()
	s.frozen = true
	s.mu.Unlock()
	// Collect now, while nothing waits, and hand the freed memory back to
	// the kernel at once: otherwise every clone runs a GC cycle and the
	// runtime's scavenger (madvise) right after restore, which under TCG
	// and on copy-on-write memory costs tens of ms of its start-up.
	debug.FreeOSMemory()
	s.log.Debug("frozen")
	return nil
}

// restore refreshes the guest's identity, and only then lets workloads run:
// user code must never see the clone's copy of the template's RNG state,
// clock or hostname.
func (s *Server) restore(ctx context.Context, req proto.RestoreRequest) error {
	if s.cfg.System == nil {
		return errors.New("restore: no system support")
	}
	if len(req.Entropy) < proto.MinEntropy {
		return fmt.Errorf("restore: %d bytes of entropy, need at least %d", len(req.Entropy), proto.MinEntropy)
	}
	if len(req.Entropy) > 4096 {
		return fmt.Errorf("restore: %d bytes of entropy, at most 4096", len(req.Entropy))
	}
	sys := s.cfg.System
	t0 := time.Now()
	defer func() { s.log.Debug("restored identity", "elapsed", time.Since(t0)) }()
	if err := sys.Reseed(req.Entropy); err != nil {
		return fmt.Errorf("reseeding rng: %w", err)
	}
	tReseed := time.Since(t0)
	if req.UnixNano != 0 {
		if err := sys.SetClock(time.Unix(0, req.UnixNano)); err != nil {
			return fmt.Errorf("setting clock: %w", err)
		}
	}
	tClock := time.Since(t0)
	if req.Hostname != "" {
		if err := sys.SetHostname(req.Hostname); err != nil {
			return fmt.Errorf("setting hostname: %w", err)
		}
	}
	t1 := time.Now()
	if err := sys.Thaw(ctx); err != nil {
		return fmt.Errorf("thawing workloads: %w", err)
	}
	s.log.Debug("thawed", "reseed", tReseed, "clock", tClock, "identity", t1.Sub(t0), "thaw", time.Since(t1))
	s.mu.Lock()
	s.frozen = false
	s.mu.Unlock()
	return nil
}

func (s *Server) shutdown(ctx context.Context, req proto.ShutdownRequest) error {
	grace := time.Duration(req.GraceMillis) * time.Millisecond
	if grace <= 0 {
		grace = 5 * time.Second
	}
	if grace > time.Minute {
		grace = time.Minute
	}
	sys := s.cfg.System
	if sys != nil {
		// Frozen processes cannot act on SIGTERM.
		_ = sys.Thaw(ctx)
	}
	s.signalAll(15)
	if sys != nil {
		_ = sys.KillAll(15)
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) && (s.running() > 0 || (sys != nil && sys.Running() > 0)) {
		time.Sleep(20 * time.Millisecond)
	}
	s.signalAll(9)
	if sys != nil {
		_ = sys.KillAll(9)
	}
	return nil
}

// finishShutdown answers the shutdown request, waits (bounded) until the
// answer is on the wire, then powers off.
func (s *Server) finishShutdown(id uint64, err error) {
	sent := s.reply(id, nil, err)
	if err != nil || s.cfg.System == nil {
		return
	}
	select {
	case <-sent:
	case <-time.After(2 * time.Second):
	}
	if err := s.cfg.System.PowerOff(); err != nil {
		s.log.Error("powering off", "err", err)
	}
}
