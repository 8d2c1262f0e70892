package envd

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
)

func envelope(flags byte, msg string) []byte {
	b := make([]byte, 5, 5+len(msg))
	b[0] = flags
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// TestStreamRequest: the one message of a server stream is read within
// its bound; compressed, end-of-stream or oversize messages are refused.
func TestStreamRequest(t *testing.T) {
	req := func(body []byte, ct string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", "/process.Process/Start", bytes.NewReader(body))
		r.Header.Set("Content-Type", ct)
		var v startRequest
		w := httptest.NewRecorder()
		if e := readStreamRequest(r, &v); e != nil {
			startStream(w).end(e)
		} else {
			startStream(w).end(checkStart(v))
		}
		return w
	}
	cases := map[string]struct {
		body []byte
		ct   string
		code string
	}{
		"ok":          {envelope(0, `{"process":{"cmd":"/bin/sh","args":["-c","echo hi"]}}`), contentStream, ""},
		"unary type":  {envelope(0, `{}`), contentUnary, "invalid_argument"},
		"compressed":  {envelope(flagCompressed, `{}`), contentStream, "unimplemented"},
		"end flag":    {envelope(flagEndStream, `{}`), contentStream, "invalid_argument"},
		"too long":    {append(envelope(0, "")[:1], 0xff, 0xff, 0xff, 0xff), contentStream, "invalid_argument"},
		"cut short":   {envelope(0, `{"process":{}}`)[:9], contentStream, "invalid_argument"},
		"no cmd":      {envelope(0, `{"process":{"cmd":""}}`), contentStream, "invalid_argument"},
		"nul in arg":  {envelope(0, `{"process":{"cmd":"a","args":["b\u0000"]}}`), contentStream, "invalid_argument"},
		"env has '='": {envelope(0, `{"process":{"cmd":"a","envs":{"A=B":"c"}}}`), contentStream, "invalid_argument"},
		"pty":         {envelope(0, `{"process":{"cmd":"a"},"pty":{"size":{"cols":80,"rows":24}}}`), contentStream, ""},
		"pty no size": {envelope(0, `{"process":{"cmd":"a"},"pty":{}}`), contentStream, "invalid_argument"},
	}
	for name, tc := range cases {
		w := req(tc.body, tc.ct)
		if w.Code != 200 || w.Header().Get("Content-Type") != contentStream {
			t.Fatalf("%s: status %d type %q: a stream's errors travel in its end message", name, w.Code, w.Header().Get("Content-Type"))
		}
		flags, msg, err := readEnvelope(w.Body, 1<<20)
		if err != nil || flags != flagEndStream {
			t.Fatalf("%s: no end-of-stream message: %v", name, err)
		}
		var end struct{ Error *rpcError }
		json.Unmarshal(msg, &end)
		got := ""
		if end.Error != nil {
			got = string(end.Error.Code)
		}
		if got != tc.code {
			t.Errorf("%s: end message %s, want code %q", name, msg, tc.code)
		}
	}
}

func FuzzReadEnvelope(f *testing.F) {
	f.Add(envelope(0, `{"a":1}`))
	f.Add(envelope(2, `{}`))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, msg, err := readEnvelope(bytes.NewReader(b), 64)
		if err == nil && (len(msg) > 64 || len(msg)+5 > len(b)) {
			t.Fatalf("read %d bytes from %d", len(msg), len(b))
		}
	})
}

func FuzzCheckStart(f *testing.F) {
	f.Add(`{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hello"],"envs":{"A":"1"},"cwd":"/tmp"},"stdin":false}`)
	f.Add(`{"process":{"cmd":"x","envs":{"":"1"}},"tag":"t"}`)
	f.Fuzz(func(t *testing.T, body string) {
		var req startRequest
		if decodeMessage([]byte(body), &req) != nil || checkStart(req) != nil {
			return
		}
		c := req.Process
		if c == nil || c.Cmd == "" || len(c.Args) > maxArgs || len(c.Envs) > maxEnvs {
			t.Fatalf("accepted %+v", req)
		}
		for k, v := range c.Envs {
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
				t.Fatalf("accepted env %q=%q", k, v)
			}
		}
	})
}

