// Package client is the host side of the kiln agent protocol: it drives one
// guest agent over any byte stream (a virtio-serial port's unix socket
// today, vsock later). Many calls and workloads share the one channel.
//
// The guest is not trusted: every frame is size-bounded and checksummed,
// undecodable messages and unknown ids are dropped, and output the caller
// does not consume is dropped oldest-first instead of growing memory.
package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

var (
	// ErrClosed is returned by calls on a client whose connection is gone.
	ErrClosed = errors.New("agent connection closed")
	// ErrVersion is returned by New when the agent speaks another version.
	ErrVersion = errors.New("agent protocol version mismatch")
)

const (
	// helloRetry is how often New repeats its hello while the agent is
	// silent (still booting, or its reader skipping stale bytes).
	helloRetry = time.Second
	// Output chunks are at most proto.MaxChunk (64 KiB), so a full Logs or
	// Process.Output buffer holds at most 16 MiB.
	logBuffer = 256
	outBuffer = 256
)

// ExecRequest describes a workload to start; see proto.ExecRequest.
type ExecRequest struct {
	Argv []string
	Env  []string
	Cwd  string
	// User is "name", "uid", "name:group" or "uid:gid"; empty is root.
	User  string
	Stdin bool
	TTY   bool
	// Cols and Rows set the initial TTY size.
	Cols, Rows uint16
	// Background workloads (the app) report output through Client.Logs,
	// not Process.Output, and outlive host sessions.
	Background bool
	// Caps is proto.CapsDefault for the restricted default capability
	// set; "" or proto.CapsAll keeps every capability.
	Caps string
}

// RestoreRequest is the guest's new identity after a clone or resume.
type RestoreRequest struct {
	// Entropy, at least 32 bytes, from the host's CSPRNG.
	Entropy  []byte
	UnixNano int64
	Hostname string
}

// Client is a connection to one guest agent. It is safe for concurrent use.
type Client struct {
	conn io.ReadWriteCloser
	log  *slog.Logger

	sendCh chan []byte

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]*call
	procs   map[uint64]*Process
	// orphans hold what arrives for workloads no Process of this session
	// owns (started by an earlier session, e.g. before a suspend), so
	// Adopt can hand it on; bounded by maxOrphans, maxOrphanBytes and
	// maxOrphanTotal (orphanBytes).
	orphans map[uint64]*orphan
	// orphanBytes is what all orphans' output costs (maxOrphanTotal).
	orphanBytes int
	orphanSeq   uint64

	hello proto.HelloResult

	logs        chan proto.LogRecord
	logsDropped atomic.Uint64
	invalid     atomic.Uint64

	done      chan struct{}
	closeOnce sync.Once
	err       error
}

type call struct {
	ch chan proto.Message
	// onResp runs on the read loop before any later frame is handled (used
	// to register a process before its first output can arrive).
	onResp func(proto.Message)
}

// New starts a session with the agent on conn: it sends a hello with a
// random nonce and waits, bounded by ctx, for the answer carrying that nonce
// (anything before it is stale and dropped). The client owns conn from here
// on and closes it on failure or Close.
func New(ctx context.Context, conn io.ReadWriteCloser, log *slog.Logger) (*Client, error) {
	return newClient(ctx, conn, log, nil)
}

// NewRestored is New for a guest just restored from a snapshot: the hello
// carries the guest's new identity, which the agent applies (and thaws its
// workloads) before it answers. UnixNano is taken at each send.
func NewRestored(ctx context.Context, conn io.ReadWriteCloser, log *slog.Logger, r RestoreRequest) (*Client, error) {
	return newClient(ctx, conn, log, &r)
}

func newClient(ctx context.Context, conn io.ReadWriteCloser, log *slog.Logger, restore *RestoreRequest) (*Client, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		conn:    conn,
		log:     log,
		sendCh:  make(chan []byte, 64),
		pending: map[uint64]*call{},
		procs:   map[uint64]*Process{},
		orphans: map[uint64]*orphan{},
		logs:    make(chan proto.LogRecord, logBuffer),
		done:    make(chan struct{}),
	}
	// Start ids at a random point: should a late answer of an earlier
	// session slip through, it will not match a request of this one.
	var rb [4]byte
	_, _ = rand.Read(rb[:])
	c.nextID = uint64(binary.BigEndian.Uint32(rb[:])) << 16
	go c.readLoop()
	go c.writeLoop()
	if err := c.handshake(ctx, restore); err != nil {
		c.fail(err)
		return nil, err
	}
	return c, nil
}

