package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The endpoint serves HTTP/2 (ALPN h2) on its own connection loop
// (h2Conn) instead of net/http's server, which sends every answer as a
// HEADERS and a DATA frame through its serve goroutine and flushes from
// yet another: on 2 busy cores those hand-offs made most of the gap to
// nginx (`kiln bench proxy`, h2). Here one goroutine reads the
// connection; each stream's handler (the same Server.ServeHTTP as every
// other request: token check before any wake, header stripping) writes
// its own frames, a small answer's HEADERS and DATA in one go, and the
// last of the writers waiting for the connection flushes for all of them.
//
// Not supported, refused with a clear answer: extended CONNECT (RFC 8441,
// WebSocket over h2; the SETTING is not offered, so browsers use
// HTTP/1.1), plain CONNECT, server push.

const (
	h2MaxStreams = 250
	// h2StreamWindow and h2ConnWindow bound what a client may send ahead
	// of the handlers' reads: all a connection can make the proxy buffer.
	h2StreamWindow = 256 << 10
	h2ConnWindow   = 1 << 20
	h2MaxFrame     = 16 << 10 // the default; the loop offers no more
	// h2MaxContinuations bounds the CONTINUATION frames of one header
	// block: empty ones carry no bytes, so the size bound never ends a
	// flood of them.
	h2MaxContinuations = 64
	// h2ResetBudget is how many running streams a client may reset per
	// second (rapid reset, CVE-2023-44487) before the connection ends.
	h2ResetBudget = 200
	// h2WriteTimeout bounds one flush and a wait for the client's flow
	// window: a client that stops reading frees its streams' guests.
	h2WriteTimeout = 60 * time.Second
	h2ReadBufSize  = 16 << 10
	h2WriteBufSize = 32 << 10
)

// Read deadline states of an h2Conn.
const (
	rdUnset = iota
	rdIdle
	rdBusy
)

var (
	errH2StreamReset = errors.New("http2: the stream was reset")
	errH2ConnClosed  = errors.New("http2: client connection closed")
	errH2FlowTimeout = errors.New("http2: client granted no flow-control window in time")
	errH2ShortBody   = errors.New("http2: the handler wrote less than its Content-Length")
)

// h2Conn is one client connection on the own HTTP/2 loop.
type h2Conn struct {
	hs     *h1Serve
	conn   net.Conn // TLS
	state  *tls.ConnectionState
	remote string
	// remoteIP is remote's address, for the direct path's X-Forwarded-For.
	remoteIP string
	fr       *http2.Framer
	wg       sync.WaitGroup

	// Writing: wmu guards the framer's writes, bw and henc; wwait counts
	// writers holding or waiting for wmu, so only the last one flushes.
	wmu   sync.Mutex
	wwait atomic.Int32
	bw    *bufio.Writer
	henc  *hpack.Encoder
	hbuf  bytes.Buffer
	werr  error

	// mu guards the streams and both directions' flow control; cond wakes
	// writers waiting for window.
	mu            sync.Mutex
	cond          sync.Cond
	streams       map[uint32]*h2Stream
	sendWin       int64 // connection send window
	peerInitWin   int64
	peerMaxFrame  int
	recvWin       int64 // what the client may still send on the connection
	recvCredit    int64 // read by handlers, not yet given back
	goingAway     bool
	closed        bool
	resets        int
	resetWindowAt time.Time
	rdState       int // the read deadline the reader set last: rdUnset, rdIdle, rdBusy
	// tw is bw's writer, which pushes the write deadline on (under wmu).
	tw timedWriter

	// toGeneral is directRoute's memo of a host and port for the general path.
	toGeneral atomic.Pointer[generalMemo]

	// Reader only (one goroutine at a time reads).
	hdec *hpack.Decoder
	// The header block being decoded (emitField, readHeaderBlock).
	hfields     []hpack.HeaderField
	hsize       int
	htooBig     bool
	maxStreamID uint32
	sawSettings bool
}

// h2Stream is one request. Fields after mu-marked ones are under c.mu.
type h2Stream struct {
	c    *h2Conn
	id   uint32
	ctx  context.Context
	rc   reqCancel
	body *h2Body // nil: the request had none
	req  *http.Request
	// head, if not nil, is a plain request for the direct path, bodyless
	// or with a small declared body (req is nil until run makes it of
	// fields, if that does not take it).
	head   *reqHead
	fields []hpack.HeaderField
	// headv and headFields hold head and its fields, in the stream's own
	// allocation.
	headv      reqHead
	headFields [8]hfield

	// under c.mu
	sendWin      int64
	recvWin      int64
	recvCredit   int64
	remoteClosed bool
	reset        bool
}

func (hs *h1Serve) serveH2(raw net.Conn, tc *tls.Conn, st *tls.ConnectionState) {
	c := newH2Conn(hs, tc, st, raw.RemoteAddr().String())
	hs.mu.Lock()
	if hs.h2 == nil {
		hs.h2 = map[net.Conn]*h2Conn{}
	}
	hs.h2[raw] = c
	closing := hs.closing.Load()
	hs.mu.Unlock()
	if closing {
		c.shutdown()
	}
	c.serve()
	hs.mu.Lock()
	delete(hs.h2, raw)
	hs.mu.Unlock()
}

func newH2Conn(hs *h1Serve, conn net.Conn, st *tls.ConnectionState, remote string) *h2Conn {
	c := &h2Conn{hs: hs, conn: conn, state: st, remote: remote, streams: map[uint32]*h2Stream{},
		sendWin: 65535, peerInitWin: 65535, peerMaxFrame: h2MaxFrame, recvWin: 65535}
	c.cond.L = &c.mu
	if ip, _, err := net.SplitHostPort(remote); err == nil {
		c.remoteIP = ip
	}
	// Through tw: fn's writes reach the socket themselves once they are
	// more than bw holds, and after a quiet minute the last deadline has
	// passed.
	c.tw = timedWriter{conn: conn, timeout: h2WriteTimeout}
	c.bw = bufio.NewWriterSize(&c.tw, h2WriteBufSize)
	c.fr = http2.NewFramer(c.bw, bufio.NewReaderSize(conn, h2ReadBufSize))
	c.fr.SetMaxReadFrameSize(h2MaxFrame)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.hdec = hpack.NewDecoder(4096, c.emitField)
	c.hdec.SetMaxStringLength(maxHeaderBytes)
	return c
}

