package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// startH2Loop serves h over TLS the way Serve does (handshake, then the
// own loops by ALPN); it returns the address.
func startH2Loop(t *testing.T, h http.Handler) string {
	t.Helper()
	certPEM, keyPEM := selfSignedCert(t)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{log: slog.New(slog.DiscardHandler)}
	hs := &h1Serve{s: s, handler: h, fallback: newConnListener(ln.Addr()), conns: map[net.Conn]*h1Conn{},
		tlsConf: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}}
	go hs.accept(ln)
	t.Cleanup(func() {
		hs.closing.Store(true)
		ln.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		hs.shutdown(ctx)
	})
	return ln.Addr().String()
}

// h2Client is Go's own HTTP/2 client (x/net), one connection.
func h2Client(t *testing.T) *http.Client {
	tr := &http2.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

func TestH2LoopBodies(t *testing.T) {
	left := make(chan struct{}, 1)
	addr := startH2Loop(t, loopHandler(left))
	c := h2Client(t)
	base := "https://" + addr
	// Bodies far over both windows, both ways: flow control must turn.
	big := bytes.Repeat([]byte("0123456789abcdef"), 5<<20/16)
	resp, err := c.Post(base+"/echo", "application/octet-stream", bytes.NewReader(big))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := sum(big); string(b) != want || resp.ProtoMajor != 2 {
		t.Fatalf("upload: %q (HTTP/%d), want %q", b, resp.ProtoMajor, want)
	}
	for _, q := range []string{"n=5242880", "n=5242880&cl=1", "n=100", "n=0"} {
		resp, err := c.Get(base + "/big?" + q)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		var n int
		fmt.Sscanf(q, "n=%d", &n)
		if err != nil || len(b) != n {
			t.Fatalf("download %s: %d bytes, %v", q, len(b), err)
		}
		if n <= pendMax && resp.ContentLength != int64(n) {
			t.Errorf("small answer %s without its length: %d", q, resp.ContentLength)
		}
	}
	resp, err = c.Get(base + "/trailer")
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "body" || resp.Trailer.Get("X-Sum") != "42" {
		t.Errorf("trailer: %q %v", b, resp.Trailer)
	}
	req, _ := http.NewRequest(http.MethodHead, base+"/big?n=10&cl=1", nil)
	if resp, err = c.Do(req); err != nil || resp.ContentLength != 10 {
		t.Errorf("HEAD: %v %v", resp, err)
	}
}

// TestH2LoopStreams: more streams at once than the loop allows (the
// client queues by SETTINGS_MAX_CONCURRENT_STREAMS), each answered right.
func TestH2LoopStreams(t *testing.T) {
	addr := startH2Loop(t, loopHandler(nil))
	c := h2Client(t)
	const n = 400
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := strings.Repeat("x", i*37)
			resp, err := c.Post(fmt.Sprintf("https://%s/echo", addr), "text/plain", strings.NewReader(body))
			if err != nil {
				errs <- err
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := sum([]byte(body)); string(b) != want {
				errs <- fmt.Errorf("stream %d: %q, want %q", i, b, want)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestH2LoopNothingAfterReset: a handler that answers a stream after the
// proxy reset it (its body broke the declared length) sends no frame of
// it: before, its HEADERS followed the RST_STREAM, a whole-looking answer
// to a request the proxy had refused.
func TestH2LoopNothingAfterReset(t *testing.T) {
	answered := make(chan struct{})
	addr := startH2Loop(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // fails: more than content-length
		time.Sleep(100 * time.Millisecond)
		io.WriteString(w, "late")
		close(answered)
	}))
	r := dialH2(t, addr)
	r.headers(1, false, ":method", "POST", ":scheme", "https", ":authority", "x", ":path", "/", "content-length", "5")
	r.fr.WriteData(1, true, []byte("0123456789"))
	r.reset(1, http2.ErrCodeProtocol)
	<-answered
	time.Sleep(50 * time.Millisecond) // the handler's end is written
	r.fr.WritePing(false, [8]byte{7})
	r.until("PING ack", func(f http2.Frame) bool {
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 1 {
			t.Fatalf("HEADERS %v on stream 1 after its RST_STREAM", h.Fields)
		}
		if d, ok := f.(*http2.DataFrame); ok && d.StreamID == 1 {
			t.Fatalf("DATA %q on stream 1 after its RST_STREAM", d.Data())
		}
		p, ok := f.(*http2.PingFrame)
		return ok && p.IsAck()
	})
}

// TestH2LoopClientResets: a client that cancels a request resets its
// stream; the handler's context ends at once.
func TestH2LoopClientResets(t *testing.T) {
	started, left := make(chan struct{}, 1), make(chan struct{}, 1)
	addr := startH2Loop(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/wait" {
			return
		}
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			left <- struct{}{}
		case <-time.After(10 * time.Second):
		}
	}))
	c := h2Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+"/wait", nil)
	go func() { <-started; cancel() }()
	if _, err := c.Do(req); err == nil {
		t.Fatal("a cancelled request succeeded")
	}
	select {
	case <-left:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not see the reset")
	}
	// The connection serves on.
	if resp, err := c.Get("https://" + addr + "/x"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("after a reset: %v %v", resp, err)
	}
}