func (c *Client) handshake(ctx context.Context, restore *RestoreRequest) error {
	var nb [16]byte
	_, _ = rand.Read(nb[:])
	nonce := hex.EncodeToString(nb[:])
	answers := make(chan proto.Message, 16)
	var ids []uint64
	defer func() {
		c.mu.Lock()
		for _, id := range ids {
			delete(c.pending, id)
		}
		c.mu.Unlock()
	}()
	tick := time.NewTicker(helloRetry)
	defer tick.Stop()
	for {
		c.mu.Lock()
		c.nextID++
		id := c.nextID
		c.pending[id] = &call{ch: answers}
		c.mu.Unlock()
		ids = append(ids, id)
		hello := proto.Hello{Version: proto.Version, Nonce: nonce}
		if restore != nil {
			hello.Restore = &proto.RestoreRequest{Entropy: restore.Entropy, UnixNano: time.Now().UnixNano(), Hostname: restore.Hostname}
		}
		payload, err := proto.Encode(proto.TypeHello, id, "", hello)
		if err != nil {
			return err
		}
		if err := c.send(ctx, payload); err != nil {
			return fmt.Errorf("agent hello: %w", err)
		}
	wait:
		for {
			select {
			case <-ctx.Done():
				return fmt.Errorf("agent hello: %w", ctx.Err())
			case <-c.done:
				return fmt.Errorf("agent hello: %w", c.Err())
			case <-tick.C:
				break wait
			case m := <-answers:
				var h proto.HelloResult
				if err := proto.DecodeBody(m, &h); err != nil || h.Nonce != nonce {
					continue // stale answer of another session
				}
				if h.Version != proto.Version {
					return fmt.Errorf("%w: host %d, agent %d", ErrVersion, proto.Version, h.Version)
				}
				if m.Error != "" {
					return fmt.Errorf("agent hello: %s", m.Error)
				}
				c.hello = h
				return nil
			}
		}
	}
}

// Frozen reports whether the agent said at hello time that its workloads
// were frozen (true right after restoring a snapshot).
func (c *Client) Frozen() bool { return c.hello.Frozen }

// BootID is the guest kernel's boot id as reported at hello time.
func (c *Client) BootID() string { return c.hello.BootID }

// Done is closed when the connection is lost or closed.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, nil while it is up.
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Close closes the connection. Running workloads keep running in the guest.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	return nil
}

// Logs returns output of background workloads and of workloads nobody waits
// on (e.g. started by an earlier session), and their exits. When the caller
// falls behind, the oldest records are dropped (see LogsDropped). The channel
// is closed when the connection ends.
func (c *Client) Logs() <-chan proto.LogRecord { return c.logs }

// LogsDropped counts log records dropped because Logs was not drained.
func (c *Client) LogsDropped() uint64 { return c.logsDropped.Load() }

// InvalidFrames counts frames from the guest that failed to decode.
func (c *Client) InvalidFrames() uint64 { return c.invalid.Load() }

func (c *Client) fail(err error) {
	c.closeOnce.Do(func() {
		c.err = err
		close(c.done)
		_ = c.conn.Close()
	})
}

func (c *Client) writeLoop() {
	for {
		select {
		case <-c.done:
			return
		case frame := <-c.sendCh:
			if _, err := c.conn.Write(frame); err != nil {
				c.fail(fmt.Errorf("writing to agent: %w", err))
				return
			}
		}
	}
}

// send queues one message; it gives up when ctx ends or the connection dies.
func (c *Client) send(ctx context.Context, payload []byte) error {
	frame, err := proto.AppendFrame(nil, payload)
	if err != nil {
		return err
	}
	select {
	case c.sendCh <- frame:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return fmt.Errorf("%w: %w", ErrClosed, c.err)
	}
}

// call sends a request and waits for its response, bounded by ctx.
func (c *Client) call(ctx context.Context, t proto.Type, body any, out any, onResp func(proto.Message)) error {
	return c.callData(ctx, t, body, nil, out, onResp)
}