// h2ConnError ends the connection with a GOAWAY of its code.
type h2ConnError struct {
	code http2.ErrCode
	why  string
}

func (e h2ConnError) Error() string { return "http2: " + e.code.String() + ": " + e.why }

// serve reads frames until the client leaves, a protocol error or the
// end of a shutdown; then it waits for the handlers.
func (c *h2Conn) serve() {
	defer c.teardown()
	c.conn.SetReadDeadline(time.Now().Add(readHeaderTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.conn, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		return
	}
	c.write(func() error {
		if err := c.fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderBytes},
		); err != nil {
			return err
		}
		return c.fr.WriteWindowUpdate(0, h2ConnWindow-65535)
	})
	c.mu.Lock()
	c.recvWin = h2ConnWindow
	c.mu.Unlock()
	c.readLoop()
}

// readLoop reads frames until the connection ends.
func (c *h2Conn) readLoop() {
	for {
		// Under c.mu: shutdown and endStream set a past deadline under it
		// once the connection is to end, and it must not be overwritten.
		c.mu.Lock()
		idle := len(c.streams) == 0
		if idle && c.goingAway {
			c.mu.Unlock()
			return
		}
		switch {
		case !c.sawSettings:
			// The client's SETTINGS comes at once after the preface.
		case idle && c.rdState != rdIdle:
			// From the last stream's end: frames without a stream (PING)
			// do not keep a connection.
			c.conn.SetReadDeadline(time.Now().Add(idleTimeout))
			c.rdState = rdIdle
		case !idle && c.rdState != rdBusy:
			// Running handlers bound their own waits (body reads, the
			// guest's answer); the connection may be quiet meanwhile.
			c.conn.SetReadDeadline(time.Time{})
			c.rdState = rdBusy
		}
		c.mu.Unlock()
		f, err := c.fr.ReadFrame()
		if err == nil && !c.sawSettings {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				err = h2ConnError{http2.ErrCodeProtocol, "the client preface has no SETTINGS"}
			}
			c.sawSettings = true
		}
		if err == nil {
			err = c.process(f)
		}
		if err != nil {
			// se only here: declared for every frame, it escaped to the
			// heap for every frame.
			var se http2.StreamError
			if !errors.As(err, &se) {
				c.goAway(err)
				return
			}
			c.resetStream(se.StreamID, se.Code)
		}
	}
}

// teardown ends the connection once reading has: every stream's context
// and body, then the handlers.
func (c *h2Conn) teardown() {
	c.mu.Lock()
	c.closed = true
	for _, st := range c.streams {
		st.reset = true
		st.rc.cancel()
		if st.body != nil {
			st.body.fail(errH2ConnClosed)
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	c.conn.Close()
	c.wg.Wait()
}

// goAway answers a connection error with GOAWAY; a client that just left
// gets nothing.
func (c *h2Conn) goAway(err error) {
	var code http2.ErrCode
	var ce h2ConnError
	var fce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		code = ce.code
	case errors.As(err, &fce):
		code = http2.ErrCode(fce)
	case errors.Is(err, http2.ErrFrameTooLarge):
		code = http2.ErrCodeFrameSize
	default:
		return
	}
	c.hs.s.log.Debug("proxy: http2 protocol error", "remote", c.remote, "err", err)
	// Flushed here, not by a writer still in line: the connection closes
	// right after.
	c.wmu.Lock()
	if c.werr == nil && c.fr.WriteGoAway(c.maxStreamID, code, []byte(err.Error())) == nil {
		c.tw.own(time.Now().Add(time.Second))
		c.bw.Flush()
	}
	c.wmu.Unlock()
	// Closing with the client's frames unread would reset the connection,
	// and a reset may destroy the GOAWAY before the client reads it: read
	// on for a moment.
	c.conn.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, c.conn)
}

// shutdown: no new streams (GOAWAY), the connection ends when the last
// handler does.
func (c *h2Conn) shutdown() {
	c.mu.Lock()
	already := c.goingAway
	c.goingAway = true
	c.mu.Unlock()
	if !already {
		c.write(func() error { return c.fr.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil) })
	}
	c.mu.Lock()
	if len(c.streams) == 0 {
		c.conn.SetReadDeadline(aLongTimeAgo) // the reader ends the connection
	}
	c.mu.Unlock()
}

// write runs fn (frame writes) under the write lock; the last writer in
// line flushes, so answers of concurrent streams share TLS records and
// syscalls. A write error ends the connection. (Tried: letting the other
// goroutines run once before a flush while other streams are open, to
// batch more, as nginx's event loop does; the bench's h2 throughput
// halved in two runs of two.)
func (c *h2Conn) write(fn func() error) error {
	c.wwait.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		c.wwait.Add(-1)
		return c.werr
	}
	err := fn()
	if c.wwait.Add(-1) == 0 && err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		c.werr = err
		c.conn.Close()
	}
	return err
}

func (c *h2Conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		c.dropLocked(st)
	}
	c.mu.Unlock()
	c.write(func() error { return c.fr.WriteRSTStream(id, code) })
}

// dropLocked ends st's request: its context, its body and its window
// waits. The handler still runs until it notices.
func (c *h2Conn) dropLocked(st *h2Stream) {
	st.reset = true
	st.remoteClosed = true
	st.rc.cancel()
	if st.body != nil {
		st.body.fail(errH2StreamReset)
	}
	c.cond.Broadcast()
}

