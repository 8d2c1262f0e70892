package client_test

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// fakeAgent is a hand-driven guest: it reads requests and lets the test
// decide what garbage to answer with.
type fakeAgent struct {
	t    *testing.T
	conn net.Conn
	r    *proto.Reader
}

func newFakeAgent(t *testing.T) (*fakeAgent, net.Conn) {
	host, guest := net.Pipe()
	t.Cleanup(func() { host.Close(); guest.Close() })
	return &fakeAgent{t: t, conn: guest, r: proto.NewReader(guest)}, host
}

func (f *fakeAgent) next() proto.Message {
	p, err := f.r.ReadFrame()
	if err != nil {
		f.t.Errorf("fake agent read: %v", err)
		return proto.Message{}
	}
	m, err := proto.Decode(p)
	if err != nil {
		f.t.Errorf("fake agent decode: %v", err)
	}
	return m
}

func (f *fakeAgent) send(t proto.Type, id uint64, errMsg string, body any) {
	p, err := proto.Encode(t, id, errMsg, body)
	if err != nil {
		f.t.Fatal(err)
	}
	f.raw(mustFrame(p))
}

func (f *fakeAgent) raw(b []byte) {
	if _, err := f.conn.Write(b); err != nil {
		f.t.Errorf("fake agent write: %v", err)
	}
}

func mustFrame(p []byte) []byte {
	b, err := proto.AppendFrame(nil, p)
	if err != nil {
		panic(err)
	}
	return b
}

// answerHello answers the first hello after sending stale and bogus frames.
func (f *fakeAgent) answerHello(version int) {
	m := f.next()
	var h proto.Hello
	proto.DecodeBody(m, &h)
	f.raw([]byte("stale bytes from a previous session"))
	oversize := binary.BigEndian.AppendUint32(nil, proto.Magic)
	oversize = binary.BigEndian.AppendUint32(oversize, proto.MaxFrameSize+10)
	f.raw(append(oversize, 0, 0, 0, 0))
	f.send(proto.TypeResponse, m.ID, "", proto.HelloResult{Version: proto.Version, Nonce: "someone else's nonce"})
	f.raw(mustFrame([]byte("not json")))
	f.send(proto.TypeResponse, m.ID, "", proto.HelloResult{Version: version, Nonce: h.Nonce})
}