// callData is call with bulk bytes attached to the request. A response's
// bulk bytes land in out when out is a *proto.StreamData.
func (c *Client) callData(ctx context.Context, t proto.Type, body any, data []byte, out any, onResp func(proto.Message)) error {
	select {
	case <-c.done:
		return fmt.Errorf("%s: %w: %w", t, ErrClosed, c.err)
	default:
	}
	cl := &call{ch: make(chan proto.Message, 1), onResp: onResp}
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.pending[id] = cl
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()
	payload, err := proto.EncodeData(t, id, "", body, data)
	if err != nil {
		return err
	}
	if err := c.send(ctx, payload); err != nil {
		return fmt.Errorf("%s: %w", t, err)
	}
	select {
	case m := <-cl.ch:
		if m.Error != "" {
			return fmt.Errorf("%s: agent: %s", t, m.Error)
		}
		if out != nil {
			if err := proto.DecodeBody(m, out); err != nil {
				return fmt.Errorf("%s: %w", t, err)
			}
			if sd, ok := out.(*proto.StreamData); ok {
				sd.Data = m.Data
			}
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", t, ctx.Err())
	case <-c.done:
		return fmt.Errorf("%s: %w: %w", t, ErrClosed, c.err)
	}
}

func (c *Client) readLoop() {
	defer c.closeAll()
	fr := proto.NewReader(c.conn)
	for {
		payload, err := fr.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.EOF
			}
			c.fail(fmt.Errorf("reading from agent: %w", err))
			return
		}
		m, err := proto.Decode(payload)
		if err != nil {
			c.invalid.Add(1)
			c.log.Debug("dropping undecodable frame from agent", "err", err)
			continue
		}
		switch m.Type {
		case proto.TypeResponse:
			c.handleResponse(m)
		case proto.TypeOutput:
			c.handleOutput(m)
		case proto.TypeExit:
			c.handleExit(m)
		default:
			c.invalid.Add(1)
			c.log.Debug("dropping message of unknown type from agent", "type", m.Type)
		}
	}
}

func (c *Client) handleResponse(m proto.Message) {
	c.mu.Lock()
	cl, ok := c.pending[m.ID]
	c.mu.Unlock()
	if !ok {
		c.log.Debug("dropping response to unknown request", "id", m.ID)
		return
	}
	if cl.onResp != nil && m.Error == "" {
		cl.onResp(m)
	}
	select {
	case cl.ch <- m:
	default: // a duplicate answer: the first one won
	}
}

func (c *Client) handleOutput(m proto.Message) {
	var o proto.Output
	// A chunk is at most proto.MaxChunk: the agent reads that much per
	// read, so anything larger is not an honest agent's.
	// Nor does it send an empty one (drops ride on the next chunk).
	if err := proto.DecodeBody(m, &o); err != nil || o.ExecID == 0 || (o.Stream != proto.Stdout && o.Stream != proto.Stderr) ||
		len(m.Data) == 0 || len(m.Data) > proto.MaxChunk {
		c.invalid.Add(1)
		return
	}
	// A copy: m.Data shares its frame's buffer, which a hostile agent pads
	// to a frame's size; a kept chunk must hold only what it carries.
	o.Data = bytes.Clone(m.Data)
	c.mu.Lock()
	p := c.procs[o.ExecID]
	if p != nil && !p.background {
		// Under the lock: Adopt may finish p, after which nothing is pushed.
		p.push(o)
		c.mu.Unlock()
		return
	}
	if p == nil && !o.Background {
		c.keepOrphanOutput(o)
	}
	c.mu.Unlock()
	c.pushLog(proto.LogRecord{ExecID: o.ExecID, Stream: o.Stream, Data: o.Data, Time: o.Time, Dropped: o.Dropped})
}

func (c *Client) handleExit(m proto.Message) {
	var e proto.Exit
	// An exit status is 0-255 (128+signal when killed), a signal 1-64.
	if err := proto.DecodeBody(m, &e); err != nil || e.ExecID == 0 || e.Code < 0 || e.Code > 255 || e.Signal < 0 || e.Signal > 64 {
		c.invalid.Add(1)
		return
	}
	c.mu.Lock()
	p := c.procs[e.ExecID]
	delete(c.procs, e.ExecID)
	if p != nil {
		p.finish(e, nil)
	} else if !e.Background {
		c.keepOrphanExit(e)
	}
	c.mu.Unlock()
	if p == nil || p.background {
		code := e.Code
		c.pushLog(proto.LogRecord{ExecID: e.ExecID, Time: e.Time, ExitCode: &code})
	}
}