// TestH2LoopCurl: curl (nghttp2), an independent client, with bodies over
// the windows both ways.
func TestH2LoopCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("no curl")
	}
	if out, _ := exec.Command(curl, "--version").Output(); !bytes.Contains(out, []byte("HTTP2")) {
		t.Skip("curl without HTTP/2")
	}
	addr := startH2Loop(t, loopHandler(nil))
	dir := t.TempDir()
	big := bytes.Repeat([]byte("kiln"), 3<<20/4)
	f := filepath.Join(dir, "up")
	os.WriteFile(f, big, 0o600)
	out, err := exec.Command(curl, "-sk", "--http2", "--fail", "-w", " %{http_version}", "--data-binary", "@"+f,
		"https://"+addr+"/echo").CombinedOutput()
	if want := sum(big) + " 2"; err != nil || string(out) != want {
		t.Fatalf("curl upload: %q %v, want %q", out, err, want)
	}
	out, err = exec.Command(curl, "-sk", "--http2", "--fail", "-o", filepath.Join(dir, "down1"), "-o", filepath.Join(dir, "down2"), "-w", "%{http_version} %{size_download}",
		"https://"+addr+"/big?n=3000000", "https://"+addr+"/big?n=5&cl=1").CombinedOutput()
	if err != nil || string(out) != "2 30000002 5" {
		t.Fatalf("curl downloads: %q %v", out, err)
	}
}

// rawH2 is a hand-driven client connection, for what real clients never
// send.
type rawH2 struct {
	t    *testing.T
	c    net.Conn
	fr   *http2.Framer
	hbuf bytes.Buffer
	enc  *hpack.Encoder
}

func dialH2(t *testing.T, addr string) *rawH2 {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, ServerName: "vm1." + domain})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := &rawH2{t: t, c: c, fr: http2.NewFramer(c, c)}
	r.enc = hpack.NewEncoder(&r.hbuf)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	io.WriteString(c, http2.ClientPreface)
	r.fr.WriteSettings()
	return r
}

func (r *rawH2) headers(id uint32, end bool, fields ...string) {
	r.hbuf.Reset()
	for i := 0; i < len(fields); i += 2 {
		r.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.hbuf.Bytes(), EndStream: end, EndHeaders: true})
}

var getFields = []string{":method", "GET", ":scheme", "https", ":authority", "x", ":path", "/"}

// until reads frames until want says it is the one; it fails at the
// connection's end.
func (r *rawH2) until(what string, want func(http2.Frame) bool) http2.Frame {
	r.t.Helper()
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("waiting for %s: %v", what, err)
		}
		if want(f) {
			return f
		}
	}
}

func (r *rawH2) goAway(code http2.ErrCode) {
	r.t.Helper()
	f := r.until("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if f.ErrCode != code {
		r.t.Fatalf("GOAWAY %v (%s), want %v", f.ErrCode, f.DebugData(), code)
	}
}