func (c *h2Conn) process(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.processSettings(f)
	case *http2.HeadersFrame:
		return c.processHeaders(f)
	case *http2.DataFrame:
		return c.processData(f)
	case *http2.WindowUpdateFrame:
		return c.processWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		data := f.Data
		return c.write(func() error { return c.fr.WritePing(true, data) })
	case *http2.RSTStreamFrame:
		return c.processReset(f)
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goingAway = true
		c.mu.Unlock()
		return nil
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
		}
		return nil
	case *http2.PushPromiseFrame:
		return h2ConnError{http2.ErrCodeProtocol, "a client sent PUSH_PROMISE"}
	case *http2.ContinuationFrame:
		return h2ConnError{http2.ErrCodeProtocol, "CONTINUATION without HEADERS"}
	}
	return nil // unknown frame types are ignored (RFC 9113 5.5)
}

func (c *h2Conn) processSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			c.mu.Lock()
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > 1<<31-1 {
					c.mu.Unlock()
					return h2ConnError{http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		case http2.SettingMaxFrameSize:
			c.mu.Lock()
			c.peerMaxFrame = int(min(s.Val, 1<<20)) // bigger frames buy nothing
			c.mu.Unlock()
		case http2.SettingHeaderTableSize:
			c.wmu.Lock()
			c.henc.SetMaxDynamicTableSizeLimit(min(s.Val, 4096))
			c.wmu.Unlock()
		}
		return nil
	}); err != nil {
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			return err
		}
		if _, ok := err.(h2ConnError); ok {
			return err
		}
		return h2ConnError{http2.ErrCodeProtocol, err.Error()}
	}
	return c.write(func() error { return c.fr.WriteSettingsAck() })
}

func (c *h2Conn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		if c.sendWin+inc > 1<<31-1 {
			return h2ConnError{http2.ErrCodeFlowControl, "connection window over 2^31-1"}
		}
		c.sendWin += inc
		c.cond.Broadcast()
		return nil
	}
	if f.StreamID > c.maxStreamID {
		return h2ConnError{http2.ErrCodeProtocol, "WINDOW_UPDATE on an idle stream"}
	}
	st := c.streams[f.StreamID]
	if st == nil || st.reset {
		return nil
	}
	if st.sendWin+inc > 1<<31-1 {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.sendWin += inc
	c.cond.Broadcast()
	return nil
}

func (c *h2Conn) processReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID > c.maxStreamID {
		return h2ConnError{http2.ErrCodeProtocol, "RST_STREAM on an idle stream"}
	}
	st := c.streams[f.StreamID]
	if st == nil || st.reset {
		return nil
	}
	c.dropLocked(st)
	// A reset stream whose handler still runs cost the proxy a goroutine
	// and maybe a guest request for nothing.
	now := time.Now()
	if now.Sub(c.resetWindowAt) > time.Second {
		c.resetWindowAt, c.resets = now, 0
	}
	if c.resets++; c.resets > h2ResetBudget {
		return h2ConnError{http2.ErrCodeEnhanceYourCalm, "too many streams reset"}
	}
	return nil
}

func (c *h2Conn) processData(f *http2.DataFrame) error {
	id := f.StreamID
	n := int64(f.Length) // padding counts against the windows too
	data := f.Data()
	c.mu.Lock()
	if n > c.recvWin {
		c.mu.Unlock()
		return h2ConnError{http2.ErrCodeFlowControl, "DATA beyond the connection window"}
	}
	c.recvWin -= n
	st := c.streams[id]
	if st == nil || st.remoteClosed {
		c.mu.Unlock()
		if id > c.maxStreamID {
			return h2ConnError{http2.ErrCodeProtocol, "DATA on an idle stream"}
		}
		// A stream the proxy already ended: the bytes only cost window.
		c.credit(nil, n)
		if st != nil && !st.reset {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		}
		return nil
	}
	if n > st.recvWin {
		c.mu.Unlock()
		c.credit(nil, n)
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	st.recvWin -= n
	end := f.StreamEnded()
	if end {
		st.remoteClosed = true
	}
	c.mu.Unlock()
	if pad := n - int64(len(data)); pad > 0 {
		c.credit(st, pad)
	}
	if st.body == nil {
		c.credit(nil, int64(len(data)))
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if err := st.body.put(data, end); err != nil {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: err}
	}
	return nil
}

// credit gives n bytes of window back to the client, for st (nil: the
// connection only), in updates of a quarter window at least.
func (c *h2Conn) credit(st *h2Stream, n int64) {
	if n <= 0 {
		return
	}
	var connInc, streamInc int64
	c.mu.Lock()
	c.recvCredit += n
	if c.recvCredit >= h2ConnWindow/4 {
		connInc, c.recvCredit = c.recvCredit, 0
		c.recvWin += connInc
	}
	if st != nil && !st.remoteClosed {
		st.recvCredit += n
		if st.recvCredit >= h2StreamWindow/4 {
			streamInc, st.recvCredit = st.recvCredit, 0
			st.recvWin += streamInc
		}
	}
	closed := c.closed
	c.mu.Unlock()
	if closed || connInc == 0 && streamInc == 0 {
		return
	}
	c.write(func() error {
		if connInc > 0 {
			if err := c.fr.WriteWindowUpdate(0, uint32(connInc)); err != nil {
				return err
			}
		}
		if streamInc > 0 {
			return c.fr.WriteWindowUpdate(st.id, uint32(streamInc))
		}
		return nil
	})
}

// readHeaderBlock decodes a HEADERS frame and its CONTINUATIONs into
// fields, bounded by maxHeaderBytes (decoded, as SETTINGS says, and twice
// that on the wire) and h2MaxContinuations frames. The decoder always
// sees the whole block: its table is the connection's.
func (c *h2Conn) readHeaderBlock(f *http2.HeadersFrame) ([]hpack.HeaderField, error) {
	c.hfields, c.hsize, c.htooBig = c.hfields[:0], 0, false
	wire := 0
	frag := f.HeaderBlockFragment()
	ended := f.HeadersEnded()
	if !ended {
		c.mu.Lock()
		c.conn.SetReadDeadline(time.Now().Add(readHeaderTimeout))
		c.rdState = rdUnset
		c.mu.Unlock()
	}
	for n := 0; ; n++ {
		if wire += len(frag); wire > 2*maxHeaderBytes {
			return nil, h2ConnError{http2.ErrCodeProtocol, "header block over the size limit"}
		}
		if _, err := c.hdec.Write(frag); err != nil {
			return nil, h2ConnError{http2.ErrCodeCompression, err.Error()}
		}
		if ended {
			break
		}
		if n >= h2MaxContinuations {
			return nil, h2ConnError{http2.ErrCodeEnhanceYourCalm, "too many CONTINUATION frames"}
		}
		next, err := c.fr.ReadFrame()
		if err != nil {
			return nil, err
		}
		cf, ok := next.(*http2.ContinuationFrame)
		if !ok {
			return nil, h2ConnError{http2.ErrCodeProtocol, "a header block was interrupted"}
		}
		frag, ended = cf.HeaderBlockFragment(), cf.HeadersEnded()
	}
	if err := c.hdec.Close(); err != nil {
		return nil, h2ConnError{http2.ErrCodeCompression, err.Error()}
	}
	if c.htooBig {
		clear(c.hfields)
		return nil, http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeRefusedStream, Cause: errHeaderTooLarge}
	}
	// The stream keeps its own: one allocation of the block's size, where
	// appending to a new slice took four or five.
	fields := slices.Clone(c.hfields)
	clear(c.hfields) // holds no strings of the block
	return fields, nil
}

