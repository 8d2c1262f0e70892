// Package tunnel is the endpoint tunnel between `kiln edge` and `kiln
// node`: an edge opens one mutual-TLS connection per upstream connection,
// names the microVM and guest port in one small header, and after the
// node's OK the connection carries the guest port's bytes both ways.
//
// The header is binary and fixed in shape so that the node reads exactly
// its bytes (nothing of the stream is consumed early) and can refuse
// anything malformed before it looks anything up:
//
//	request  "KTUN" version(1) idLen(1) id(idLen) port(2, big endian)
//	reply    "KTUN" version(1) code(1) msgLen(1) msg(msgLen)
//
// The version is 1. An id is 1..MaxIDLen bytes of [a-z0-9-], not starting
// or ending with '-'; port 0 is refused. A reply's message is printable
// ASCII, at most MaxMsgLen bytes, and explains a refusal to a person.
package tunnel

import (
	"errors"
	"fmt"
	"io"
)

const (
	magic = "KTUN"
	// Version is the protocol version this package speaks. A node that
	// receives another answers CodeVersion with its own version.
	Version = 1
	// MaxIDLen bounds a microVM id (kiln's are "mvm-" and 20 hex digits).
	MaxIDLen = 64
	// MaxMsgLen bounds a reply's message.
	MaxMsgLen = 200

	reqFixed   = len(magic) + 2 // magic, version, idLen
	replyFixed = len(magic) + 3 // magic, version, code, msgLen
	// MaxRequestLen is the longest request header.
	MaxRequestLen = reqFixed + MaxIDLen + 2
)

// Code is a node's answer to a tunnel request.
type Code byte

const (
	CodeOK Code = iota
	// CodeNotFound: the node does not run that microVM (never did, moved,
	// terminated). The edge drops its route and looks the VM up again.
	CodeNotFound
	// CodeUnavailable: the node has the microVM but it is not running
	// (suspended, suspending, starting): wake it first.
	CodeUnavailable
	// CodeRefused: the microVM runs but its port could not be reached.
	CodeRefused
	// CodeBadRequest: the header was malformed.
	CodeBadRequest
	// CodeVersion: the node does not speak the request's version.
	CodeVersion
	codeEnd
)

// Errors a Dial returns, by the node's answer; a *ReplyError wraps them.
var (
	ErrNoSuchMicrovm = errors.New("the node does not run this microVM")
	ErrUnavailable   = errors.New("the microVM is not running on the node")
	ErrRefused       = errors.New("the microVM's port could not be reached")
	ErrBadRequest    = errors.New("the node refused the tunnel request as malformed")
	ErrVersion       = errors.New("the node speaks another tunnel protocol version")
	// ErrProtocol: the peer sent something that is not this protocol.
	ErrProtocol = errors.New("tunnel protocol violation")
)

var codeErrs = [...]error{CodeNotFound: ErrNoSuchMicrovm, CodeUnavailable: ErrUnavailable,
	CodeRefused: ErrRefused, CodeBadRequest: ErrBadRequest, CodeVersion: ErrVersion}

// ReplyError is a node's refusal: its code (as a sentinel error) and its
// explanation.
type ReplyError struct {
	Code Code
	Msg  string
}

func (e *ReplyError) Error() string {
	if e.Msg == "" {
		return codeErrs[e.Code].Error()
	}
	return codeErrs[e.Code].Error() + ": " + e.Msg
}

func (e *ReplyError) Unwrap() error { return codeErrs[e.Code] }

// Request names what the tunnel reaches.
type Request struct {
	ID   string
	Port uint16
}

// Reply is the node's answer.
type Reply struct {
	Version byte
	Code    Code
	Msg     string
}