func (r *rawH2) reset(id uint32, code http2.ErrCode) {
	r.t.Helper()
	f := r.until("RST_STREAM", func(f http2.Frame) bool {
		_, ok := f.(*http2.RSTStreamFrame)
		return ok && f.Header().StreamID == id
	}).(*http2.RSTStreamFrame)
	if f.ErrCode != code {
		r.t.Fatalf("RST_STREAM %v, want %v", f.ErrCode, code)
	}
}

func (r *rawH2) status(id uint32) string {
	r.t.Helper()
	f := r.until("HEADERS", func(f http2.Frame) bool {
		_, ok := f.(*http2.MetaHeadersFrame)
		return ok && f.Header().StreamID == id
	}).(*http2.MetaHeadersFrame)
	return f.PseudoValue("status")
}

func TestH2LoopMalformed(t *testing.T) {
	addr := startH2Loop(t, loopHandler(make(chan struct{}, 1000)))
	t.Run("ping", func(t *testing.T) {
		r := dialH2(t, addr)
		r.fr.WritePing(false, [8]byte{1, 2, 3})
		f := r.until("PING", func(f http2.Frame) bool { _, ok := f.(*http2.PingFrame); return ok }).(*http2.PingFrame)
		if !f.IsAck() || f.Data != [8]byte{1, 2, 3} {
			t.Fatalf("PING answer %v", f)
		}
	})
	t.Run("get", func(t *testing.T) {
		r := dialH2(t, addr)
		r.headers(1, true, getFields...)
		if s := r.status(1); s != "200" {
			t.Fatalf("status %s", s)
		}
	})
	for _, tc := range []struct {
		name   string
		fields []string
	}{
		{"upper-case name", append(getFields, "X-Up", "1")},
		{"connection header", append(getFields, "connection", "close")},
		{"no path", []string{":method", "GET", ":scheme", "https", ":authority", "x"}},
		{"pseudo after regular", []string{":method", "GET", "a", "b", ":scheme", "https", ":path", "/"}},
		{"extended CONNECT", []string{":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":authority", "x", ":path", "/"}},
		{"te", append(getFields, "te", "gzip")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialH2(t, addr)
			r.headers(1, true, tc.fields...)
			r.reset(1, http2.ErrCodeProtocol)
			r.headers(3, true, getFields...) // the connection serves on
			if s := r.status(3); s != "200" {
				t.Fatalf("next stream: %s", s)
			}
		})
	}
	t.Run("CONNECT", func(t *testing.T) {
		r := dialH2(t, addr)
		r.headers(1, true, ":method", "CONNECT", ":authority", "x:443")
		if s := r.status(1); s != "501" {
			t.Fatalf("CONNECT: %s", s)
		}
	})
	t.Run("content-length mismatch", func(t *testing.T) {
		r := dialH2(t, addr)
		r.headers(1, false, ":method", "POST", ":scheme", "https", ":authority", "x", ":path", "/echo", "content-length", "2")
		r.fr.WriteData(1, true, []byte("abc"))
		r.reset(1, http2.ErrCodeProtocol)
	})
	t.Run("data beyond window", func(t *testing.T) {
		r := dialH2(t, addr)
		r.headers(1, false, ":method", "POST", ":scheme", "https", ":authority", "x", ":path", "/wait")
		chunk := make([]byte, 16<<10)
		for range h2StreamWindow/len(chunk) + 1 {
			r.fr.WriteData(1, false, chunk)
		}
		r.reset(1, http2.ErrCodeFlowControl)
	})
	t.Run("DATA on idle stream", func(t *testing.T) {
		r := dialH2(t, addr)
		r.fr.WriteData(5, false, []byte("x"))
		r.goAway(http2.ErrCodeProtocol)
	})
	t.Run("no SETTINGS first", func(t *testing.T) {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, http2.ClientPreface)
		fr := http2.NewFramer(c, c)
		fr.WritePing(false, [8]byte{})
		r := &rawH2{t: t, c: c, fr: fr}
		r.goAway(http2.ErrCodeProtocol)
	})
	t.Run("bad preface", func(t *testing.T) {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		if _, err := io.ReadAll(c); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("bad preface: %v", err)
		}
	})
	t.Run("oversized frame", func(t *testing.T) {
		r := dialH2(t, addr)
		r.headers(1, false, ":method", "POST", ":scheme", "https", ":authority", "x", ":path", "/wait")
		r.fr.WriteData(1, false, make([]byte, h2MaxFrame+1))
		r.goAway(http2.ErrCodeFrameSize)
	})
	t.Run("CONTINUATION flood", func(t *testing.T) {
		r := dialH2(t, addr)
		r.hbuf.Reset()
		r.enc.WriteField(hpack.HeaderField{Name: ":method", Value: "GET"})
		r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: r.hbuf.Bytes()})
		for range h2MaxContinuations + 10 {
			if r.fr.WriteContinuation(1, false, nil) != nil {
				break
			}
		}
		r.goAway(http2.ErrCodeEnhanceYourCalm)
	})
	t.Run("header list too large", func(t *testing.T) {
		r := dialH2(t, addr)
		big := strings.Repeat("v", 8<<10)
		fields := append([]string{}, getFields...)
		for i := range 10 {
			fields = append(fields, fmt.Sprintf("x-%d", i), big)
		}
		r.hbuf.Reset()
		for i := 0; i < len(fields); i += 2 {
			r.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		block := r.hbuf.Bytes()
		r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:16<<10]})
		rest := block[16<<10:]
		for len(rest) > 0 {
			n := min(len(rest), 16<<10)
			r.fr.WriteContinuation(1, n == len(rest), rest[:n])
			rest = rest[n:]
		}
		r.reset(1, http2.ErrCodeRefusedStream)
		r.headers(3, true, getFields...)
		if s := r.status(3); s != "200" {
			t.Fatalf("next stream: %s", s)
		}
	})
	t.Run("rapid reset", func(t *testing.T) {
		r := dialH2(t, addr)
		wait := []string{":method", "GET", ":scheme", "https", ":authority", "x", ":path", "/wait"}
		for i := range uint32(h2ResetBudget + 10) {
			id := 2*i + 1
			r.headers(id, true, wait...)
			r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
		r.goAway(http2.ErrCodeEnhanceYourCalm)
	})
}