// emitField takes a decoded field of the header block being read.
func (c *h2Conn) emitField(hf hpack.HeaderField) {
	c.hsize += int(hf.Size())
	if c.hsize > maxHeaderBytes {
		c.htooBig = true
		return
	}
	if !c.htooBig {
		c.hfields = append(c.hfields, hf)
	}
}

func (c *h2Conn) processHeaders(f *http2.HeadersFrame) error {
	id := f.StreamID
	end := f.StreamEnded()
	fields, err := c.readHeaderBlock(f)
	if err != nil {
		return err
	}
	if id%2 == 0 {
		return h2ConnError{http2.ErrCodeProtocol, "a client stream with an even id"}
	}
	if id <= c.maxStreamID {
		return c.processTrailers(id, fields, end)
	}
	c.maxStreamID = id
	c.mu.Lock()
	refuse := c.goingAway || len(c.streams) >= h2MaxStreams
	c.mu.Unlock()
	if refuse {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream}
	}
	st := &h2Stream{c: c, id: id}
	var req *http.Request
	var declared int64
	if c.hs.direct != nil && st.headv.fromH2(fields, c.state != nil, end, st.headFields[:0]) {
		// Maybe for the direct path (direct.go); run decides.
		st.head, st.fields, declared = &st.headv, fields, int64(st.headv.cl)
	} else {
		var err error
		if req, declared, err = c.newRequest(fields, end); err != nil {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: err}
		}
	}
	// Not a child of a connection context: teardown cancels every stream
	// itself, and a child costs a registration in the parent per request.
	st.ctx = st.rc.context()
	if !end {
		st.body = &h2Body{st: st, declared: declared}
		st.body.cond.L = &st.body.mu
		if req != nil {
			req.Body = st.body
		}
	}
	if req != nil {
		st.req = req.WithContext(st.ctx)
	}
	c.mu.Lock()
	st.sendWin = c.peerInitWin
	st.recvWin = h2StreamWindow
	st.remoteClosed = end
	c.streams[id] = st
	c.mu.Unlock()
	c.wg.Add(1)
	// Tried: running the handler on this goroutine and reading on in a
	// new one; no gain in `kiln bench proxy` latency, a loss in throughput.
	// Tried: for a client that had sent 4 requests one at a time, running
	// a body-less request's handler on this goroutine, with a timer that
	// hands reading to a new goroutine after 1 ms; the bench's h2 p50
	// moved by less than it differs between two identical proxies (about
	// 30 µs), and a reader that waits on a handler delays other streams.
	go c.run(st)
	return nil
}

// processTrailers takes a request's trailers (a HEADERS that ends the
// stream); those of a stream the proxy already ended are dropped.
func (c *h2Conn) processTrailers(id uint32, fields []hpack.HeaderField, end bool) error {
	c.mu.Lock()
	st := c.streams[id]
	live := st != nil && !st.remoteClosed
	if live && end {
		st.remoteClosed = true
	}
	c.mu.Unlock()
	if !live {
		return nil
	}
	if !end {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: errors.New("trailers without END_STREAM")}
	}
	tr := http.Header{}
	for _, hf := range fields {
		if strings.HasPrefix(hf.Name, ":") {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: errors.New("pseudo-header in trailers")}
		}
		tr.Add(hf.Name, hf.Value)
	}
	return st.body.putTrailers(tr)
}

// h2Forbidden are the connection-specific fields RFC 9113 8.2.2 makes a
// request malformed with.
var h2Forbidden = map[string]bool{"connection": true, "keep-alive": true, "proxy-connection": true,
	"transfer-encoding": true, "upgrade": true}

