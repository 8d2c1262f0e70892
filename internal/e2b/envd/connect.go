package envd

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
)

// The Connect protocol (connectrpc.com), as E2B's SDK speaks it to envd:
// JSON encoding (the SDK sets useBinaryFormat: false), unary calls as a
// plain POST of application/json, server streams as application/connect+json
// bodies of enveloped messages: one flags byte, a 4-byte big-endian length,
// the JSON. The last envelope of a response stream has flag endStream and
// carries {} or {"error": {...}}.
const (
	flagCompressed = 0x01
	flagEndStream  = 0x02

	contentUnary  = "application/json"
	contentStream = "application/connect+json"
)

// maxMessage bounds one request message (a command with its arguments and
// environment, a path).
const maxMessage = 1 << 20

// code is a Connect error code.
type code string

const (
	codeInvalidArgument  code = "invalid_argument"
	codeNotFound         code = "not_found"
	codeAlreadyExists    code = "already_exists"
	codePermissionDenied code = "permission_denied"
	codeResourceExhaust  code = "resource_exhausted"
	codeFailedPrecond    code = "failed_precondition"
	codeUnimplemented    code = "unimplemented"
	codeInternal         code = "internal"
	codeUnavailable      code = "unavailable"
	codeUnauthenticated  code = "unauthenticated"
)

// httpStatus is the HTTP status of a unary error, as Connect maps it.
func (c code) httpStatus() int {
	switch c {
	case codeInvalidArgument, codeFailedPrecond:
		return 400
	case codeUnauthenticated:
		return 401
	case codePermissionDenied:
		return 403
	case codeNotFound:
		return 404
	case codeAlreadyExists:
		return 409
	case codeResourceExhaust:
		return 429
	case codeUnimplemented:
		return 501
	case codeUnavailable:
		return 503
	}
	return 500
}

// rpcError is a Connect error.
type rpcError struct {
	Code    code   `json:"code"`
	Message string `json:"message"`
}

func (e *rpcError) Error() string { return string(e.Code) + ": " + e.Message }

func errf(c code, format string, args ...any) *rpcError {
	return &rpcError{Code: c, Message: fmt.Sprintf(format, args...)}
}

// asRPC turns any error into a Connect error (internal unless it is one).
func asRPC(err error) *rpcError {
	var re *rpcError
	if errors.As(err, &re) {
		return re
	}
	return classify(err)
}

// execGone is the agent's answer about a workload it no longer tracks.
var execGone = regexp.MustCompile(`\bexec [0-9]+ not found\b`)

// classify maps an error from the guest agent, whose text is the guest
// kernel's, to a Connect code; the text reaches the client bounded.
func classify(err error) *rpcError {
	msg := err.Error()
	if len(msg) > 512 {
		msg = msg[:512] + "..."
	}
	switch {
	case errors.Is(err, client.ErrClosed):
		// The session ended under the call: the sandbox is pausing or gone.
		return &rpcError{Code: codeUnavailable, Message: "the sandbox's agent session ended during the call (is the sandbox paused?): " + msg}
	case execGone.MatchString(msg):
		// The guest forgot the workload: it has ended.
		return &rpcError{Code: codeNotFound, Message: "the process has ended: " + msg}
	case strings.Contains(msg, "writing stdin:") && strings.Contains(msg, "broken pipe"):
		return &rpcError{Code: codeFailedPrecond, Message: "the process has closed its input: " + msg}
	case strings.Contains(msg, "no such file or directory"):
		return &rpcError{Code: codeNotFound, Message: msg}
	case strings.Contains(msg, "not a directory"), strings.Contains(msg, "is a directory"), strings.Contains(msg, "not absolute"):
		return &rpcError{Code: codeInvalidArgument, Message: msg}
	case strings.Contains(msg, "permission denied"), strings.Contains(msg, "operation not permitted"):
		return &rpcError{Code: codePermissionDenied, Message: msg}
	case strings.Contains(msg, "file exists"):
		return &rpcError{Code: codeAlreadyExists, Message: msg}
	case strings.Contains(msg, "not found in /etc/passwd"):
		return &rpcError{Code: codeInvalidArgument, Message: msg}
	}
	return &rpcError{Code: codeInternal, Message: msg}
}

