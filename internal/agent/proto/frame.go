// Package proto is the wire protocol between the kiln host and the kiln-agent
// inside a guest. It does not depend on the transport: the same frames run
// over a virtio-serial port today and can run over vsock later.
//
// A frame is a 12-byte header (magic, payload length, CRC-32C of the payload,
// all big endian) followed by a JSON payload of at most MaxFrameSize bytes.
// The magic and the checksum let a reader resynchronise after garbage: a
// virtio-serial port may still hold bytes of an earlier host connection (for
// example a half-written frame from before a snapshot was restored).
//
// A session: the host connects and sends TypeHello with a random nonce (and
// repeats it every second until answered). Everything it reads before the
// answer carrying its nonce is stale and dropped. The agent, on a hello,
// drops what it had queued for the previous session and stops answering
// that session's requests (their ids may be reused). Requests carry an id
// and get exactly one TypeResponse with that id; they may be answered out of
// order (each runs concurrently in the agent). Workload output (TypeOutput)
// and ends (TypeExit) are events keyed by the agent-assigned exec id, which
// stays unique for the guest's whole life, so a later session (e.g. after
// a snapshot restore) still recognises the app's output. Copy streams move
// one acknowledged chunk per request, so no side ever buffers more than a
// chunk per stream.
package proto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

const (
	// Magic starts every frame ("KLN1").
	Magic uint32 = 0x4b4c4e31
	// HeaderSize is the size of the frame header in bytes.
	HeaderSize = 12
	// MaxFrameSize bounds a frame's payload. Readers reject larger frames, so a
	// misbehaving peer cannot make the other side allocate without limit.
	MaxFrameSize = 1 << 20
)

var (
	crcTable = crc32.MakeTable(crc32.Castagnoli)
	magicBuf = binary.BigEndian.AppendUint32(nil, Magic)

	// ErrFrameTooLarge is returned by WriteFrame for payloads over MaxFrameSize.
	ErrFrameTooLarge = errors.New("frame too large")
)

// AppendFrame appends the frame holding payload to dst.
func AppendFrame(dst, payload []byte) ([]byte, error) {
	if len(payload) > MaxFrameSize {
		return dst, fmt.Errorf("encoding frame of %d bytes: %w", len(payload), ErrFrameTooLarge)
	}
	dst = binary.BigEndian.AppendUint32(dst, Magic)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	dst = binary.BigEndian.AppendUint32(dst, crc32.Checksum(payload, crcTable))
	return append(dst, payload...), nil
}

// WriteFrame writes one frame with a single Write call, so that concurrent
// writers serialised by a mutex never interleave partial frames.
func WriteFrame(w io.Writer, payload []byte) error {
	buf, err := AppendFrame(make([]byte, 0, HeaderSize+len(payload)), payload)
	if err != nil {
		return err
	}
	_, err = w.Write(buf)
	return err
}

// Reader reads frames, skipping anything that is not a valid frame: bytes
// before a magic, headers announcing more than MaxFrameSize, and frames whose
// checksum does not match. It is not safe for concurrent use.
type Reader struct {
	br *bufio.Reader
	// skipped counts bytes discarded while resynchronising.
	skipped uint64
}

// NewReader returns a Reader on r. It buffers up to one full frame.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, HeaderSize+MaxFrameSize)}
}

// Reset drops buffered bytes and reads from src from now on, keeping the
// buffer: a new host session must not cost a fresh 1 MiB allocation (in a
// just-restored clone that allocation, and the GC it triggers, cost ~60 ms
// under TCG).
func (r *Reader) Reset(src io.Reader) {
	r.br.Reset(src)
	r.skipped = 0
}

// Skipped reports how many bytes were discarded as garbage so far.
func (r *Reader) Skipped() uint64 { return r.skipped }

// ReadFrame returns the payload of the next valid frame. The returned slice is
// owned by the caller. It returns the underlying reader's error (io.EOF at a
// clean end) when no further frame can be read.
func (r *Reader) ReadFrame() ([]byte, error) {
	for {
		if err := r.seekMagic(); err != nil {
			return nil, err
		}
		hdr, err := r.br.Peek(HeaderSize)
		if err != nil {
			return nil, r.tailErr(err)
		}
		n := binary.BigEndian.Uint32(hdr[4:8])
		sum := binary.BigEndian.Uint32(hdr[8:12])
		if n > MaxFrameSize {
			r.discard(1)
			continue
		}
		buf, err := r.br.Peek(HeaderSize + int(n))
		if err != nil {
			return nil, r.tailErr(err)
		}
		payload := buf[HeaderSize:]
		if crc32.Checksum(payload, crcTable) != sum {
			// A magic inside garbage or a truncated frame: rescan from the
			// byte after this magic so a real frame inside is not lost.
			r.discard(1)
			continue
		}
		out := make([]byte, n)
		copy(out, payload)
		_, _ = r.br.Discard(HeaderSize + int(n))
		return out, nil
	}
}

// seekMagic discards bytes until the buffer starts with Magic.
func (r *Reader) seekMagic() error {
	for {
		// Peek whatever is buffered (at least 4 bytes) and search it in one go.
		want := max(r.br.Buffered(), len(magicBuf))
		buf, err := r.br.Peek(want)
		if len(buf) < len(magicBuf) {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return r.tailErr(err)
		}
		i := bytes.Index(buf, magicBuf)
		if i == 0 {
			return nil
		}
		if i < 0 {
			// Keep the last 3 bytes: they may be the start of a magic.
			i = len(buf) - (len(magicBuf) - 1)
		}
		r.discard(i)
	}
}

func (r *Reader) discard(n int) {
	d, _ := r.br.Discard(n)
	r.skipped += uint64(d)
}

// tailErr turns the error of a short Peek into the error to report: a clean
// EOF in the middle of a frame is still an EOF for the caller (the peer went
// away), other errors pass through.
func (r *Reader) tailErr(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return io.EOF
	}
	return err
}
