// Package qcow2 reads the part of a qcow2 image header that decides which
// other files QEMU opens with it: the backing file, its format, and an
// external data file. A guest (through a compromised QEMU) can rewrite the
// header of its own overlay; kiln checks a chain with CheckChain before any
// qemu-img runs on it, so that a name from a header never makes kiln open
// (or commit into) a host file it did not choose.
//
// The parser is bounded: it reads at most the first cluster (2 MiB at
// most), as QEMU requires the backing name and header extensions to lie
// there.
package qcow2

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

const (
	magic = 0x514649fb // "QFI\xfb"

	v2HeaderLen = 72
	v3HeaderLen = 104

	minClusterBits = 9
	maxClusterBits = 21
	// maxBackingName is QEMU's limit (1023 bytes, BDRV_... PATH_MAX-ish).
	maxBackingName = 1023
	// maxSize bounds the virtual size (QEMU's own limit is 32 MiB short
	// of 2^63; kiln's disks are far smaller).
	maxSize = 1 << 50

	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extDataFile      = 0x44415441

	// Incompatible feature bit 2: the data lives in an external file
	// named by the data-file extension, another name QEMU would open.
	incompatDataFile = 1 << 2
)

// ErrBadHeader is wrapped by every error about a malformed header.
var ErrBadHeader = fmt.Errorf("bad qcow2 header: %w", errdefs.ErrInvalid)

// Header is what kiln needs of a qcow2 header.
type Header struct {
	Version       uint32
	ClusterBits   uint32
	Size          uint64 // virtual disk size in bytes
	BackingFile   string // "" if none
	BackingFormat string // "" if the header names none
}

func bad(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadHeader, fmt.Sprintf(format, args...))
}

// Parse reads and checks the header of the qcow2 image r. It refuses what
// kiln never makes and what would make QEMU open another file than the
// backing one: encryption and an external data file.
func Parse(r io.ReaderAt) (Header, error) {
	var h Header
	fixed := make([]byte, v3HeaderLen)
	n, err := r.ReadAt(fixed, 0)
	if n < v2HeaderLen {
		if err == nil || errors.Is(err, io.EOF) {
			return h, bad("image is shorter than a qcow2 header (%d bytes)", n)
		}
		return h, fmt.Errorf("reading qcow2 header: %w", err)
	}
	be := binary.BigEndian
	if be.Uint32(fixed[0:]) != magic {
		return h, bad("not a qcow2 image (magic %#x)", be.Uint32(fixed[0:]))
	}
	h.Version = be.Uint32(fixed[4:])
	if h.Version != 2 && h.Version != 3 {
		return h, bad("unsupported version %d", h.Version)
	}
	backOff := be.Uint64(fixed[8:])
	backLen := be.Uint32(fixed[16:])
	h.ClusterBits = be.Uint32(fixed[20:])
	h.Size = be.Uint64(fixed[24:])
	crypt := be.Uint32(fixed[32:])
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return h, bad("cluster bits %d out of range", h.ClusterBits)
	}
	if h.Size > maxSize {
		return h, bad("virtual size %d too large", h.Size)
	}
	if crypt != 0 {
		return h, bad("encrypted images are not supported (method %d)", crypt)
	}
	cluster := uint64(1) << h.ClusterBits
	headerLen := uint64(v2HeaderLen)
	if h.Version == 3 {
		if n < v3HeaderLen {
			return h, bad("version 3 header is truncated")
		}
		incompat := be.Uint64(fixed[72:])
		headerLen = uint64(be.Uint32(fixed[100:]))
		if headerLen < v3HeaderLen || headerLen%8 != 0 || headerLen > cluster {
			return h, bad("header length %d invalid", headerLen)
		}
		if incompat&incompatDataFile != 0 {
			return h, bad("an external data file is not allowed")
		}
	}
	if backLen > maxBackingName {
		return h, bad("backing file name of %d bytes is too long", backLen)
	}
	if backLen > 0 && backOff == 0 {
		return h, bad("backing file name has no offset")
	}
	if backOff != 0 && (backOff >= cluster || backOff+uint64(backLen) > cluster) {
		return h, bad("backing file name at %d+%d lies outside the first cluster", backOff, backLen)
	}
	if backOff != 0 && backLen > 0 && backOff < headerLen {
		return h, bad("backing file name overlaps the header")
	}
	if backLen > 0 {
		name := make([]byte, backLen)
		if _, err := r.ReadAt(name, int64(backOff)); err != nil {
			return h, bad("reading backing file name: %v", err)
		}
		for _, c := range name {
			if c == 0 {
				return h, bad("backing file name holds a NUL byte")
			}
		}
		h.BackingFile = string(name)
	}
	if err := h.readExtensions(r, headerLen, cluster, backOff); err != nil {
		return h, err
	}
	return h, nil
}

