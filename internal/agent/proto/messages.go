package proto

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
)

// Version is the protocol version. Host and agent refuse to talk when their
// versions differ: they ship together (the agent is built into the initramfs
// of the same kiln binary), so a mismatch means a stale snapshot or image.
const Version = 1

// MaxChunk bounds the data carried by one output, stdin or copy message, so
// that a chunk (base64 in JSON) always fits in one frame.
const MaxChunk = 64 << 10

// MaxHTTPBody bounds the response body the agent returns for an HTTP request.
const MaxHTTPBody = 512 << 10

// MaxCopyChunk bounds one chunk of a copy stream (base64 in JSON: 683 KiB).
const MaxCopyChunk = 512 << 10

// Type names a message.
type Type string

// Requests (host → guest). Each carries an ID; the guest answers each with
// exactly one TypeResponse carrying the same ID.
const (
	TypeHello       Type = "hello"
	TypePing        Type = "ping"
	TypeExec        Type = "exec"
	TypeStdin       Type = "stdin"
	TypeResize      Type = "resize"
	TypeSignal      Type = "signal"
	TypeFreeze      Type = "freeze"
	TypeRestore     Type = "restore"
	TypeShutdown    Type = "shutdown"
	TypeWaitPort    Type = "wait_port"
	TypeHTTP        Type = "http"
	TypeCopyInOpen  Type = "copy_in_open"
	TypeCopyInData  Type = "copy_in_data"
	TypeCopyOutOpen Type = "copy_out_open"
	TypeCopyOutRead Type = "copy_out_read"
	TypeStreamClose Type = "stream_close"
	TypeListDir     Type = "list_dir"
	TypeMount       Type = "mount"
	TypeUnmount     Type = "unmount"
	// TypeRootDisk asks an agent that booted with kiln.root=defer to
	// mount its root disk now (RootDiskRequest).
	TypeRootDisk Type = "root_disk"
)

// Messages from the guest.
const (
	// TypeResponse answers the request with the same ID.
	TypeResponse Type = "response"
	// TypeOutput carries a chunk of a workload's stdout or stderr (Output).
	TypeOutput Type = "output"
	// TypeExit reports that a workload ended (Exit). It follows the last
	// TypeOutput of that workload.
	TypeExit Type = "exit"
)

// Message is the payload of every frame.
type Message struct {
	Type Type `json:"t"`
	// ID is the request ID; a response repeats it. Events carry 0.
	ID uint64 `json:"id,omitempty"`
	// Error is set on a failed response.
	Error string          `json:"err,omitempty"`
	Body  json.RawMessage `json:"b,omitempty"`
	// Data is the message's bulk bytes (output, stdin, copy chunks). It
	// travels raw after the JSON, not base64 inside it: under TCG the JSON
	// route capped copies at a few MB/s of guest CPU.
	Data []byte `json:"-"`
}

// dataSep separates the JSON of a frame payload from its raw Data. JSON
// text never holds a raw NUL byte (it must be escaped), so the first NUL
// ends the JSON.
const dataSep = 0

// Encode marshals a message with body v (nil for none) into a frame payload.
func Encode(t Type, id uint64, errMsg string, v any) ([]byte, error) {
	return EncodeData(t, id, errMsg, v, nil)
}

// EncodeData is Encode with bulk bytes attached (Message.Data).
func EncodeData(t Type, id uint64, errMsg string, v any, data []byte) ([]byte, error) {
	m := Message{Type: t, ID: id, Error: errMsg}
	if v != nil {
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("encoding %s body: %w", t, err)
		}
		m.Body = b
	}
	out, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if data != nil {
		out = append(append(out, dataSep), data...)
	}
	return out, nil
}

// Decode unmarshals a frame payload.
func Decode(payload []byte) (Message, error) {
	var m Message
	js, data, hasData := bytes.Cut(payload, []byte{dataSep})
	if err := json.Unmarshal(js, &m); err != nil {
		return m, fmt.Errorf("decoding message: %w", err)
	}
	if m.Type == "" {
		return m, fmt.Errorf("decoding message: missing type")
	}
	if hasData {
		m.Data = data
	}
	return m, nil
}

