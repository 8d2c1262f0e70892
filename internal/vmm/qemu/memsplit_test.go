//go:build linux

package qemu

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// streamBuilder writes a QEMU migration stream in the format splitStream
// reads, so the parser can be tested without a VM.
type streamBuilder struct{ bytes.Buffer }

func (b *streamBuilder) be64(v uint64) { binary.Write(b, binary.BigEndian, v) }
func (b *streamBuilder) be32(v uint32) { binary.Write(b, binary.BigEndian, v) }
func (b *streamBuilder) name(s string) { b.WriteByte(byte(len(s))); b.WriteString(s) }

func (b *streamBuilder) page(block string, addr uint64, cont bool, fill byte) {
	flags := uint64(flagPage)
	if cont {
		flags |= flagContinue
	}
	b.be64(addr | flags)
	if !cont {
		b.name(block)
	}
	b.Write(bytes.Repeat([]byte{fill}, pageSize))
}

func (b *streamBuilder) zero(block string, addr uint64, cont bool) {
	flags := uint64(flagZero)
	if cont {
		flags |= flagContinue
	}
	b.be64(addr | flags)
	if !cont {
		b.name(block)
	}
	b.WriteByte(0)
}

const memSize = 16 * pageSize

// sampleStream returns a stream with RAM pages of "mem0" and "pc.rom",
// a command between RAM sections, and opaque device state after them; and
// the stream a shared-memory VM would have produced.
func sampleStream() (full, want []byte) {
	var b, w streamBuilder
	for _, s := range []*streamBuilder{&b, &w} {
		s.be32(qemuMagic)
		s.be32(3)
		s.WriteString("\x07\x00\x00\x00\x03q35") // configuration section
		s.WriteByte(secStart)
		s.be32(2)
		s.name("ram")
		s.be32(0)
		s.be32(4)
		s.be64((memSize + pageSize) | flagMemSize)
		s.name("mem0")
		s.be64(memSize)
		s.be64(0)
		s.name("pc.rom")
		s.be64(pageSize)
		s.be64(0xc0000)
		s.be64(flagEOS)
		s.WriteByte(secFooter)
		s.be32(2)
		s.WriteByte(secPart)
		s.be32(2)
	}
	b.page("mem0", 0, false, 0xaa)
	b.page("mem0", pageSize, true, 0xbb)
	b.zero("mem0", 2*pageSize, true)
	b.page("pc.rom", 0, false, 0xcc)
	w.page("pc.rom", 0, false, 0xcc)
	b.page("mem0", 5*pageSize, false, 0xdd)
	for _, s := range []*streamBuilder{&b, &w} {
		s.be64(flagEOS)
		s.WriteByte(secFooter)
		s.be32(2)
		s.WriteString("\x08\x00\x0b\x00\x00") // command, no data
		s.WriteByte(secEnd)
		s.be32(2)
	}
	b.page("mem0", 15*pageSize, true, 0xee)
	for _, s := range []*streamBuilder{&b, &w} {
		s.be64(flagEOS)
		s.WriteByte(secFooter)
		s.be32(2)
		s.WriteString("\x04device-state-bytes\x00")
	}
	return b.Bytes(), w.Bytes()
}

func TestSplitStream(t *testing.T) {
	full, want := sampleStream()
	mem, err := os.Create(filepath.Join(t.TempDir(), "mem"))
	if err != nil {
		t.Fatal(err)
	}
	mem.Truncate(memSize)
	var state bytes.Buffer
	st, err := splitStream(bytes.NewReader(full), &state, mem, "mem0")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(state.Bytes(), want) {
		t.Errorf("device state differs from a shared-memory stream:\n got %x\nwant %x", state.Bytes(), want)
	}
	if st.MemPages != 4 {
		t.Errorf("%d pages written, want 4", st.MemPages)
	}
	got, _ := os.ReadFile(mem.Name())
	for page, fill := range map[int]byte{0: 0xaa, 1: 0xbb, 2: 0, 3: 0, 5: 0xdd, 15: 0xee} {
		if p := got[page*pageSize : (page+1)*pageSize]; !bytes.Equal(p, bytes.Repeat([]byte{fill}, pageSize)) {
			t.Errorf("page %d starts %x, want all %x", page, p[:4], fill)
		}
	}
}

func TestSplitStreamRejectsBadInput(t *testing.T) {
	full, _ := sampleStream()
	tests := []struct {
		name   string
		stream []byte
		want   string
	}{
		{"empty", nil, "header"},
		{"not qemu", []byte("GARBAGE-GARBAGE-GARBAGE"), "not a QEMU"},
		{"no ram section", full[:20], "RAM section not found"},
		{"truncated in a page", full[:200], ""},
		{"page outside memory", func() []byte {
			var b streamBuilder
			b.Write(full[:bytes.Index(full, []byte("\x02\x00\x00\x00\x02"))+5])
			b.page("mem0", memSize, false, 1)
			return b.Bytes()
		}(), "outside guest memory"},
		{"unknown flags", append(append([]byte{}, full[:len(full)-30]...), 0, 0, 0, 0, 0, 0, 0, 0x40), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem, _ := os.Create(filepath.Join(t.TempDir(), "mem"))
			mem.Truncate(memSize)
			_, err := splitStream(bytes.NewReader(tt.stream), &bytes.Buffer{}, mem, "mem0")
			if err == nil {
				t.Fatal("malformed stream accepted")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}