// h2Seed is a client's bytes after the preface: SETTINGS, then frames.
func h2Seed(frames func(fr *http2.Framer, enc func(fields ...string) []byte)) []byte {
	var b, hb bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	e := hpack.NewEncoder(&hb)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	frames(fr, func(fields ...string) []byte {
		hb.Reset()
		for i := 0; i < len(fields); i += 2 {
			e.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return bytes.Clone(hb.Bytes())
	})
	return b.Bytes()
}

// FuzzH2Loop: whatever frames a client sends, the loop neither panics
// nor hangs, a request reaches the handler only with a valid method and
// Host and no Host header, and everything it writes parses as frames.
func FuzzH2Loop(f *testing.F) {
	post := []string{":method", "POST", ":scheme", "https", ":authority", "x", ":path", "/", "content-length", "3"}
	f.Add(h2Seed(func(fr *http2.Framer, enc func(...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(getFields...), EndStream: true, EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: enc(post...), EndHeaders: true})
		fr.WriteData(3, true, []byte("abc"))
	}))
	f.Add(h2Seed(func(fr *http2.Framer, enc func(...string) []byte) {
		b := enc(append(getFields, "cookie", "a=1", "cookie", "b=2", "trailer", "x-t")...)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:5]})
		fr.WriteContinuation(1, true, b[5:])
		fr.WriteWindowUpdate(0, 1000)
		fr.WritePing(false, [8]byte{9})
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
	}))
	f.Add(h2Seed(func(fr *http2.Framer, enc func(...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(post[:8]...), EndHeaders: true})
		fr.WriteDataPadded(1, false, []byte("ab"), []byte{0, 0})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc("x-t", "1"), EndStream: true, EndHeaders: true})
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 14}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		fr.WriteGoAway(1, http2.ErrCodeNo, nil)
	}))
	f.Add(h2Seed(func(fr *http2.Framer, enc func(...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(":method", "CONNECT", ":authority", "x:1"), EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: enc(getFields...), EndHeaders: true})
	}))
	f.Fuzz(func(t *testing.T, in []byte) {
		var mu sync.Mutex
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			if !validMethod(r.Method) || len(r.Header["Host"]) > 0 {
				t.Errorf("request %q host %q header %q", r.Method, r.Host, r.Header["Host"])
			}
			n, _ := io.Copy(io.Discard, r.Body)
			if r.ContentLength > 0 && n > r.ContentLength {
				t.Errorf("read %d body bytes of %d", n, r.ContentLength)
			}
			io.WriteString(w, r.Method)
		})
		s := &Server{log: slog.New(slog.DiscardHandler)}
		hs := &h1Serve{s: s, handler: h, conns: map[net.Conn]*h1Conn{}}
		pc := &pipeConn{in: bytes.NewReader(append([]byte(http2.ClientPreface), in...))}
		done := make(chan struct{})
		go func() { newH2Conn(hs, pc, nil, "192.0.2.1:1").serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the loop did not end at the end of its input")
		}
		fr := http2.NewFramer(nil, bytes.NewReader(pc.out.Bytes()))
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		for {
			_, err := fr.ReadFrame()
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatalf("the loop wrote a frame that does not parse: %v", err)
			}
		}
	})
}