// DecodeBody unmarshals a message body into v. An empty body leaves v as is.
func DecodeBody(m Message, v any) error {
	if len(m.Body) == 0 {
		return nil
	}
	if err := json.Unmarshal(m.Body, v); err != nil {
		return fmt.Errorf("decoding %s body: %w", m.Type, err)
	}
	return nil
}

// Hello opens a session. The nonce lets the host tell the answer to this hello
// from stale frames left on the channel by an earlier session.
type Hello struct {
	Version int    `json:"version"`
	Nonce   string `json:"nonce"`
	// Restore, when set, refreshes the guest's identity before the answer,
	// saving a round trip on the start of a clone: under TCG each request a
	// freshly restored guest handles costs tens of milliseconds of code
	// translation.
	Restore *RestoreRequest `json:"restore,omitempty"`
}

// HelloResult answers Hello.
type HelloResult struct {
	Version int    `json:"version"`
	Nonce   string `json:"nonce"`
	// BootID is the guest kernel's boot id; clones of one snapshot share it.
	BootID string `json:"boot_id,omitempty"`
	// Frozen reports whether workloads are frozen (a restored snapshot).
	Frozen bool `json:"frozen,omitempty"`
}

// ExecRequest starts a workload.
type ExecRequest struct {
	Argv []string `json:"argv"`
	// Env is KEY=VALUE pairs. PATH defaults to the usual Linux path and HOME
	// to the user's home directory when absent.
	Env []string `json:"env,omitempty"`
	// Cwd defaults to the user's home directory, or "/".
	Cwd string `json:"cwd,omitempty"`
	// User is "name", "uid", "name:group" or "uid:gid"; empty means root.
	User string `json:"user,omitempty"`
	// Stdin keeps a pipe to the workload's stdin open for TypeStdin;
	// otherwise stdin is /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// TTY runs the workload on a pseudo-terminal (stdout and stderr merged).
	TTY  bool   `json:"tty,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	// Background marks a long-running workload (the app): its output is a
	// log stream that outlives the host session that started it.
	Background bool `json:"background,omitempty"`
	// Caps is the workload's capability set: "" or CapsAll keeps every
	// capability (kiln's own commands; an image with
	// additionalOsCapabilities ALL), CapsDefault the restricted default
	// set (guest.DefaultCapabilities) for the workload and every process
	// it starts.
	Caps string `json:"caps,omitempty"`
}

// Capability sets of ExecRequest.Caps.
const (
	CapsAll     = "all"
	CapsDefault = "default"
)

// ExecResult answers ExecRequest.
type ExecResult struct {
	ExecID uint64 `json:"exec_id"`
	Pid    int    `json:"pid"`
}

// Stream names an output stream.
type Stream string

const (
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
)

// Output is a chunk of a workload's output.
type Output struct {
	ExecID uint64 `json:"exec_id"`
	Stream Stream `json:"stream"`
	// Data travels as Message.Data.
	Data []byte    `json:"-"`
	Time time.Time `json:"time"`
	// Dropped counts bytes of this stream dropped before this chunk because
	// the host did not keep up (the guest never blocks a workload on output).
	Dropped uint64 `json:"dropped,omitempty"`
	// Background is true for workloads started with ExecRequest.Background.
	Background bool `json:"background,omitempty"`
}

// Exit reports the end of a workload.
type Exit struct {
	ExecID uint64 `json:"exec_id"`
	// Code is the exit status, or 128+signal when killed by a signal.
	Code int `json:"code"`
	// Signal is the terminating signal, 0 when the workload exited.
	Signal     int       `json:"signal,omitempty"`
	Time       time.Time `json:"time"`
	Background bool      `json:"background,omitempty"`
}

// LogRecord is output of a workload that no caller waits on: a background
// workload (the app), or a workload whose session ended. ExitCode is set on
// the record that reports the workload's end (then Data is empty).
type LogRecord struct {
	ExecID   uint64    `json:"exec_id"`
	Stream   Stream    `json:"stream"`
	Data     []byte    `json:"data"`
	Time     time.Time `json:"time"`
	Dropped  uint64    `json:"dropped,omitempty"`
	ExitCode *int      `json:"exit_code,omitempty"`
}

// StdinRequest writes to a workload's stdin, or closes it.
type StdinRequest struct {
	ExecID uint64 `json:"exec_id"`
	// Data travels as Message.Data.
	Data  []byte `json:"-"`
	Close bool   `json:"close,omitempty"`
}

// ResizeRequest sets a TTY workload's window size.
type ResizeRequest struct {
	ExecID uint64 `json:"exec_id"`
	Cols   uint16 `json:"cols"`
	Rows   uint16 `json:"rows"`
}

// SignalRequest sends a signal to a workload.
type SignalRequest struct {
	ExecID uint64 `json:"exec_id"`
	Signal int    `json:"signal"`
}

// RestoreRequest refreshes the guest's identity after a clone or resume and
// then thaws the workloads.
type RestoreRequest struct {
	// Entropy is mixed into the kernel RNG (RNDADDENTROPY) before a reseed.
	Entropy  []byte `json:"entropy"`
	UnixNano int64  `json:"unix_nano"`
	Hostname string `json:"hostname,omitempty"`
}

// MinEntropy is the least entropy a RestoreRequest must carry.
const MinEntropy = 32

// ShutdownRequest stops the guest.
type ShutdownRequest struct {
	// GraceMillis is how long workloads get between SIGTERM and SIGKILL.
	GraceMillis int64 `json:"grace_ms,omitempty"`
}

// WaitPortRequest waits until something accepts TCP on 127.0.0.1:Port.
type WaitPortRequest struct {
	Port          int   `json:"port"`
	TimeoutMillis int64 `json:"timeout_ms"`
}

// HTTPRequest is an HTTP request the agent makes to 127.0.0.1:Port.
type HTTPRequest struct {
	Port          int    `json:"port"`
	Method        string `json:"method"`
	Path          string `json:"path"`
	Body          []byte `json:"body,omitempty"`
	TimeoutMillis int64  `json:"timeout_ms"`
}

// HTTPResult answers HTTPRequest. Body holds at most MaxHTTPBody bytes.
type HTTPResult struct {
	Status    int    `json:"status"`
	Body      []byte `json:"body,omitempty"`
	Truncated bool   `json:"truncated,omitempty"`
}

// CopyInOpen starts extracting a tar stream into Dir (created if missing).
// The answer is a StreamResult; the host then sends TypeCopyInData chunks,
// each answered once written, the last one with EOF set.
type CopyInOpen struct {
	Dir string `json:"dir"`
	// User, when set, extracts as that user (see FileOpRequest): the
	// user's permissions apply and what is made belongs to the user.
	User string `json:"user,omitempty"`
}

// CopyOutOpen starts a tar stream of Path (a file or a directory). The host
// pulls it with TypeCopyOutRead until EOF.
type CopyOutOpen struct {
	Path string `json:"path"`
	// User, when set, reads as that user (see FileOpRequest).
	User string `json:"user,omitempty"`
}

// StreamResult answers an open request.
type StreamResult struct {
	StreamID uint64 `json:"stream_id"`
}

// StreamData is a chunk of a copy stream, in either direction.
type StreamData struct {
	StreamID uint64 `json:"stream_id"`
	// Data travels as Message.Data.
	Data []byte `json:"-"`
	EOF  bool   `json:"eof,omitempty"`
}

// StreamClose aborts a copy stream.
type StreamClose struct {
	StreamID uint64 `json:"stream_id"`
}

// MaxListEntries bounds the entries one ListDirRequest returns.
const MaxListEntries = 10000

// MaxListDepth bounds how deep one ListDirRequest descends.
const MaxListDepth = 16

// ListDirRequest lists Path (absolute): with Depth 0 the entry of Path
// itself, else the entries under it down to Depth levels, at most
// MaxListEntries (then Truncated). Symbolic links are reported, never
// followed. The agent lists as User (see ExecRequest.User; "" is root),
// so a user sees only what the kernel lets them.
type ListDirRequest struct {
	Path  string `json:"path"`
	Depth int    `json:"depth"`
	User  string `json:"user,omitempty"`
}

// File types of DirEntry.Type.
const (
	FileRegular = "file"
	FileDir     = "dir"
	FileSymlink = "symlink"
	FileOther   = "other"
)

// DirEntry is one file system entry.
type DirEntry struct {
	Name    string    `json:"name"`
	Path    string    `json:"path"`
	Type    string    `json:"type"`
	Size    int64     `json:"size"`
	Mode    uint32    `json:"mode"` // permission and set-id bits
	UID     uint32    `json:"uid"`
	GID     uint32    `json:"gid"`
	Owner   string    `json:"owner,omitempty"`
	Group   string    `json:"group,omitempty"`
	ModTime time.Time `json:"mtime"`
	Target  string    `json:"target,omitempty"` // of a symlink
}

// ListDirResult answers ListDirRequest.
type ListDirResult struct {
	Entries   []DirEntry `json:"entries"`
	Truncated bool       `json:"truncated,omitempty"`
}

// MaxMounts bounds the mounts of one MountRequest.
const MaxMounts = 16

// Kinds of MountSpec.
const (
	// MountDisk is an ext4 file system on a virtio disk the host attached
	// to the VM, found by its serial.
	MountDisk = "disk"
	// MountTmpfs is an empty tmpfs.
	MountTmpfs = "tmpfs"
)

// MountRequest mounts file systems into the guest's root for a build step
// (RUN --mount): the host sends it before the step's exec and
// UnmountRequest after. One set of mounts at a time.
type MountRequest struct {
	Mounts []MountSpec `json:"mounts"`
}

// MountSpec is one mount of a MountRequest.
type MountSpec struct {
	Kind string `json:"kind"`
	// Serial names the disk (MountDisk): its virtio serial.
	Serial string `json:"serial,omitempty"`
	// Sub is the path in the disk's file system shown at Target; "" = its
	// root. A file is shown as a file.
	Sub string `json:"sub,omitempty"`
	// Target is the absolute path in the guest's root; the agent creates
	// it (a folder, or an empty file for a file) when missing.
	Target   string `json:"target"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// Init, for a disk the host just made: its root folder gets Mode,
	// UID and GID, and mkfs's lost+found goes.
	Init bool   `json:"init,omitempty"`
	Mode uint32 `json:"mode,omitempty"`
	UID  uint32 `json:"uid,omitempty"`
	GID  uint32 `json:"gid,omitempty"`
	// SizeBytes bounds a tmpfs; 0 = the kernel's default (half of RAM).
	SizeBytes int64 `json:"size_bytes,omitempty"`
}

// UnmountRequest undoes the MountRequest.
type UnmountRequest struct{}

// RootDiskRequest finishes the boot of a guest started with
// kiln.root=defer (the kernel booted to the initramfs, then was
// snapshotted): load the block driver, mount /dev/vda and switch root to
// it. The disks are first probed here, after the restore, so the guest
// sees the sizes and contents of this VM's disks, never the template's.
// A second request fails.
type RootDiskRequest struct{}

// UnmountResult reports, in the MountRequest's order, how full each disk
// was before it went.
type UnmountResult struct {
	Usage []MountUsage `json:"usage"`
}

// MountUsage is what statfs said about one mount.
type MountUsage struct {
	Target      string `json:"target"`
	TotalBytes  uint64 `json:"total_bytes"`
	FreeBytes   uint64 `json:"free_bytes"`
	FreeInodes  uint64 `json:"free_inodes"`
	TotalInodes uint64 `json:"total_inodes"`
}