func validID(id string) bool {
	if id == "" || len(id) > MaxIDLen || id[0] == '-' || id[len(id)-1] == '-' {
		return false
	}
	for _, c := range []byte(id) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func validMsg(m string) bool {
	if len(m) > MaxMsgLen {
		return false
	}
	for _, c := range []byte(m) {
		if c < ' ' || c > '~' {
			return false
		}
	}
	return true
}

// AppendRequest appends r's encoding to b.
func AppendRequest(b []byte, r Request) ([]byte, error) {
	if !validID(r.ID) {
		return b, fmt.Errorf("tunnel: microVM id %q is not 1-%d characters of a-z, 0-9 and '-'", r.ID, MaxIDLen)
	}
	if r.Port == 0 {
		return b, errors.New("tunnel: port 0 cannot be reached")
	}
	b = append(b, magic...)
	b = append(b, Version, byte(len(r.ID)))
	b = append(b, r.ID...)
	return append(b, byte(r.Port>>8), byte(r.Port)), nil
}

// errVersion is ReadRequest's answer to a well-formed prefix of another
// version: the node answers CodeVersion rather than CodeBadRequest.
type errVersion struct{ got byte }

func (e errVersion) Error() string {
	return fmt.Sprintf("tunnel: request of protocol version %d, this node speaks %d", e.got, Version)
}

// ReadRequest reads exactly one request header from r, never more bytes
// than it has.
func ReadRequest(r io.Reader) (Request, error) {
	var fixed [reqFixed]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return Request{}, fmt.Errorf("tunnel: reading request header: %w", err)
	}
	if string(fixed[:len(magic)]) != magic {
		return Request{}, fmt.Errorf("%w: request does not start with %q", ErrProtocol, magic)
	}
	if v := fixed[len(magic)]; v != Version {
		return Request{}, errVersion{v}
	}
	n := int(fixed[len(magic)+1])
	if n == 0 || n > MaxIDLen {
		return Request{}, fmt.Errorf("%w: microVM id length %d (1-%d)", ErrProtocol, n, MaxIDLen)
	}
	var rest [MaxIDLen + 2]byte
	if _, err := io.ReadFull(r, rest[:n+2]); err != nil {
		return Request{}, fmt.Errorf("tunnel: reading request header: %w", err)
	}
	req := Request{ID: string(rest[:n]), Port: uint16(rest[n])<<8 | uint16(rest[n+1])}
	if !validID(req.ID) {
		return Request{}, fmt.Errorf("%w: microVM id %q is not a-z, 0-9 and '-'", ErrProtocol, req.ID)
	}
	if req.Port == 0 {
		return Request{}, fmt.Errorf("%w: port 0", ErrProtocol)
	}
	return req, nil
}

// AppendReply appends r's encoding to b; a message that is too long or
// not printable ASCII is cut or dropped rather than refused, since it
// only explains the code.
func AppendReply(b []byte, r Reply) []byte {
	msg := r.Msg
	if len(msg) > MaxMsgLen {
		msg = msg[:MaxMsgLen]
	}
	if !validMsg(msg) {
		msg = ""
	}
	b = append(b, magic...)
	b = append(b, r.Version, byte(r.Code), byte(len(msg)))
	return append(b, msg...)
}

// ReadReply reads exactly one reply header from r.
func ReadReply(r io.Reader) (Reply, error) {
	var fixed [replyFixed]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return Reply{}, fmt.Errorf("tunnel: reading the node's reply: %w", err)
	}
	if string(fixed[:len(magic)]) != magic {
		return Reply{}, fmt.Errorf("%w: reply does not start with %q", ErrProtocol, magic)
	}
	rep := Reply{Version: fixed[len(magic)], Code: Code(fixed[len(magic)+1])}
	if rep.Code >= codeEnd {
		return Reply{}, fmt.Errorf("%w: unknown reply code %d", ErrProtocol, rep.Code)
	}
	if rep.Version != Version && rep.Code != CodeVersion {
		return Reply{}, fmt.Errorf("%w: reply of version %d to a version %d request", ErrProtocol, rep.Version, Version)
	}
	n := int(fixed[len(magic)+2])
	if n > MaxMsgLen {
		return Reply{}, fmt.Errorf("%w: reply message of %d bytes (at most %d)", ErrProtocol, n, MaxMsgLen)
	}
	var msg [MaxMsgLen]byte
	if _, err := io.ReadFull(r, msg[:n]); err != nil {
		return Reply{}, fmt.Errorf("tunnel: reading the node's reply: %w", err)
	}
	rep.Msg = string(msg[:n])
	if !validMsg(rep.Msg) {
		return Reply{}, fmt.Errorf("%w: reply message is not printable ASCII", ErrProtocol)
	}
	return rep, nil
}