// newRequest builds the request of a header block; an error makes the
// stream malformed (RST_STREAM PROTOCOL_ERROR).
func (c *h2Conn) newRequest(fields []hpack.HeaderField, end bool) (*http.Request, int64, error) {
	var method, scheme, authority, path, protocol string
	var seen [5]bool
	h := make(http.Header, len(fields))
	var cookies []string
	regular := false
	for _, hf := range fields {
		if strings.HasPrefix(hf.Name, ":") {
			if regular {
				return nil, 0, errors.New("pseudo-header after a regular one")
			}
			var i int
			var dst *string
			switch hf.Name {
			case ":method":
				i, dst = 0, &method
			case ":scheme":
				i, dst = 1, &scheme
			case ":authority":
				i, dst = 2, &authority
			case ":path":
				i, dst = 3, &path
			case ":protocol":
				i, dst = 4, &protocol
			default:
				return nil, 0, fmt.Errorf("unknown pseudo-header %q", hf.Name)
			}
			if seen[i] {
				return nil, 0, fmt.Errorf("repeated %s", hf.Name)
			}
			seen[i], *dst = true, hf.Value
			continue
		}
		regular = true
		if !validH2FieldName(hf.Name) || !httpguts.ValidHeaderFieldValue(hf.Value) {
			return nil, 0, errors.New("invalid header field")
		}
		if h2Forbidden[hf.Name] || hf.Name == "te" && hf.Value != "trailers" {
			return nil, 0, fmt.Errorf("connection-specific header %q", hf.Name)
		}
		if hf.Name == "cookie" {
			cookies = append(cookies, hf.Value) // RFC 9113 8.2.3: one field again
			continue
		}
		k := canonicalH2Key(hf.Name)
		h[k] = append(h[k], hf.Value)
	}
	if len(cookies) > 0 {
		h["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	if protocol != "" {
		return nil, 0, errors.New("extended CONNECT is not offered")
	}
	if method == "" || !validMethod(method) {
		return nil, 0, errors.New("missing or invalid :method")
	}
	if method != http.MethodConnect && (scheme == "" || path == "") {
		return nil, 0, errors.New("missing :scheme or :path")
	}
	if authority == "" {
		authority = h.Get("Host")
	}
	delete(h, "Host")
	var u *url.URL
	var err error
	switch {
	case method == http.MethodConnect:
		u = &url.URL{Host: authority}
		path = authority
	case path == "*" && method == http.MethodOptions:
		u = &url.URL{Path: "*"}
	default:
		if path[0] != '/' {
			return nil, 0, errors.New(":path must start with /")
		}
		if u, err = url.ParseRequestURI(path); err != nil {
			return nil, 0, errors.New("invalid :path")
		}
	}
	declared := int64(-1)
	if vv := h["Content-Length"]; len(vv) > 0 {
		for _, v := range vv[1:] {
			if v != vv[0] {
				return nil, 0, errors.New("conflicting content-length")
			}
		}
		n, err := strconv.ParseUint(vv[0], 10, 63)
		if err != nil {
			return nil, 0, errors.New("invalid content-length")
		}
		declared = int64(n)
		h["Content-Length"] = vv[:1]
	}
	r := &http.Request{Method: method, URL: u, Proto: "HTTP/2.0", ProtoMajor: 2, Header: h, Host: authority,
		RequestURI: path, RemoteAddr: c.remote, TLS: c.state, Body: http.NoBody}
	switch {
	case end:
		if declared > 0 {
			return nil, 0, errors.New("content-length without a body")
		}
		r.ContentLength = 0
	default:
		r.ContentLength = declared
		if declared == 0 {
			// ReverseProxy and the fast path take a length of 0 as "no
			// body", as net/http's h2 server does; the stream must still
			// end with no DATA bytes.
			r.ContentLength = 0
		}
	}
	for _, v := range h["Trailer"] {
		for _, k := range splitProtocols([]string{v}) {
			if r.Trailer == nil {
				r.Trailer = http.Header{}
			}
			r.Trailer[http.CanonicalHeaderKey(k)] = nil
		}
	}
	return r, declared, nil
}

func validMethod(m string) bool {
	for _, c := range []byte(m) {
		if !httpguts.IsTokenRune(rune(c)) {
			return false
		}
	}
	return m != ""
}

// validH2FieldName: a token in lower case (RFC 9113 8.2.1).
func validH2FieldName(k string) bool {
	if !httpguts.ValidHeaderFieldName(k) {
		return false
	}
	for _, c := range []byte(k) {
		if 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// h2Canonical and h2Lower spare the common names an allocation per
// request each way.
var h2Canonical, h2Lower = func() (map[string]string, map[string]string) {
	can, low := map[string]string{}, map[string]string{}
	for _, k := range []string{"Accept", "Accept-Encoding", "Accept-Language", "Authorization", "Cache-Control",
		"Content-Length", "Content-Type", "Date", "Etag", "Host", "Last-Modified", "Origin", "Referer",
		"User-Agent", "Server", "Vary", "Location", "Set-Cookie", "Content-Encoding", "Grpc-Status",
		"Grpc-Message", "Te", "Trailer", "X-Content-Type-Options", "X-Forwarded-For", "X-Forwarded-Host",
		"X-Forwarded-Proto", HeaderAuth, HeaderPort, HeaderForceH2, "Sec-Websocket-Protocol", "Accept-Ranges",
		"Access-Control-Allow-Origin", "Retry-After", "Cookie", "Referrer-Policy", "If-None-Match",
		"If-Modified-Since", "Range", "Content-Range", "Expires", "Pragma", "Connection", "Keep-Alive"} {
		k = http.CanonicalHeaderKey(k)
		can[strings.ToLower(k)] = k
		low[k] = strings.ToLower(k)
	}
	return can, low
}()

func canonicalH2Key(k string) string {
	if c, ok := h2Canonical[k]; ok {
		return c
	}
	return textproto.CanonicalMIMEHeaderKey(k)
}

func lowerH2Key(k string) string {
	if l, ok := h2Lower[k]; ok {
		return l
	}
	return strings.ToLower(k)
}

// run is a stream's handler goroutine.
func (c *h2Conn) run(st *h2Stream) {
	defer c.wg.Done()
	growStack()
	if st.head != nil {
		if c.direct(st) {
			return
		}
		req, _, err := c.newRequest(st.fields, st.body == nil)
		if err != nil {
			c.endStream(st, http2.ErrCodeProtocol)
			return
		}
		if st.body != nil {
			req.Body = st.body // whole, as it came: the direct path took none of it
		}
		st.req = req.WithContext(st.ctx)
	}
	w := &h2Writer{st: st, response: response{req: st.req, h: make(http.Header, 8), cl: -1}}
	if aborted := c.call(w, st.req); aborted {
		c.endStream(st, http2.ErrCodeInternal)
		return
	}
	w.finish()
	code := http2.ErrCodeNo
	if w.err != nil {
		code = http2.ErrCodeInternal // the answer broke off: not a whole one
	}
	c.endStream(st, code)
}

func (c *h2Conn) call(w *h2Writer, r *http.Request) (aborted bool) {
	return guard(c.hs.s.log, c.remote, func() {
		if r.Method == http.MethodConnect {
			// Neither a tunnel nor extended CONNECT over h2: the endpoint
			// tunnels WebSockets over HTTP/1.1 only.
			writeError(w, http.StatusNotImplemented, "CONNECT over HTTP/2 is not supported by the endpoint; use HTTP/1.1")
			return
		}
		c.hs.handler.ServeHTTP(w, r)
	})
}

// endStream forgets st once its handler is done. A stream the client
// still sends on is reset with code (NO_ERROR after a whole answer: the
// rest of its body is not wanted, RFC 9113 8.1).
func (c *h2Conn) endStream(st *h2Stream, code http2.ErrCode) {
	c.mu.Lock()
	delete(c.streams, st.id)
	rst := !st.reset && (!st.remoteClosed || code != http2.ErrCodeNo)
	st.reset = true
	st.remoteClosed = true
	if len(c.streams) == 0 && c.goingAway {
		c.conn.SetReadDeadline(aLongTimeAgo) // the reader ends the connection
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	st.rc.cancel()
	if st.body != nil {
		st.body.discard()
	}
	if rst {
		c.write(func() error { return c.fr.WriteRSTStream(st.id, code) })
	}
}

// take waits for up to max bytes of send window of st and the connection.
func (st *h2Stream) take(max int) (int, error) {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	var timer *time.Timer
	timedOut := false
	for {
		switch {
		case c.closed:
			return 0, errH2ConnClosed
		case st.reset:
			return 0, errH2StreamReset
		case timedOut:
			return 0, errH2FlowTimeout
		}
		n := min(int64(max), st.sendWin, c.sendWin, int64(c.peerMaxFrame))
		if n > 0 {
			st.sendWin -= n
			c.sendWin -= n
			if timer != nil {
				timer.Stop()
			}
			return int(n), nil
		}
		if timer == nil {
			timer = time.AfterFunc(h2WriteTimeout, func() {
				c.mu.Lock()
				timedOut = true
				c.cond.Broadcast()
				c.mu.Unlock()
			})
		}
		c.cond.Wait()
	}
}

// h2Body is a request body: the reader goroutine puts the client's DATA
// in, the handler reads it out, and each read gives window back.
type h2Body struct {
	st       *h2Stream
	mu       sync.Mutex
	cond     sync.Cond
	buf      []byte
	err      error // io.EOF after END_STREAM, or why the body broke off
	done     bool  // the handler is finished: data is dropped
	declared int64
	got      int64
	trailers http.Header
}

// put adds a DATA frame's bytes; an error makes the stream malformed.
func (b *h2Body) put(p []byte, end bool) error {
	b.mu.Lock()
	b.got += int64(len(p))
	if b.declared >= 0 && (b.got > b.declared || end && b.got != b.declared) {
		b.err = errors.New("http2: request body length differs from its content-length")
		b.cond.Broadcast()
		b.mu.Unlock()
		b.st.c.credit(nil, int64(len(p)))
		return b.err
	}
	drop := b.done
	if !drop {
		b.buf = append(b.buf, p...)
	}
	if end && b.err == nil {
		b.err = io.EOF
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	if drop {
		b.st.c.credit(nil, int64(len(p)))
	}
	return nil
}

func (b *h2Body) putTrailers(tr http.Header) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.declared >= 0 && b.got != b.declared {
		b.err = errors.New("http2: request body shorter than its content-length")
		b.cond.Broadcast()
		return b.err
	}
	b.trailers = tr
	if b.err == nil {
		b.err = io.EOF
	}
	b.cond.Broadcast()
	return nil
}

func (b *h2Body) fail(err error) {
	b.mu.Lock()
	if b.err == nil || b.err == io.EOF && len(b.buf) > 0 {
		b.err = err
	}
	b.cond.Broadcast()
	b.mu.Unlock()
}

func (b *h2Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	var timer *time.Timer
	timedOut := false
	for len(b.buf) == 0 && b.err == nil && !b.done && !timedOut {
		if timer == nil {
			timer = time.AfterFunc(bodyReadTimeout, func() {
				b.mu.Lock()
				timedOut = true
				b.cond.Broadcast()
				b.mu.Unlock()
			})
		}
		b.cond.Wait()
	}
	if timer != nil {
		timer.Stop()
	}
	switch {
	case b.done:
		b.mu.Unlock()
		return 0, http.ErrBodyReadAfterClose
	case len(b.buf) > 0:
		n := copy(p, b.buf)
		b.buf = b.buf[n:]
		if len(b.buf) == 0 {
			b.buf = nil
		}
		b.mu.Unlock()
		b.st.c.credit(b.st, int64(n))
		return n, nil
	case b.err == io.EOF && b.trailers != nil:
		for k := range b.st.req.Trailer {
			b.st.req.Trailer[k] = b.trailers[k]
		}
		b.trailers = nil
	case timedOut && b.err == nil:
		b.mu.Unlock()
		return 0, errors.New("http2: request body read timed out")
	}
	err := b.err
	b.mu.Unlock()
	return 0, err
}

func (b *h2Body) Close() error { return nil }

// h2DirectBodyWait bounds how long the direct path waits for a small
// body to come whole after its HEADERS (it usually follows in the same
// read). Never longer: a full-duplex client may send the rest only after
// the answer's head, which the general path then streams.
const h2DirectBodyWait = 2 * time.Millisecond

// h2BodyWaitTest, set by tests only (nanoseconds), replaces
// h2DirectBodyWait: a test that needs a body taken by the direct path
// does not depend on a client's HEADERS and DATA coming within 2 ms on a
// loaded host.
var h2BodyWaitTest atomic.Int64

// whole reports whether the body has come whole, n bytes and the
// stream's end without trailers, waiting up to h2DirectBodyWait for it.
// It reads nothing: the general path finds the body as it came.
func (b *h2Body) whole(n int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err == nil && !b.done {
		// A timer only for a body not yet here (the common one is).
		timedOut := false
		wait := h2DirectBodyWait
		if w := h2BodyWaitTest.Load(); w > 0 {
			wait = time.Duration(w)
		}
		timer := time.AfterFunc(wait, func() {
			b.mu.Lock()
			timedOut = true
			b.cond.Broadcast()
			b.mu.Unlock()
		})
		for b.err == nil && !b.done && !timedOut {
			b.cond.Wait()
		}
		timer.Stop()
	}
	return b.complete(n)
}

// complete: the body has come whole and unread (under b.mu).
func (b *h2Body) complete(n int) bool {
	return b.err == io.EOF && b.trailers == nil && !b.done && b.got == int64(n) && len(b.buf) == n
}

// take hands the direct path the whole body whole saw, giving its window
// back as Read does; false: the stream broke off since (the general
// path then finds the body as it is).
func (b *h2Body) take(n int) ([]byte, bool) {
	b.mu.Lock()
	if !b.complete(n) {
		b.mu.Unlock()
		return nil, false
	}
	p := b.buf
	b.buf = nil
	b.mu.Unlock()
	b.st.c.credit(b.st, int64(len(p)))
	return p, true
}

// discard drops what the handler left unread, giving its window back.
func (b *h2Body) discard() {
	b.mu.Lock()
	n := len(b.buf)
	b.buf, b.done = nil, true
	b.cond.Broadcast()
	b.mu.Unlock()
	b.st.c.credit(nil, int64(n))
}

// h2Writer is a stream's http.ResponseWriter. As h1Writer, it holds the
// header until the handler ends or pendMax body bytes wait, so a small
// answer leaves as one HEADERS and one DATA frame in one flush.
type h2Writer struct {
	st *h2Stream
	response
	trailers []string
	sentEnd  bool // sendHeader ended the stream
	err      error
}

func (w *h2Writer) Header() http.Header { return w.h }

func (w *h2Writer) WriteHeader(code int) {
	if w.status != 0 || w.err != nil {
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code < 200 {
		w.fail(w.st.write(func() error { return w.writeHeaders(code, w.h, false) }))
		return
	}
	w.final(code)
}

func (w *h2Writer) fail(err error) {
	if err != nil && w.err == nil {
		w.err = err
		w.st.rc.cancel()
	}
}

func (w *h2Writer) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if done, n, err := w.hold(p); done {
		return n, err
	}
	if !w.sent {
		w.sendHeader(false)
	}
	w.writeData(p, false)
	if w.err != nil {
		return 0, w.err
	}
	return len(p), nil
}

func (w *h2Writer) FlushError() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err == nil && !w.sent {
		w.sendHeader(false)
	}
	return w.err
}

func (w *h2Writer) Flush() { w.FlushError() }

// EnableFullDuplex: an h2 stream reads and writes independently anyway.
func (w *h2Writer) EnableFullDuplex() error { return nil }

// sendHeader sends the header and what pend holds; final: the handler
// has returned, so pend is the whole body and may end the stream.
func (w *h2Writer) sendHeader(final bool) {
	w.sent = true
	h := w.h
	for _, v := range h["Trailer"] {
		for _, k := range splitProtocols([]string{v}) {
			w.trailers = append(w.trailers, http.CanonicalHeaderKey(k))
		}
	}
	hasTrailers := len(w.trailers) > 0 || hasTrailerPrefix(h)
	if w.status == http.StatusNoContent || w.status == http.StatusNotModified {
		delete(h, "Content-Length")
	}
	if !w.noBody {
		sniffType(h, w.pend)
		if w.cl < 0 && final && !hasTrailers {
			w.cl = int64(len(w.pend))
			h["Content-Length"] = []string{strconv.Itoa(len(w.pend))}
		}
	}
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{httpDate()}
	}
	pend := w.pend
	w.pend = nil
	defer func() {
		if pend != nil {
			pendBuffers.Put((*[pendMax]byte)(pend[:pendMax]))
		}
	}()
	endOnHeaders := final && !hasTrailers && (w.noBody || len(pend) == 0)
	w.sentEnd = final && !hasTrailers
	// The common answer: window for all of pend at once, then header and
	// body in one write.
	if len(pend) > 0 && !w.noBody {
		if n, err := w.st.takeNow(len(pend)); err == nil && n == len(pend) {
			endData := final && !hasTrailers
			w.fail(w.st.write(func() error {
				if err := w.writeHeaders(w.status, h, false); err != nil {
					return err
				}
				return w.st.c.fr.WriteData(w.st.id, endData, pend)
			}))
			return
		} else if n > 0 {
			w.st.giveBack(n)
		}
	}
	w.fail(w.st.write(func() error { return w.writeHeaders(w.status, h, endOnHeaders) }))
	if !w.noBody && len(pend) > 0 {
		w.writeData(pend, final && !hasTrailers)
	}
}

// write runs fn, which writes frames of st, in the connection's writer
// unless st has been reset by then: no frame of a stream follows its
// RST_STREAM (a handler still answering a stream the client reset, or
// the reader reset for a broken body, sent a whole-looking answer after
// it). Skipped, it is errH2StreamReset, which does not end the
// connection as fn's errors do.
func (st *h2Stream) write(fn func() error) error {
	reset := false
	err := st.c.write(func() error {
		st.c.mu.Lock()
		reset = st.reset
		st.c.mu.Unlock()
		if reset {
			return nil
		}
		return fn()
	})
	if err == nil && reset {
		return errH2StreamReset
	}
	return err
}

// takeNow takes n bytes of send window if both windows and the frame
// size allow it without waiting.
func (st *h2Stream) takeNow(n int) (int, error) {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || st.reset {
		return 0, errH2StreamReset
	}
	if int64(n) > st.sendWin || int64(n) > c.sendWin || n > c.peerMaxFrame {
		return 0, nil
	}
	st.sendWin -= int64(n)
	c.sendWin -= int64(n)
	return n, nil
}

func (st *h2Stream) giveBack(n int) {
	st.c.mu.Lock()
	st.sendWin += int64(n)
	st.c.sendWin += int64(n)
	st.c.mu.Unlock()
}

// writeData sends p as DATA frames as the client's windows allow.
func (w *h2Writer) writeData(p []byte, end bool) {
	if w.err == nil {
		w.fail(w.st.writeData(p, end))
	}
}

func (st *h2Stream) writeData(p []byte, end bool) error {
	for len(p) > 0 || end {
		n := 0
		if len(p) > 0 {
			var err error
			if n, err = st.take(len(p)); err != nil {
				return err
			}
		}
		last := end && n == len(p)
		chunk := p[:n]
		if err := st.write(func() error { return st.c.fr.WriteData(st.id, last, chunk) }); err != nil {
			return err
		}
		p = p[n:]
		if last {
			return nil
		}
	}
	return nil
}

// writeHeaders encodes and writes a header block (under the write lock:
// the encoder's table is the connection's), split into CONTINUATIONs at
// the client's frame size.
func (w *h2Writer) writeHeaders(status int, h http.Header, end bool) error {
	c := w.st.c
	c.hbuf.Reset()
	c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	encodeFields(c.henc, h, false)
	return c.writeBlock(w.st.id, c.hbuf.Bytes(), end)
}

func (c *h2Conn) writeBlock(id uint32, block []byte, end bool) error {
	c.mu.Lock()
	max := c.peerMaxFrame
	c.mu.Unlock()
	first := block[:min(len(block), max)]
	rest := block[len(first):]
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first,
		EndStream: end, EndHeaders: len(rest) == 0}); err != nil {
		return err
	}
	for len(rest) > 0 {
		frag := rest[:min(len(rest), max)]
		rest = rest[len(frag):]
		if err := c.fr.WriteContinuation(id, len(rest) == 0, frag); err != nil {
			return err
		}
	}
	return nil
}