func tarOf(hdr *tar.Header, data string) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	hdr.Size = int64(len(data))
	if hdr.Typeflag != tar.TypeReg {
		hdr.Size = 0
		data = ""
	}
	tw.WriteHeader(hdr)
	io.WriteString(tw, data)
	tw.Close()
	return b.Bytes()
}

// TestFileFromTar: a download relays only the one regular file asked for.
func TestFileFromTar(t *testing.T) {
	size, r, e := fileFromTar(bytes.NewReader(tarOf(&tar.Header{Typeflag: tar.TypeReg, Name: "a.txt", Mode: 0o644}, "hello")), "a.txt")
	if e != nil || size != 5 {
		t.Fatalf("regular file: %d %v", size, e)
	}
	if b, _ := io.ReadAll(r); string(b) != "hello" {
		t.Fatalf("read %q", b)
	}
	for name, hdr := range map[string]*tar.Header{
		"directory":  {Typeflag: tar.TypeDir, Name: "a.txt/"},
		"symlink":    {Typeflag: tar.TypeSymlink, Name: "a.txt", Linkname: "/etc/shadow"},
		"other name": {Typeflag: tar.TypeReg, Name: "b.txt"},
		"device":     {Typeflag: tar.TypeChar, Name: "a.txt"},
	} {
		if _, _, e := fileFromTar(bytes.NewReader(tarOf(hdr, "x")), "a.txt"); e == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzFileFromTar(f *testing.F) {
	f.Add(tarOf(&tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644}, "data"), "f")
	f.Add(tarOf(&tar.Header{Typeflag: tar.TypeDir, Name: "d/"}, ""), "d")
	f.Add([]byte("not a tar"), "f")
	f.Fuzz(func(t *testing.T, b []byte, base string) {
		size, r, e := fileFromTar(bytes.NewReader(b), base)
		if e != nil {
			return
		}
		if size < 0 || size > maxFileBytes {
			t.Fatalf("size %d accepted", size)
		}
		n, _ := io.Copy(io.Discard, r)
		if n > size {
			t.Fatalf("read %d bytes of a %d-byte file", n, size)
		}
	})
}

func FuzzUserOf(f *testing.F) {
	f.Add("Basic dXNlcjo=", "")
	f.Add("Basic !!!", "root")
	f.Add("", "a;rm -rf /")
	f.Fuzz(func(t *testing.T, authz, query string) {
		r := httptest.NewRequest("GET", "/files", nil)
		r.Header.Set("Authorization", authz)
		q := r.URL.Query()
		q.Set("username", query)
		r.URL.RawQuery = q.Encode()
		u := userOf(r)
		if validUser(u) && strings.ContainsAny(u, "/ ;\x00\n") {
			t.Fatalf("user %q passes", u)
		}
	})
}

// TestClassifyAgentErrors: the agent's answers about a process that has
// ended, or closed its input, or a session that ended under the call,
// reach the client as what they are, not as internal errors.
func TestClassifyAgentErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		want code
	}{
		{errors.New("signal: agent: exec 12 not found"), codeNotFound},
		{errors.New("writing stdin: write |1: broken pipe"), codeFailedPrecond},
		{fmt.Errorf("stdin: %w: %w", client.ErrClosed, io.EOF), codeUnavailable},
		{errors.New("open /x: no such file or directory"), codeNotFound},
		{errors.New("user bob not found in /etc/passwd"), codeInvalidArgument},
		{errors.New("something else"), codeInternal},
	} {
		if got := classify(c.err); got.Code != c.want {
			t.Errorf("classify(%q) = %s, want %s", c.err, got.Code, c.want)
		}
	}
}