// pushLog never blocks the read loop: a full buffer loses its oldest record.
func (c *Client) pushLog(r proto.LogRecord) {
	for {
		select {
		case c.logs <- r:
			return
		default:
		}
		select {
		case <-c.logs:
			c.logsDropped.Add(1)
		default:
		}
	}
}

// closeAll ends every process and the log channel once the read loop stops.
func (c *Client) closeAll() {
	c.mu.Lock()
	procs := c.procs
	c.procs = map[uint64]*Process{}
	c.mu.Unlock()
	for _, p := range procs {
		p.finish(proto.Exit{}, fmt.Errorf("%w: %w", ErrClosed, c.err))
	}
	close(c.logs)
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	return c.call(ctx, proto.TypePing, nil, nil, nil)
}

// Freeze freezes every workload (cgroup v2 freezer) and syncs the guest's
// filesystems: call it before a snapshot or suspend. Idempotent.
func (c *Client) Freeze(ctx context.Context) error {
	return c.call(ctx, proto.TypeFreeze, nil, nil, nil)
}

// Restore gives the guest a new identity after a clone or resume: it mixes
// Entropy into the kernel RNG and reseeds it, sets the clock and the
// hostname, and only then thaws the workloads.
func (c *Client) Restore(ctx context.Context, r RestoreRequest) error {
	if len(r.Entropy) < proto.MinEntropy {
		return fmt.Errorf("restore: %d bytes of entropy, need at least %d", len(r.Entropy), proto.MinEntropy)
	}
	return c.call(ctx, proto.TypeRestore, proto.RestoreRequest{Entropy: r.Entropy, UnixNano: r.UnixNano, Hostname: r.Hostname}, nil, nil)
}

// Shutdown stops the workloads (SIGTERM, then SIGKILL after a grace of 5 s),
// syncs, unmounts and powers the guest off. It returns once the agent has
// acknowledged; the VM then exits on its own.
func (c *Client) Shutdown(ctx context.Context) error {
	return c.ShutdownGrace(ctx, 5*time.Second)
}

// ShutdownGrace is Shutdown with a chosen grace between SIGTERM and SIGKILL.
func (c *Client) ShutdownGrace(ctx context.Context, grace time.Duration) error {
	return c.call(ctx, proto.TypeShutdown, proto.ShutdownRequest{GraceMillis: grace.Milliseconds()}, nil, nil)
}

// WaitPort waits until something accepts TCP on 127.0.0.1:port inside the
// guest, for at most timeout.
func (c *Client) WaitPort(ctx context.Context, port int, timeout time.Duration) error {
	return c.call(ctx, proto.TypeWaitPort, proto.WaitPortRequest{Port: port, TimeoutMillis: timeout.Milliseconds()}, nil, nil)
}

// HTTP makes the agent send an HTTP request to 127.0.0.1:port inside the
// guest (lifecycle hooks, health checks). The response body is cut at
// proto.MaxHTTPBody bytes.
func (c *Client) HTTP(ctx context.Context, port int, method, path string, body []byte, timeout time.Duration) (int, []byte, error) {
	if len(body) > proto.MaxHTTPBody {
		return 0, nil, fmt.Errorf("http: request body of %d bytes exceeds %d", len(body), proto.MaxHTTPBody)
	}
	var res proto.HTTPResult
	err := c.call(ctx, proto.TypeHTTP, proto.HTTPRequest{Port: port, Method: method, Path: path, Body: body, TimeoutMillis: timeout.Milliseconds()}, &res, nil)
	if err != nil {
		return 0, nil, err
	}
	if len(res.Body) > proto.MaxHTTPBody {
		res.Body = res.Body[:proto.MaxHTTPBody]
	}
	return res.Status, res.Body, nil
}

// Mount mounts a build step's file systems (RUN --mount) into the guest's
// root; Unmount undoes it. One set at a time.
func (c *Client) Mount(ctx context.Context, mounts []proto.MountSpec) error {
	return c.call(ctx, proto.TypeMount, proto.MountRequest{Mounts: mounts}, nil, nil)
}

// RootDisk finishes the boot of a guest started with kiln.root=defer:
// its disks are probed and /dev/vda becomes its root (see
// proto.RootDiskRequest).
func (c *Client) RootDisk(ctx context.Context) error {
	return c.call(ctx, proto.TypeRootDisk, proto.RootDiskRequest{}, nil, nil)
}