// encodeFields writes h without the fields HTTP/2 forbids in answers;
// names that are not tokens are dropped and control characters in values
// become spaces (a guest's header cannot corrupt the stream).
func encodeFields(enc *hpack.Encoder, h http.Header, trailers bool) {
	for k, vv := range h {
		if !validFieldName(k) || strings.HasPrefix(k, http.TrailerPrefix) {
			continue
		}
		switch k {
		case "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade":
			continue
		case "Content-Length", "Trailer":
			if trailers {
				continue
			}
		}
		name := lowerH2Key(k)
		for _, v := range vv {
			enc.WriteField(hpack.HeaderField{Name: name, Value: sanitizeFieldValue(v),
				Sensitive: k == "Set-Cookie" || k == "Authorization"})
		}
	}
}

// finish ends the stream after the handler returned.
func (w *h2Writer) finish() {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return
	}
	if !w.noBody && w.cl >= 0 && w.written < w.cl {
		// Declared more than written: the stream is reset (run), so the
		// client does not take the short body for a whole one.
		if !w.sent {
			w.sendHeader(false)
		}
		w.fail(errH2ShortBody)
		return
	}
	if !w.sent {
		w.sendHeader(true) // ends the stream unless trailers follow
	}
	tr := trailerFields(w.h, w.trailers)
	if len(w.trailers) == 0 && len(tr) == 0 {
		if w.sentEnd {
			return
		}
		w.writeData(nil, true)
		return
	}
	c := w.st.c
	w.fail(w.st.write(func() error {
		c.hbuf.Reset()
		encodeFields(c.henc, tr, true)
		return c.writeBlock(w.st.id, c.hbuf.Bytes(), true)
	}))
}