// readExtensions walks the header extensions between the header and the
// end of the first cluster (or the backing name, which follows them).
func (h *Header) readExtensions(r io.ReaderAt, off, cluster, backOff uint64) error {
	end := cluster
	if backOff != 0 && backOff < end {
		end = backOff
	}
	be := binary.BigEndian
	var hdr [8]byte
	for i := 0; ; i++ {
		if i > 1024 {
			return bad("too many header extensions")
		}
		// Like QEMU: the area ends at the end marker, at the backing
		// name, or at the end of the first cluster.
		if off+8 > end {
			return nil
		}
		if _, err := r.ReadAt(hdr[:], int64(off)); err != nil {
			if errors.Is(err, io.EOF) {
				return nil // QEMU could not read on either
			}
			return bad("reading header extension at %d: %v", off, err)
		}
		typ, length := be.Uint32(hdr[0:]), uint64(be.Uint32(hdr[4:]))
		off += 8
		if typ == extEnd {
			return nil
		}
		if length > end-off {
			return bad("header extension %#x of %d bytes runs past %d", typ, length, end)
		}
		switch typ {
		case extDataFile:
			return bad("an external data file is not allowed")
		case extBackingFormat:
			if length > 64 {
				return bad("backing format name of %d bytes", length)
			}
			b := make([]byte, length)
			if _, err := r.ReadAt(b, int64(off)); err != nil {
				return bad("reading backing format: %v", err)
			}
			h.BackingFormat = string(b)
		}
		off += (length + 7) &^ 7
	}
}

// BackingFile returns the backing file name the qcow2 image r names, as
// written ("" for none).
func BackingFile(r io.ReaderAt) (string, error) {
	h, err := Parse(r)
	if err != nil {
		return "", err
	}
	return h.BackingFile, nil
}

// ParseFile parses the header of the qcow2 image at path.
func ParseFile(path string) (Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return Header{}, err
	}
	defer f.Close()
	h, err := Parse(f)
	if err != nil {
		return h, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// ErrChain is wrapped by CheckChain when an image names another backing
// file than the expected one.
var ErrChain = fmt.Errorf("unexpected qcow2 backing chain: %w", errdefs.ErrInvalid)

// CheckLink verifies that the qcow2 image at path names exactly backing
// (of format backingFormat) as its backing file: one link of a chain, for
// callers that know only the next layer.
func CheckLink(path, backing, backingFormat string) error {
	h, err := ParseFile(path)
	if err != nil {
		return err
	}
	got := h.BackingFile
	if got != "" && !filepath.IsAbs(got) {
		got = filepath.Join(filepath.Dir(path), got)
	}
	if got == "" || filepath.Clean(got) != filepath.Clean(backing) {
		name := h.BackingFile
		if name == "" {
			name = "(none)"
		}
		return fmt.Errorf("%w: disk overlay %s names backing file %q, expected %q: refusing", ErrChain, path, name, backing)
	}
	if h.BackingFormat != backingFormat {
		return fmt.Errorf("%w: disk overlay %s names backing format %q, expected %q: refusing", ErrChain, path, h.BackingFormat, backingFormat)
	}
	return nil
}

// CheckChain verifies that paths is exactly the chain of its first image:
// every path but the last is a qcow2 image whose header names the next
// path as its backing file, with the next one's format ("qcow2", or "raw"
// for the last), and the last is a raw disk. The raw disk's content is not
// parsed: a guest writes it, and it is only ever opened as raw. Names in
// headers that are relative count from the image's own folder, as QEMU
// reads them. Expected paths should be absolute.
func CheckChain(paths []string) error {
	if len(paths) == 0 {
		return errors.New("empty qcow2 chain")
	}
	for i := 0; i+1 < len(paths); i++ {
		format := "qcow2"
		if i+2 == len(paths) {
			format = "raw"
		}
		if err := CheckLink(paths[i], paths[i+1], format); err != nil {
			return err
		}
	}
	return nil
}

// OpenSpec is a QEMU block-device filename ("json:{...}") that opens the
// chain files[0] <- files[1] <- ... with every backing file given, so QEMU
// never follows a name from a header. Every layer but the last is qcow2;
// the last has format bottom: "raw", or "qcow2" opened without a backing
// file (to check an overlay alone). files are what QEMU opens, typically
// /proc/self/fd/N paths.
func OpenSpec(files []string, bottom string) string {
	var layer func(i int) map[string]any
	layer = func(i int) map[string]any {
		l := map[string]any{
			"driver": "qcow2",
			"file":   map[string]any{"driver": "file", "filename": files[i]},
		}
		switch {
		case i+1 < len(files):
			l["backing"] = layer(i + 1)
		case bottom == "raw":
			l["driver"] = "raw"
		default:
			l["backing"] = nil
		}
		return l
	}
	b, _ := json.Marshal(layer(0))
	return "json:" + string(b)
}
