//go:build linux

package guest

import (
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// outbox holds everything the agent wants to send, independent of whether a
// host is connected. Control messages (responses, exits) are never dropped;
// workload output is kept per workload up to a byte bound, dropping the
// oldest chunks first, so a slow or absent host never blocks a workload.
type outbox struct {
	mu        sync.Mutex
	ctrl      []outMsg
	streams   []*outStream // round-robin order
	next      int
	wake      chan struct{}
	maxStream int
}

type outMsg struct {
	payload []byte
	sent    chan struct{} // closed once written (or dropped), may be nil
}

type outStream struct {
	execID     uint64
	background bool
	chunks     []proto.Output
	bytes      int
	dropped    map[proto.Stream]uint64
	exit       *proto.Exit
	exitSent   bool
	closed     bool // no more output will come
}

func newOutbox(maxStream int) *outbox {
	return &outbox{wake: make(chan struct{}, 1), maxStream: maxStream}
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// sendCtrl queues a control message; the returned channel is closed when it
// has been written to the transport or purged.
func (o *outbox) sendCtrl(payload []byte) <-chan struct{} {
	ch := make(chan struct{})
	o.mu.Lock()
	o.ctrl = append(o.ctrl, outMsg{payload: payload, sent: ch})
	o.mu.Unlock()
	o.signal()
	return ch
}

// purgeCtrl drops queued control messages: they answer requests of a host
// session that is gone.
func (o *outbox) purgeCtrl() {
	o.mu.Lock()
	for _, m := range o.ctrl {
		if m.sent != nil {
			close(m.sent)
		}
	}
	o.ctrl = nil
	o.mu.Unlock()
}

// stream registers a workload's output stream.
func (o *outbox) stream(execID uint64, background bool) *outStream {
	s := &outStream{execID: execID, background: background, dropped: map[proto.Stream]uint64{}}
	o.mu.Lock()
	o.streams = append(o.streams, s)
	o.mu.Unlock()
	return s
}

// output queues a chunk of a workload's output.
func (o *outbox) output(s *outStream, stream proto.Stream, data []byte) {
	o.mu.Lock()
	s.chunks = append(s.chunks, proto.Output{ExecID: s.execID, Stream: stream, Data: data, Time: time.Now(), Background: s.background})
	s.bytes += len(data)
	for s.bytes > o.maxStream && len(s.chunks) > 1 {
		old := s.chunks[0]
		s.chunks[0] = proto.Output{}
		s.chunks = s.chunks[1:]
		s.bytes -= len(old.Data)
		s.dropped[old.Stream] += uint64(len(old.Data)) + old.Dropped
	}
	o.mu.Unlock()
	o.signal()
}

// exit queues a workload's exit; it is sent after the workload's last output.
func (o *outbox) exit(s *outStream, e proto.Exit) {
	o.mu.Lock()
	s.exit = &e
	o.mu.Unlock()
	o.signal()
}

// close marks that a stream gets no more output.
func (o *outbox) close(s *outStream) {
	o.mu.Lock()
	s.closed = true
	o.mu.Unlock()
	o.signal()
}

// pop returns the next message to write, or ok=false when there is none.
func (o *outbox) pop() (m outMsg, ok bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.ctrl) > 0 {
		m = o.ctrl[0]
		o.ctrl[0] = outMsg{}
		o.ctrl = o.ctrl[1:]
		return m, true
	}
	for visited := 0; visited < len(o.streams); {
		if o.next >= len(o.streams) {
			o.next = 0
		}
		s := o.streams[o.next]
		if len(s.chunks) > 0 {
			c := s.chunks[0]
			s.chunks[0] = proto.Output{}
			s.chunks = s.chunks[1:]
			s.bytes -= len(c.Data)
			c.Dropped += s.dropped[c.Stream]
			delete(s.dropped, c.Stream)
			o.next++
			p, err := proto.EncodeData(proto.TypeOutput, 0, "", c, c.Data)
			if err != nil {
				continue
			}
			return outMsg{payload: p}, true
		}
		if s.exit != nil && s.exitSent && s.closed {
			// Drained, ended and reported: forget the stream.
			o.streams = append(o.streams[:o.next], o.streams[o.next+1:]...)
			continue
		}
		if s.exit != nil && !s.exitSent {
			s.exitSent = true
			o.next++
			p, err := proto.Encode(proto.TypeExit, 0, "", s.exit)
			if err != nil {
				continue
			}
			return outMsg{payload: p}, true
		}
		o.next++
		visited++
	}
	return outMsg{}, false
}