// trailerFields are the trailers of an answer with header h: those
// declared (in its Trailer field) and those set with http.TrailerPrefix.
func trailerFields(h http.Header, declared []string) http.Header {
	tr := http.Header{}
	for _, k := range declared {
		if vv, ok := h[k]; ok {
			tr[k] = vv
		}
	}
	for k, vv := range h {
		if len(k) > len(http.TrailerPrefix) && strings.HasPrefix(k, http.TrailerPrefix) {
			tr[http.CanonicalHeaderKey(k[len(http.TrailerPrefix):])] = vv
		}
	}
	return tr
}

func hasTrailerPrefix(h http.Header) bool {
	for k := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) && len(k) > len(http.TrailerPrefix) {
			return true
		}
	}
	return false
}

// sniffType gives a body without a Content-Type the sniffed one, as
// net/http does.
func sniffType(h http.Header, body []byte) {
	if _, ok := h["Content-Type"]; !ok && h.Get("Content-Encoding") == "" && len(body) > 0 {
		h.Set("Content-Type", http.DetectContentType(body))
	}
}

// sanitizeFieldValue turns control characters into spaces.
func sanitizeFieldValue(v string) string {
	if validFieldValue(v) {
		return v
	}
	return string(bytes.Map(func(r rune) rune {
		if r < ' ' && r != '\t' || r == 0x7f {
			return ' '
		}
		return r
	}, []byte(v)))
}

// h2StackFrame is the frame growStack takes.
const h2StackFrame = 8 << 10

// growStack grows a new stream goroutine's stack, while it is shallow,
// to what answering takes: a goroutine starts with 2 KB, and its stack
// grew (copied, every frame adjusted) deep in the TLS write of the
// answer, each stream again: 6 to 7% of the proxy's CPU in the h2 bench
// profile. Grown here, one copy adjusts two frames.
//
//go:noinline
func growStack() {
	if frameUsed {
		// Never runs: the frame is reserved, never zeroed.
		var frame [h2StackFrame]byte
		touchFrame(frame[:])
	}
}

var frameUsed bool

//go:noinline
func touchFrame(b []byte) { b[len(b)-1] = 1 }
