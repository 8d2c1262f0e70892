// Package qmp is a small client for QEMU's machine protocol over a unix
// socket. It handles the greeting, capability negotiation, one command at a
// time with its reply, and asynchronous events, which it fans out to
// subscribers. QEMU's replies are bounded in size like any other input:
// QEMU parses guest-controlled data, so it is not trusted blindly.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxLine bounds one QMP message; real replies are a few KiB.
const maxLine = 1 << 20

// Event is an asynchronous QMP event such as STOP, RESUME or MIGRATION.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// Error is an error reply from QEMU.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qmp %s: %s", e.Class, e.Desc) }

type message struct {
	Event  string          `json:"event"`
	Data   json.RawMessage `json:"data"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	QMP    json.RawMessage `json:"QMP"`
	ID     *uint64         `json:"id"`
}

// Conn is one QMP connection. Commands are serialized; events are delivered
// to every subscriber channel (dropped for a subscriber that is not
// reading, never blocking the reader).
type Conn struct {
	c net.Conn

	mu      sync.Mutex // serializes Execute
	nextID  uint64
	replies chan message

	subMu sync.Mutex
	subs  map[chan Event]struct{}

	done    chan struct{}
	readErr error
}

// Dial connects to the QMP socket at path, retrying until ctx ends (QEMU
// creates the socket a few milliseconds after it starts), and negotiates
// capabilities.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	var c net.Conn
	var err error
	// A short fixed retry: the socket appears ~20 ms after QEMU starts and
	// every millisecond of waiting here is start-up time of a clone.
	for delay := time.Millisecond; ; {
		c, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connecting to qmp socket %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(delay):
		}
	}
	q := &Conn{c: c, replies: make(chan message, 1), subs: map[chan Event]struct{}{}, done: make(chan struct{})}
	greeting := make(chan error, 1)
	go q.readLoop(greeting)
	select {
	case err := <-greeting:
		if err != nil {
			c.Close()
			return nil, err
		}
	case <-ctx.Done():
		c.Close()
		return nil, fmt.Errorf("waiting for qmp greeting: %w", ctx.Err())
	}
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("negotiating qmp capabilities: %w", err)
	}
	return q, nil
}

func (q *Conn) readLoop(greeting chan<- error) {
	defer close(q.done)
	r := bufio.NewReaderSize(q.c, 64<<10)
	first := true
	for {
		line, err := readLine(r)
		if err != nil {
			q.readErr = err
			if first {
				greeting <- fmt.Errorf("reading qmp greeting: %w", err)
			}
			return
		}
		var m message
		if err := json.Unmarshal(line, &m); err != nil {
			q.readErr = fmt.Errorf("malformed qmp message: %w", err)
			if first {
				greeting <- q.readErr
			}
			q.c.Close()
			return
		}
		switch {
		case first:
			first = false
			if m.QMP == nil {
				greeting <- errors.New("qmp greeting missing")
				q.c.Close()
				return
			}
			greeting <- nil
		case m.Event != "":
			q.publish(Event{Name: m.Event, Data: m.Data})
		default:
			// One command runs at a time: a reply that finds the slot
			// taken finds a late one there, from a command whose caller
			// timed out, and takes its place.
			select {
			case q.replies <- m:
			default:
				select {
				case <-q.replies:
				default:
				}
				select {
				case q.replies <- m:
				default:
				}
			}
		}
	}
}

// readLine reads one newline-terminated message of at most maxLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > maxLine {
			return nil, fmt.Errorf("qmp message longer than %d bytes", maxLine)
		}
		if err == nil {
			return buf, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

func (q *Conn) publish(e Event) {
	q.subMu.Lock()
	defer q.subMu.Unlock()
	for ch := range q.subs {
		select {
		case ch <- e:
		default:
		}
	}
}

// Subscribe returns a channel of events and a function that ends the
// subscription. Subscribe before issuing the command whose event you await.
func (q *Conn) Subscribe() (<-chan Event, func()) {
	ch := make(chan Event, 64)
	q.subMu.Lock()
	q.subs[ch] = struct{}{}
	q.subMu.Unlock()
	return ch, func() {
		q.subMu.Lock()
		delete(q.subs, ch)
		q.subMu.Unlock()
	}
}

// Execute runs one command and decodes its "return" into out (if non-nil).
func (q *Conn) Execute(ctx context.Context, cmd string, args any, out any) error {
	return q.execute(ctx, cmd, args, out, nil)
}

// SendFD hands f to QEMU under name (QMP getfd), for URIs such as
// "fd:name": QEMU then needs no access to the file's path, which lets it
// run unprivileged. QEMU keeps its own copy; the caller still closes f.
func (q *Conn) SendFD(ctx context.Context, name string, f *os.File) error {
	return q.execute(ctx, "getfd", map[string]any{"fdname": name}, nil, f)
}

// AddFD puts f into a new file descriptor set and returns its id; QEMU
// opens it as "/dev/fdset/ID" wherever it takes a file name. Remove the
// set with RemoveFDSet once QEMU is done with it.
func (q *Conn) AddFD(ctx context.Context, f *os.File) (int, error) {
	var out struct {
		FDSet int `json:"fdset-id"`
	}
	if err := q.execute(ctx, "add-fd", map[string]any{}, &out, f); err != nil {
		return 0, err
	}
	return out.FDSet, nil
}

// RemoveFDSet drops a descriptor set; QEMU closes its descriptors once
// unused.
func (q *Conn) RemoveFDSet(ctx context.Context, fdset int) error {
	return q.Execute(ctx, "remove-fd", map[string]any{"fdset-id": fdset}, nil)
}

func (q *Conn) execute(ctx context.Context, cmd string, args any, out any, fd *os.File) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.nextID++
	id := q.nextID
	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	// A reply still waiting here answers an abandoned command.
	select {
	case <-q.replies:
	default:
	}
	if dl, ok := ctx.Deadline(); ok {
		q.c.SetWriteDeadline(dl)
	} else {
		q.c.SetWriteDeadline(time.Time{})
	}
	if fd == nil {
		_, err = q.c.Write(append(b, '\n'))
	} else if uc, ok := q.c.(*net.UnixConn); ok {
		_, _, err = uc.WriteMsgUnix(append(b, '\n'), unix.UnixRights(int(fd.Fd())), nil)
	} else {
		err = errors.New("passing a file needs a unix socket")
	}
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		select {
		case m := <-q.replies:
			if m.ID == nil || *m.ID != id {
				continue // a late reply to an abandoned command
			}
			if m.Error != nil {
				return fmt.Errorf("qmp %s: %w", cmd, m.Error)
			}
			if out != nil && m.Return != nil {
				if err := json.Unmarshal(m.Return, out); err != nil {
					return fmt.Errorf("qmp %s: decoding reply: %w", cmd, err)
				}
			}
			return nil
		case <-q.done:
			return fmt.Errorf("qmp %s: connection closed: %v", cmd, q.readErr)
		case <-ctx.Done():
			return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
		}
	}
}

// Done is closed when the connection ends (QEMU exited or closed it).
func (q *Conn) Done() <-chan struct{} { return q.done }

// Close closes the connection.
func (q *Conn) Close() error { return q.c.Close() }