// TestH2LoopShortBody: an answer shorter than its Content-Length is
// reset, never ended as if whole.
func TestH2LoopShortBody(t *testing.T) {
	addr := startH2Loop(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "short")
		if r.URL.Path == "/flushed" {
			w.(http.Flusher).Flush()
		}
	}))
	c := h2Client(t)
	for _, p := range []string{"/", "/flushed"} {
		resp, err := c.Get("https://" + addr + p)
		if err == nil {
			_, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		if err == nil {
			t.Errorf("%s: a short body read as whole", p)
		}
	}
}

// TestH2LoopShutdown: shutdown sends GOAWAY, lets the stream in flight
// finish and then ends the connection.
func TestH2LoopShutdown(t *testing.T) {
	release, entered := make(chan struct{}), make(chan struct{})
	certPEM, keyPEM := selfSignedCert(t)
	cert, _ := tls.X509KeyPair(certPEM, keyPEM)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hs := &h1Serve{s: &Server{log: slog.New(slog.DiscardHandler)}, conns: map[net.Conn]*h1Conn{},
		fallback: newConnListener(ln.Addr()),
		handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(entered)
			<-release
			io.WriteString(w, "done")
		}),
		tlsConf: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}}
	go hs.accept(ln)
	r := dialH2(t, ln.Addr().String())
	r.headers(1, true, getFields...)
	select { // the stream is open
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream's handler did not begin")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() { hs.closing.Store(true); ln.Close(); hs.shutdown(ctx); close(stopped) }()
	r.goAway(http2.ErrCodeNo)
	close(release)
	if s := r.status(1); s != "200" {
		t.Fatalf("stream in flight: %s", s)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown did not end")
	}
	// What is left of stream 1 may still be read; then the connection ends.
	r.c.SetDeadline(time.Now().Add(3 * time.Second))
	for {
		if _, err := r.fr.ReadFrame(); err != nil {
			if isTimeout(err) {
				t.Fatal("the connection stayed open after shutdown")
			}
			break
		}
	}
}

// TestH2WriteAfterQuietMinute: after a minute without writes the last
// write deadline has passed; an answer larger than the write buffer,
// which reaches the socket before the flush, still goes out instead of
// ending the connection with a timeout.
func TestH2WriteAfterQuietMinute(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hs := &h1Serve{s: &Server{log: slog.New(slog.DiscardHandler)}, conns: map[net.Conn]*h1Conn{}}
	c := newH2Conn(hs, conn, nil, "192.0.2.1:1")
	c.tw.at = time.Now().Add(-h2WriteTimeout - time.Second)
	conn.SetWriteDeadline(c.tw.at.Add(h2WriteTimeout))
	if err := c.write(func() error { return c.writeBlock(1, make([]byte, 2*h2WriteBufSize), true) }); err != nil {
		t.Fatalf("a header block over the write buffer after a quiet minute: %v", err)
	}
}