// readUnary reads a unary request's JSON body into v.
func readUnary(w http.ResponseWriter, r *http.Request, v any) *rpcError {
	if ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";"); strings.TrimSpace(ct) != contentUnary {
		return errf(codeInvalidArgument, "content type %q: kiln's envd speaks Connect with JSON (application/json)", ct)
	}
	if enc := r.Header.Get("Content-Encoding"); enc != "" && enc != "identity" {
		return errf(codeUnimplemented, "content encoding %q is not supported", enc)
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxMessage))
	if err != nil {
		return errf(codeResourceExhaust, "request message over %d bytes or unreadable: %v", maxMessage, err)
	}
	return decodeMessage(b, v)
}

// decodeMessage decodes a JSON message; an empty one is {}.
func decodeMessage(b []byte, v any) *rpcError {
	if len(b) == 0 {
		return nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errf(codeInvalidArgument, "request message is not valid JSON for this method: %v", err)
	}
	return nil
}

func writeUnary(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeUnaryError(w, errf(codeInternal, "encoding the answer: %v", err))
		return
	}
	w.Header().Set("Content-Type", contentUnary)
	w.Write(b)
}

func writeUnaryError(w http.ResponseWriter, e *rpcError) {
	w.Header().Set("Content-Type", contentUnary)
	w.WriteHeader(e.Code.httpStatus())
	json.NewEncoder(w).Encode(e)
}

// readEnvelope reads one enveloped message of at most max bytes.
func readEnvelope(r io.Reader, max int) (flags byte, msg []byte, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if uint64(n) > uint64(max) {
		return 0, nil, fmt.Errorf("message of %d bytes exceeds %d", n, max)
	}
	msg = make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return 0, nil, fmt.Errorf("message cut short: %w", err)
	}
	return hdr[0], msg, nil
}

// readStreamRequest reads the one request message of a server stream.
func readStreamRequest(r *http.Request, v any) *rpcError {
	if ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";"); strings.TrimSpace(ct) != contentStream {
		return errf(codeInvalidArgument, "content type %q: kiln's envd speaks Connect streams with JSON (application/connect+json)", ct)
	}
	flags, msg, err := readEnvelope(r.Body, maxMessage)
	if err != nil {
		return errf(codeInvalidArgument, "reading the request message: %v", err)
	}
	if flags&flagCompressed != 0 {
		return errf(codeUnimplemented, "compressed messages are not supported")
	}
	if flags&flagEndStream != 0 {
		return errf(codeInvalidArgument, "the request message carries the end-of-stream flag")
	}
	return decodeMessage(msg, v)
}

// stream writes a server stream's messages.
// streamWriteTimeout bounds writing one stream message to the client.
var streamWriteTimeout = 60 * time.Second // a var for the tests

type stream struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startStream(w http.ResponseWriter) *stream {
	w.Header().Set("Content-Type", contentStream)
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	// A command may run for long: no write deadline of the listener may
	// cut its stream (each write still fails when the client is gone).
	rc.SetWriteDeadline(time.Time{})
	rc.Flush()
	return &stream{w: w, rc: rc}
}

func (s *stream) envelope(flags byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var hdr [5]byte
	hdr[0] = flags
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(b)))
	// Each write is bounded: a client that stops reading but keeps its
	// connection would hold this handler and its process slot for ever.
	// (An idle stream is not cut: the deadline is set anew per message.)
	s.rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	if _, err := s.w.Write(append(hdr[:], b...)); err != nil {
		return err
	}
	return s.rc.Flush()
}

func (s *stream) send(v any) error { return s.envelope(0, v) }

// end closes the stream, with err if not nil.
func (s *stream) end(err *rpcError) error {
	if err == nil {
		return s.envelope(flagEndStream, struct{}{})
	}
	return s.envelope(flagEndStream, map[string]any{"error": err})
}