// Unmount undoes Mount and reports how full each mount was. The guest
// answers: the usage is for messages only, never trusted.
func (c *Client) Unmount(ctx context.Context) ([]proto.MountUsage, error) {
	var res proto.UnmountResult
	err := c.call(ctx, proto.TypeUnmount, proto.UnmountRequest{}, &res, nil)
	return res.Usage, err
}

// CopyIn extracts the tar stream into dstDir (an absolute guest path,
// created if missing), one acknowledged chunk at a time.
func (c *Client) CopyIn(ctx context.Context, dstDir string, tarStream io.Reader) error {
	return c.CopyInAs(ctx, dstDir, "", tarStream)
}

// CopyInAs is CopyIn as user (see proto.CopyInOpen.User; "" is root).
func (c *Client) CopyInAs(ctx context.Context, dstDir, user string, tarStream io.Reader) error {
	var open proto.StreamResult
	if err := c.call(ctx, proto.TypeCopyInOpen, proto.CopyInOpen{Dir: dstDir, User: user}, &open, nil); err != nil {
		return err
	}
	buf := make([]byte, proto.MaxCopyChunk)
	for {
		n, rerr := io.ReadFull(tarStream, buf)
		eof := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)
		if rerr != nil && !eof {
			c.closeStream(open.StreamID)
			return fmt.Errorf("copy in: reading tar stream: %w", rerr)
		}
		if err := c.callData(ctx, proto.TypeCopyInData, proto.StreamData{StreamID: open.StreamID, EOF: eof}, buf[:n], nil, nil); err != nil {
			c.closeStream(open.StreamID)
			return err
		}
		if eof {
			return nil
		}
	}
}

// CopyOut writes a tar stream of srcPath (a guest file or directory; entry
// names start with its base name) to w.
func (c *Client) CopyOut(ctx context.Context, srcPath string, w io.Writer) error {
	return c.CopyOutAs(ctx, srcPath, "", w)
}

// CopyOutAs is CopyOut as user (see proto.CopyOutOpen.User; "" is root).
func (c *Client) CopyOutAs(ctx context.Context, srcPath, user string, w io.Writer) error {
	var open proto.StreamResult
	if err := c.call(ctx, proto.TypeCopyOutOpen, proto.CopyOutOpen{Path: srcPath, User: user}, &open, nil); err != nil {
		return err
	}
	for {
		var d proto.StreamData
		if err := c.call(ctx, proto.TypeCopyOutRead, proto.StreamData{StreamID: open.StreamID}, &d, nil); err != nil {
			c.closeStream(open.StreamID)
			return err
		}
		if len(d.Data) > proto.MaxCopyChunk {
			c.closeStream(open.StreamID)
			return fmt.Errorf("copy out: agent sent a %d-byte chunk", len(d.Data))
		}
		if _, err := w.Write(d.Data); err != nil {
			c.closeStream(open.StreamID)
			return fmt.Errorf("copy out: %w", err)
		}
		if d.EOF {
			return nil
		}
	}
}

// closeStream aborts a copy stream in the guest, best effort.
func (c *Client) closeStream(id uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = c.call(ctx, proto.TypeStreamClose, proto.StreamClose{StreamID: id}, nil, nil)
}

// ListDir lists a guest path (see proto.ListDirRequest). The answer comes
// from the guest, so it is checked before it is returned: at most
// proto.MaxListEntries entries, each a known type and under the path asked
// for (ValidateListing).
func (c *Client) ListDir(ctx context.Context, path string, depth int) (proto.ListDirResult, error) {
	return c.ListDirAs(ctx, path, depth, "")
}

// ListDirAs is ListDir as user (see ExecRequest.User; "" is root): the
// guest refuses what the user may not read.
func (c *Client) ListDirAs(ctx context.Context, path string, depth int, user string) (proto.ListDirResult, error) {
	var res proto.ListDirResult
	if err := c.call(ctx, proto.TypeListDir, proto.ListDirRequest{Path: path, Depth: depth, User: user}, &res, nil); err != nil {
		return res, err
	}
	if err := proto.ValidateListing(path, depth, res); err != nil {
		return proto.ListDirResult{}, fmt.Errorf("list: the agent's answer: %w", err)
	}
	return res, nil
}
