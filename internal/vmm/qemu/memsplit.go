//go:build linux

package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// A clone maps its template privately (copy-on-write), and QEMU's
// x-ignore-shared skips only shared mappings, so saving a clone streams
// all of its memory. Loading such a stream copies it back page by page,
// which is what makes a plain resume slow. Instead kiln receives the
// stream itself and splits it: the pages of guest RAM go straight into a
// plain memory file at their offsets, everything else into a device-state
// file. That state file is exactly what QEMU writes for a VM whose memory
// is a shared file, so the next start maps the memory file (share=on) and
// loads only device state.
//
// The parser knows QEMU's RAM section records (migration/ram.c); the
// device sections after them are copied verbatim. Streams use neither
// multifd, compression, xbzrle, mapped-ram nor postcopy.

const (
	qemuMagic = 0x5145564d // "QEVM"

	secStart   = 0x01
	secPart    = 0x02
	secEnd     = 0x03
	secCommand = 0x08
	secFooter  = 0x7e

	flagZero         = 0x02
	flagMemSize      = 0x04
	flagPage         = 0x08
	flagEOS          = 0x10
	flagContinue     = 0x20
	flagMultifdFlush = 0x200
	flagMask         = 0xfff

	pageSize = 4096
)

// splitStats says what the split moved where.
type splitStats struct {
	MemPages   int64 // RAM pages written to the memory file
	StateBytes int64
}