// connectFake makes a client of conn, closed with the test, and a
// context that bounds the test's calls.
func connectFake(t *testing.T, conn net.Conn, bound time.Duration) (context.Context, *client.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	t.Cleanup(cancel)
	c, err := client.New(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return ctx, c
}

func TestMisbehavingAgent(t *testing.T) {
	f, conn := newFakeAgent(t)
	go func() {
		f.answerHello(proto.Version)
		ping := f.next()
		// Unknown ids, unknown types, a flood of output for an exec nobody
		// started (goes to Logs, which must stay bounded), bad bodies.
		f.send(proto.TypeResponse, 999999, "", nil)
		f.send("surprise", 0, "", nil)
		f.send(proto.TypeOutput, 0, "", proto.Output{ExecID: 0, Stream: proto.Stdout})
		f.send(proto.TypeOutput, 0, "", proto.Output{ExecID: 5, Stream: "weird"})
		f.send(proto.TypeExit, 0, "", "not an exit")
		flood, _ := proto.EncodeData(proto.TypeOutput, 0, "", proto.Output{ExecID: 77, Stream: proto.Stdout}, []byte("flood"))
		for range 5000 {
			f.raw(mustFrame(flood))
		}
		f.send(proto.TypeResponse, ping.ID, "", nil)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.New(ctx, conn, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer c.Close()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if n := len(c.Logs()); n > 256 {
		t.Errorf("%d log records buffered", n)
	}
	if c.LogsDropped() == 0 {
		t.Error("LogsDropped() = 0 after a flood")
	}
	if c.InvalidFrames() == 0 {
		t.Error("InvalidFrames() = 0 after invalid frames")
	}
}

func TestVersionMismatch(t *testing.T) {
	f, conn := newFakeAgent(t)
	go f.answerHello(proto.Version + 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := client.New(ctx, conn, nil); !errors.Is(err, client.ErrVersion) {
		t.Fatalf("New: %v, want ErrVersion", err)
	}
}

func TestTimeouts(t *testing.T) {
	tests := []struct {
		name string
		run  func(ctx context.Context, t *testing.T, conn net.Conn, f *fakeAgent) error
	}{
		{name: "silent agent at hello", run: func(ctx context.Context, t *testing.T, conn net.Conn, f *fakeAgent) error {
			go func() {
				for {
					if _, err := f.r.ReadFrame(); err != nil {
						return
					}
				}
			}()
			_, err := client.New(ctx, conn, nil)
			return err
		}},
		{name: "silent agent at ping", run: func(ctx context.Context, t *testing.T, conn net.Conn, f *fakeAgent) error {
			go func() {
				f.answerHello(proto.Version)
				for {
					if _, err := f.r.ReadFrame(); err != nil {
						return
					}
				}
			}()
			c, err := client.New(context.Background(), conn, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			return c.Ping(ctx)
		}},
		{name: "agent not reading", run: func(ctx context.Context, t *testing.T, conn net.Conn, f *fakeAgent) error {
			go f.answerHello(proto.Version)
			c, err := client.New(context.Background(), conn, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// net.Pipe is unbuffered: writes block once nobody reads.
			for {
				if err := c.Ping(ctx); err != nil {
					return err
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, conn := newFakeAgent(t)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			err := tt.run(ctx, t, conn, f)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err %v, want deadline exceeded", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}

func TestConnectionLoss(t *testing.T) {
	f, conn := newFakeAgent(t)
	go f.answerHello(proto.Version)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.New(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		m := f.next()
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 1, Pid: 10})
		f.conn.Close()
	}()
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(ctx); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Wait: %v, want ErrClosed", err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed")
	}
	if c.Err() == nil {
		t.Fatal("Err() = nil after loss")
	}
	if err := c.Ping(ctx); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Ping after loss: %v", err)
	}
	for range c.Logs() {
	}
}

// TestAgentProcessFramesChecked: an exec answer with an impossible pid is
// refused; an output chunk over proto.MaxChunk and an exit with an
// impossible status or signal are dropped as invalid, so the process
// still ends with its one honest exit.
func TestAgentProcessFramesChecked(t *testing.T) {
	f, conn := newFakeAgent(t)
	go func() {
		f.answerHello(proto.Version)
		m := f.next()
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 3, Pid: 1 << 23})
		m = f.next()
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 4, Pid: 42})
		big, _ := proto.EncodeData(proto.TypeOutput, 0, "", proto.Output{ExecID: 4, Stream: proto.Stdout}, make([]byte, proto.MaxChunk+1))
		f.raw(mustFrame(big))
		ok, _ := proto.EncodeData(proto.TypeOutput, 0, "", proto.Output{ExecID: 4, Stream: proto.Stdout}, []byte("fine"))
		f.raw(mustFrame(ok))
		f.send(proto.TypeExit, 0, "", proto.Exit{ExecID: 4, Code: 1 << 20})
		f.send(proto.TypeExit, 0, "", proto.Exit{ExecID: 4, Code: 137, Signal: 1000})
		f.send(proto.TypeExit, 0, "", proto.Exit{ExecID: 4, Code: 7})
	}()
	ctx, c := connectFake(t, conn, 10*time.Second)
	if _, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"x"}}); err == nil {
		t.Fatal("Exec accepted pid 2^23")
	}
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for o := range p.Output() {
		out = append(out, o.Data...)
	}
	code, err := p.Wait(ctx)
	if err != nil || code != 7 || string(out) != "fine" {
		t.Fatalf("exit %d %v, output %q; want 7 and only the honest chunk", code, err, out)
	}
	if n := c.InvalidFrames(); n < 3 {
		t.Fatalf("InvalidFrames() = %d, want at least 3", n)
	}
}

