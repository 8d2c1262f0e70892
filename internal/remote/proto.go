// Package remote is `kiln exec` and `kiln cp` for AWS-API users: commands
// and file copies in a microVM over the same WebSocket as `kiln shell`
// (the endpoint's port 8022, a shell token, SHELL_INGRESS), which the
// engine bridges to the guest agent's exec and copy requests, as it does
// for the shell and as envd does for E2B. This file is the wire format
// both ends share; client.go is the client half.
//
// The socket's path picks the operation (any other path is the shell):
//
//	/exec      first a text frame ExecRequest; then binary frames are
//	           stdin, text frames Control (resize, end of stdin). The
//	           server sends binary frames of one stream byte (Stdout,
//	           Stderr) and the output.
//	/copy-out  first a text frame CopyRequest; the server sends the tar
//	           stream of the path (entries under its base name) as
//	           binary frames.
//	/copy-in   first a text frame CopyRequest; the server answers with a
//	           text frame CopyInfo; the client sends a tar stream as
//	           binary frames, then Control{EOF: true}.
//
// Every operation ends with a normal closure whose reason is "exit N" (the
// command's exit status; 0 for a finished copy), or another close code
// whose reason says what failed.
package remote

import (
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"strings"
)

// Socket paths.
const (
	PathExec    = "/exec"
	PathCopyOut = "/copy-out"
	PathCopyIn  = "/copy-in"
)

// Stream bytes of the server's output frames.
const (
	Stdout byte = 1
	Stderr byte = 2
)

// MaxMessage bounds one frame either way: a copy chunk of the agent
// (512 KiB) and its stream byte fit.
const MaxMessage = 1 << 20

// Bounds of an ExecRequest: what the kernel's argv and environment take.
const (
	maxArgs     = 4096
	maxArgBytes = 256 << 10
	maxPath     = 4096
	maxSide     = 4096 // terminal columns or rows
)

// ExecRequest starts a command. It runs as root, like the shell.
type ExecRequest struct {
	Argv []string `json:"argv"`
	// Env is KEY=VALUE pairs added to the defaults (PATH, HOME, TERM).
	Env []string `json:"env,omitempty"`
	// Cwd is an absolute path; "" is /.
	Cwd string `json:"cwd,omitempty"`
	// Stdin forwards the client's binary frames to the command's stdin;
	// without it stdin is /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// TTY runs the command on a terminal of Cols x Rows (stdout and
	// stderr merged, sent as Stdout).
	TTY  bool   `json:"tty,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
}

// ParseExecRequest decodes and checks a client's first /exec frame.
func ParseExecRequest(b []byte) (ExecRequest, error) {
	var r ExecRequest
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("exec request: %w", err)
	}
	if len(r.Argv) == 0 || r.Argv[0] == "" {
		return r, errors.New("exec request: argv is empty; give the command to run")
	}
	if len(r.Argv)+len(r.Env) > maxArgs {
		return r, fmt.Errorf("exec request: at most %d arguments and environment entries", maxArgs)
	}
	n := 0
	for _, a := range r.Argv {
		n += len(a) + 1
		if strings.ContainsRune(a, 0) {
			return r, errors.New("exec request: an argument holds a NUL byte")
		}
	}
	for _, kv := range r.Env {
		n += len(kv) + 1
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsRune(kv, 0) {
			return r, fmt.Errorf("exec request: environment entry %.64q is not KEY=VALUE", kv)
		}
	}
	if n > maxArgBytes {
		return r, fmt.Errorf("exec request: arguments and environment hold %d bytes; at most %d", n, maxArgBytes)
	}
	if r.Cwd != "" {
		if err := checkPath(r.Cwd); err != nil {
			return r, fmt.Errorf("exec request: cwd: %w", err)
		}
	}
	if r.TTY && (r.Cols == 0 || r.Rows == 0 || r.Cols > maxSide || r.Rows > maxSide) {
		return r, fmt.Errorf("exec request: a tty needs cols and rows from 1 to %d", maxSide)
	}
	return r, nil
}

// Control is a text frame of the client after its request: a terminal
// size, or the end of stdin (of the tar stream for /copy-in).
type Control struct {
	Cols uint16 `json:"cols,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	EOF  bool   `json:"eof,omitempty"`
}

// ParseControl decodes a control frame. A size must have both sides; the
// shell's resize frames ({"cols":N,"rows":N}) are controls too.
func ParseControl(b []byte) (Control, error) {
	var c Control
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("control message: %w", err)
	}
	if (c.Cols == 0) != (c.Rows == 0) || c.Cols > maxSide || c.Rows > maxSide {
		return c, fmt.Errorf("control message: a size needs cols and rows from 1 to %d", maxSide)
	}
	return c, nil
}

// CopyRequest names the guest path of a copy: the file or directory to
// send (/copy-out) or the destination (/copy-in).
type CopyRequest struct {
	Path string `json:"path"`
}

// ParseCopyRequest decodes and checks a client's first copy frame.
func ParseCopyRequest(b []byte) (CopyRequest, error) {
	var r CopyRequest
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("copy request: %w", err)
	}
	if err := checkPath(r.Path); err != nil {
		return r, fmt.Errorf("copy request: %w", err)
	}
	r.Path = path.Clean(r.Path)
	return r, nil
}

// CopyInfo answers a /copy-in request: whether the destination exists
// and is a directory. Into an existing directory the tar's top entry
// keeps its name; otherwise the server extracts into the destination's
// parent and the client names the top entry after the destination.
type CopyInfo struct {
	Exists bool `json:"exists"`
	Dir    bool `json:"dir"`
}

// ExtractDir is where the server extracts a /copy-in tar for dst.
func (i CopyInfo) ExtractDir(dst string) string {
	if i.Exists && i.Dir {
		return dst
	}
	return path.Dir(dst)
}

// TopName is the name the tar's top entry must have for dst; local is
// the base name of what the client sends.
func (i CopyInfo) TopName(dst, local string) string {
	if i.Exists && i.Dir {
		return local
	}
	return path.Base(dst)
}

func checkPath(p string) error {
	switch {
	case !path.IsAbs(p):
		return fmt.Errorf("path %.64q is not absolute", p)
	case len(p) > maxPath:
		return fmt.Errorf("path longer than %d bytes", maxPath)
	case strings.ContainsRune(p, 0):
		return errors.New("path holds a NUL byte")
	}
	return nil
}

// EncodeOutput frames a chunk of a command's output.
func EncodeOutput(stream byte, data []byte) []byte {
	return append([]byte{stream}, data...)
}

// DecodeOutput reads an output frame.
func DecodeOutput(b []byte) (stream byte, data []byte, err error) {
	if len(b) == 0 || (b[0] != Stdout && b[0] != Stderr) {
		return 0, nil, errors.New("output frame without a stream byte")
	}
	return b[0], b[1:], nil
}

// ExitReason is the close reason of a finished operation.
func ExitReason(code int) string { return fmt.Sprintf("exit %d", code) }