// splitStream reads a migration stream from r. Pages of the RAM block
// named block go into mem at their offset; the rest goes to state. mem
// must be a fresh file of the block's size (zero pages stay holes).
func splitStream(r io.Reader, state io.Writer, mem *os.File, block string) (splitStats, error) {
	var st splitStats
	br := bufio.NewReaderSize(r, 1<<20)
	cw := &countWriter{w: state}
	w := bufio.NewWriterSize(cw, 256<<10)
	fi, err := mem.Stat()
	if err != nil {
		return st, err
	}
	sp := &splitter{r: br, w: w, mem: mem, block: block, size: fi.Size()}
	if err := sp.copyUntilRAM(); err != nil {
		return st, err
	}
	if err := sp.ramSections(); err != nil {
		return st, err
	}
	if err := sp.flushRun(); err != nil {
		return st, err
	}
	// Device state follows RAM; it is passed through untouched.
	if _, err := io.Copy(w, br); err != nil {
		return st, fmt.Errorf("copying device state: %w", err)
	}
	if err := w.Flush(); err != nil {
		return st, err
	}
	st.MemPages, st.StateBytes = sp.pages, cw.n
	return st, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type splitter struct {
	r     *bufio.Reader
	w     *bufio.Writer
	mem   *os.File
	block string
	size  int64 // of the memory file; pages past it are refused

	lastBlock string // block of the previous page record (for CONTINUE)
	pages     int64

	// run coalesces consecutive pages into one write.
	run    []byte
	runOff int64
}

// ramSignature is how the RAM section's start looks: name "ram", instance
// 0, version 4, then the MEM_SIZE record.
var ramSignature = []byte("\x03ram\x00\x00\x00\x00\x00\x00\x00\x04")

// copyUntilRAM passes the stream header and configuration section
// through and stops at the RAM section's start.
func (s *splitter) copyUntilRAM() error {
	head, err := s.r.Peek(8)
	if err != nil {
		return fmt.Errorf("reading stream header: %w", err)
	}
	if binary.BigEndian.Uint32(head) != qemuMagic {
		return errors.New("not a QEMU migration stream")
	}
	// The configuration section is small; look for RAM within 64 KiB.
	buf, _ := s.r.Peek(64 << 10)
	i := bytes.Index(buf, ramSignature)
	if i < 5 || buf[i-5] != secStart {
		return errors.New("RAM section not found at the start of the stream")
	}
	start := i - 5
	if _, err := io.CopyN(s.w, s.r, int64(start)); err != nil {
		return err
	}
	// Section header: type, id, name, instance, version.
	if _, err := io.CopyN(s.w, s.r, 5+1+3+4+4); err != nil {
		return err
	}
	return nil
}

// ramSections handles the RAM section's start (already entered) and its
// PART/END sections, and returns when the next section is not RAM's.
func (s *splitter) ramSections() error {
	for {
		if err := s.records(); err != nil {
			return err
		}
		if b, err := s.r.Peek(1); err == nil && b[0] == secFooter {
			if _, err := io.CopyN(s.w, s.r, 5); err != nil {
				return err
			}
		}
		b, err := s.r.Peek(1)
		if err != nil {
			return fmt.Errorf("stream ends inside RAM: %w", err)
		}
		// A command (e.g. switchover-start) may come between RAM
		// sections: type, command, length, data.
		for b[0] == secCommand {
			c, err := s.r.Peek(5)
			if err != nil {
				return err
			}
			if _, err := io.CopyN(s.w, s.r, 5+int64(binary.BigEndian.Uint16(c[3:5]))); err != nil {
				return err
			}
			if b, err = s.r.Peek(1); err != nil {
				return fmt.Errorf("stream ends inside RAM: %w", err)
			}
		}
		if b[0] != secPart && b[0] != secEnd {
			return nil
		}
		if _, err := io.CopyN(s.w, s.r, 5); err != nil { // type + section id
			return err
		}
	}
}

// records processes records up to and including EOS.
func (s *splitter) records() error {
	var hb [8]byte
	for {
		if _, err := io.ReadFull(s.r, hb[:]); err != nil {
			return fmt.Errorf("reading RAM record: %w", err)
		}
		h := binary.BigEndian.Uint64(hb[:])
		flags, addr := h&flagMask, h&^uint64(flagMask)
		switch {
		case flags&flagMemSize != 0:
			s.w.Write(hb[:])
			if err := s.blockList(addr); err != nil {
				return err
			}
		case flags&flagEOS != 0:
			s.w.Write(hb[:])
			return nil
		case flags&flagMultifdFlush != 0:
			s.w.Write(hb[:])
		case flags&(flagZero|flagPage) != 0:
			if err := s.page(hb, flags, int64(addr)); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unsupported RAM record flags %#x", flags)
		}
	}
}

// blockList copies the list of RAM blocks (name, length, address).
func (s *splitter) blockList(total uint64) error {
	for total > 0 {
		name, raw, err := s.readName()
		if err != nil {
			return err
		}
		var lb [16]byte // used length, then GPA (x-ignore-shared is on)
		if _, err := io.ReadFull(s.r, lb[:]); err != nil {
			return err
		}
		n := binary.BigEndian.Uint64(lb[:8])
		if n > total {
			return fmt.Errorf("RAM block %q larger than the total", name)
		}
		total -= n
		s.w.Write(raw)
		s.w.Write(lb[:])
	}
	return nil
}

func (s *splitter) readName() (string, []byte, error) {
	l, err := s.r.ReadByte()
	if err != nil {
		return "", nil, err
	}
	raw := make([]byte, 1+int(l))
	raw[0] = l
	if _, err := io.ReadFull(s.r, raw[1:]); err != nil {
		return "", nil, err
	}
	return string(raw[1:]), raw, nil
}

func (s *splitter) page(hb [8]byte, flags uint64, addr int64) error {
	blk := s.lastBlock
	var raw []byte
	if flags&flagContinue == 0 {
		name, r, err := s.readName()
		if err != nil {
			return err
		}
		blk, raw = name, r
	}
	s.lastBlock = blk
	if blk != s.block {
		s.w.Write(hb[:])
		s.w.Write(raw)
		if flags&flagZero != 0 {
			_, err := io.CopyN(s.w, s.r, 1)
			return err
		}
		_, err := io.CopyN(s.w, s.r, pageSize)
		return err
	}
	if addr < 0 || addr+pageSize > s.size {
		return fmt.Errorf("page at %#x lies outside guest memory (%d bytes)", addr, s.size)
	}
	if flags&flagZero != 0 {
		_, err := s.r.Discard(1) // the file is zero there already
		return err
	}
	if s.runOff+int64(len(s.run)) != addr || len(s.run)+pageSize > 1<<20 {
		if err := s.flushRun(); err != nil {
			return err
		}
		s.runOff = addr
	}
	if s.run == nil {
		s.run = make([]byte, 0, 1<<20)
	}
	n := len(s.run)
	s.run = s.run[:n+pageSize]
	if _, err := io.ReadFull(s.r, s.run[n:]); err != nil {
		return err
	}
	s.pages++
	return nil
}

func (s *splitter) flushRun() error {
	if len(s.run) == 0 {
		return nil
	}
	_, err := s.mem.WriteAt(s.run, s.runOff)
	s.run = s.run[:0]
	return err
}

// saveSplit saves a paused VM whose RAM block "mem0" is private: QEMU
// streams into one end of a socket pair (handed over as a descriptor, as
// QEMU runs unprivileged), and kiln splits the stream into statePath and
// memPath.
func saveSplit(ctx context.Context, v *vm, statePath, memPath string) (splitStats, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return splitStats{}, err
	}
	qemuEnd := os.NewFile(uintptr(fds[1]), "migration (qemu)")
	defer qemuEnd.Close()
	ourEnd := os.NewFile(uintptr(fds[0]), "migration (kiln)")
	c, err := net.FileConn(ourEnd)
	ourEnd.Close()
	if err != nil {
		return splitStats{}, err
	}
	defer c.Close()
	stateF, err := os.OpenFile(statePath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return splitStats{}, err
	}
	defer stateF.Close()
	memF, err := os.OpenFile(memPath, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return splitStats{}, err
	}
	defer memF.Close()
	if err := memF.Truncate(int64(v.meta.MemoryMiB) << 20); err != nil {
		return splitStats{}, err
	}
	if err := v.qmp.SendFD(ctx, "split-out", qemuEnd); err != nil {
		return splitStats{}, err
	}
	// QEMU holds its own copy now; ours must go, or the stream never
	// ends when QEMU closes its end.
	qemuEnd.Close()
	type result struct {
		st  splitStats
		err error
	}
	done := make(chan result, 1)
	go func() {
		var src io.Reader = c
		if dbg := os.Getenv("KILN_DEBUG_SPLIT"); dbg != "" {
			f, _ := os.Create(dbg)
			defer f.Close()
			src = io.TeeReader(c, f)
		}
		st, err := splitStream(src, stateF, memF, "mem0")
		done <- result{st, err}
	}()
	// abort ends the receiver whatever it is doing and waits for it, so a
	// failed save never leaves it blocked.
	abort := func() {
		c.Close()
		<-done
	}
	if err := startMigration(ctx, v.qmp, "fd:split-out"); err != nil {
		abort()
		return splitStats{}, err
	}
	if err := waitMigration(ctx, v.qmp); err != nil {
		abort()
		return splitStats{}, err
	}
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		abort()
		return splitStats{}, ctx.Err()
	}
	if res.err != nil {
		return res.st, fmt.Errorf("splitting the migration stream: %w", res.err)
	}
	// No flush here: the page cache holds the file and outlives QEMU and
	// kiln; Suspend makes it durable in the background (persistMemory).
	if err := stateF.Sync(); err != nil {
		return res.st, err
	}
	return res.st, memF.Close()
}