// TestOrphanOutputBounded: output for a workload of an earlier session,
// held until Adopt, costs the host what it carries. A hostile agent that
// sends empty chunks, or one-byte chunks in frames padded to 100 KiB,
// used to make the host keep every empty chunk and every whole frame.
func TestOrphanOutputBounded(t *testing.T) {
	f, conn := newFakeAgent(t)
	const empties, padded = 20000, 300
	pad := strings.Repeat("p", 100<<10)
	sent := make(chan struct{})
	go func() {
		f.answerHello(proto.Version)
		for range empties {
			b, _ := proto.EncodeData(proto.TypeOutput, 0, "", proto.Output{ExecID: 9, Stream: proto.Stdout}, nil)
			f.raw(mustFrame(b))
		}
		for range padded {
			b, _ := proto.EncodeData(proto.TypeOutput, 0, "", struct {
				proto.Output
				Pad string `json:"pad"`
			}{proto.Output{ExecID: 9, Stream: proto.Stdout}, pad}, []byte("x"))
			f.raw(mustFrame(b))
		}
		close(sent)
		m := f.next() // Adopt's probe
		f.send(proto.TypeResponse, m.ID, "", nil)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c, err := client.New(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-sent
	p, err := c.Adopt(ctx, 9, 1234)
	if err != nil {
		t.Fatal(err)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 4<<20 {
		t.Errorf("the host holds %d MiB more for %d bytes of orphan output", grew>>20, padded)
	}
	if n := c.InvalidFrames(); n < empties {
		t.Errorf("InvalidFrames() = %d, want the %d empty chunks", n, empties)
	}
	if got := len(p.Output()) + int(p.Dropped()); got != padded {
		t.Errorf("%d one-byte chunks kept or counted as dropped bytes, want %d", got, padded)
	}
	runtime.KeepAlive(p)
}

// TestOrphanExitsKept: after a resume, every workload envd may run (256)
// finds its exit status, although they all ended before any was adopted.
// 64 were kept before; the rest ended "lost".
func TestOrphanExitsKept(t *testing.T) {
	f, conn := newFakeAgent(t)
	const n = 256
	go func() {
		f.answerHello(proto.Version)
		for id := range n {
			f.send(proto.TypeExit, 0, "", proto.Exit{ExecID: uint64(id + 1), Code: id % 200})
		}
		m := f.next() // the ping: answered after every exit
		f.send(proto.TypeResponse, m.ID, "", nil)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.New(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	for id := range n {
		p, err := c.Adopt(ctx, uint64(id+1), 100+id)
		if err != nil {
			t.Fatalf("adopt %d: %v", id+1, err)
		}
		if code, err := p.Wait(ctx); err != nil || code != id%200 {
			t.Fatalf("exec %d: exit %d %v, want %d", id+1, code, err, id%200)
		}
	}
}

// TestDuplicateExecIDRefused: a guest that answers a second exec with
// the id of a running one gets an error for it; the first Process keeps
// its exit and ends (it would otherwise wait forever, and envd's process
// with it), and a duplicated answer to one exec does not register twice.
func TestDuplicateExecIDRefused(t *testing.T) {
	f, conn := newFakeAgent(t)
	go func() {
		f.answerHello(proto.Version)
		m := f.next()
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 7, Pid: 100})
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 8, Pid: 101}) // the same call again
		m = f.next()
		f.send(proto.TypeResponse, m.ID, "", proto.ExecResult{ExecID: 7, Pid: 102})
		f.send(proto.TypeExit, 0, "", proto.Exit{ExecID: 7, Code: 3})
	}()
	ctx, c := connectFake(t, conn, 10*time.Second)
	p1, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"a"}})
	if err != nil || p1.ID() != 7 {
		t.Fatalf("first exec: %v %v", p1, err)
	}
	if p2, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"b"}}); err == nil {
		t.Fatalf("a second process with exec id %d was taken", p2.ID())
	}
	select {
	case <-p1.Exited():
	case <-ctx.Done():
		t.Fatal("the first process never got its exit")
	}
}
