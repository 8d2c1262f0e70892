package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func qemuImg(t testing.TB, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

// chain makes base.raw <- disk.qcow2 <- overlay.qcow2 the way kiln does.
func chain(t testing.TB, dir string, extra ...string) (base, disk, overlay string) {
	base, disk, overlay = filepath.Join(dir, "base.raw"), filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, "overlay.qcow2")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, append([]string{"create", "-q", "-f", "qcow2", "-b", base, "-F", "raw"}, append(extra, disk)...)...)
	qemuImg(t, append([]string{"create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2"}, append(extra, overlay)...)...)
	return
}

func TestParseQemuImgHeaders(t *testing.T) {
	for _, tc := range []struct {
		name    string
		extra   []string
		version uint32
	}{
		{"v3", nil, 3},
		{"v2", []string{"-o", "compat=0.10"}, 2},
		{"v3-small-clusters", []string{"-o", "cluster_size=512"}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, disk, overlay := chain(t, t.TempDir(), tc.extra...)
			h, err := ParseFile(disk)
			if err != nil {
				t.Fatal(err)
			}
			if h.Version != tc.version || h.BackingFile != base || h.BackingFormat != "raw" || h.Size != 1<<20 {
				t.Fatalf("header %+v", h)
			}
			if err := CheckChain([]string{overlay, disk, base}); err != nil {
				t.Fatalf("kiln's own chain refused: %v", err)
			}
		})
	}
}

// rewrite replaces the backing name in the image's header in place, as a
// compromised QEMU could.
func rewrite(t *testing.T, path, name string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off := binary.BigEndian.Uint64(b[8:])
	binary.BigEndian.PutUint32(b[16:], uint32(len(name)))
	copy(b[off:], name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCheckChainRefuses(t *testing.T) {
	dir := t.TempDir()
	base, disk, overlay := chain(t, dir)
	victim := filepath.Join(dir, "victim")

	t.Run("rewritten name", func(t *testing.T) {
		rewrite(t, disk, victim)
		if h, _ := ParseFile(disk); h.BackingFile != victim {
			t.Fatalf("rewrite did not take: %+v", h)
		}
		err := CheckChain([]string{overlay, disk, base})
		if !errors.Is(err, ErrChain) || !strings.Contains(err.Error(), `names backing file "`+victim+`", expected "`+base+`": refusing`) {
			t.Fatalf("err = %v", err)
		}
		rewrite(t, disk, base)
	})
	t.Run("relative name resolving elsewhere", func(t *testing.T) {
		rewrite(t, disk, "../x/base.raw")
		if err := CheckChain([]string{overlay, disk, base}); !errors.Is(err, ErrChain) {
			t.Fatalf("err = %v", err)
		}
		rewrite(t, disk, "base.raw") // same file, relative: accepted
		if err := CheckChain([]string{overlay, disk, base}); err != nil {
			t.Fatal(err)
		}
		rewrite(t, disk, base)
	})
	t.Run("no backing format", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "noformat.qcow2")
		// qemu-img no longer writes such headers; QEMU still reads them
		// and probes the format, which a guest-written raw disk can fake.
		if err := os.WriteFile(d, header(3, base, ""), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := CheckChain([]string{d, base}); !errors.Is(err, ErrChain) || !strings.Contains(err.Error(), "backing format") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("external data file", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "data.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "datafile"), d, "1M")
		if _, err := ParseFile(d); !errors.Is(err, ErrBadHeader) || !strings.Contains(err.Error(), "external data file") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("raw where qcow2 expected", func(t *testing.T) {
		if err := CheckChain([]string{base, base}); !errors.Is(err, ErrBadHeader) {
			t.Fatalf("err = %v", err)
		}
	})
}

// header builds a qcow2 header by hand, for seeds that need no qemu-img.
func header(version uint32, backing, format string) []byte {
	b := make([]byte, 4096)
	be := binary.BigEndian
	be.PutUint32(b[0:], magic)
	be.PutUint32(b[4:], version)
	be.PutUint32(b[20:], 16)
	be.PutUint64(b[24:], 1<<30)
	off := uint64(v2HeaderLen)
	if version == 3 {
		be.PutUint32(b[96:], 4)
		be.PutUint32(b[100:], v3HeaderLen)
		off = v3HeaderLen
	}
	if format != "" {
		be.PutUint32(b[off:], extBackingFormat)
		be.PutUint32(b[off+4:], uint32(len(format)))
		copy(b[off+8:], format)
		off += 8 + (uint64(len(format))+7)&^7
	}
	off += 8 // end marker
	if backing != "" {
		be.PutUint64(b[8:], off)
		be.PutUint32(b[16:], uint32(len(backing)))
		copy(b[off:], backing)
	}
	return b
}

func TestHandMadeHeader(t *testing.T) {
	h, err := Parse(bytes.NewReader(header(3, "/a/b", "raw")))
	if err != nil || h.BackingFile != "/a/b" || h.BackingFormat != "raw" {
		t.Fatalf("%+v %v", h, err)
	}
}

func FuzzHeader(f *testing.F) {
	f.Add(header(3, "/var/lib/kiln/root.ext4", "raw"))
	f.Add(header(2, "disk.qcow2", "qcow2"))
	f.Add(header(3, "", ""))
	f.Add([]byte("QFI\xfb"))
	if _, err := exec.LookPath("qemu-img"); err == nil {
		dir := f.TempDir()
		_, disk, overlay := chain(f, dir)
		for _, p := range []string{disk, overlay} {
			b, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b[:min(len(b), 8192)])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := Parse(bytes.NewReader(b))
		if err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("error outside ErrBadHeader: %v", err)
			}
			return
		}
		if len(h.BackingFile) > maxBackingName || strings.ContainsRune(h.BackingFile, 0) {
			t.Fatalf("backing name %q accepted", h.BackingFile)
		}
		if h.Version != 2 && h.Version != 3 || h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
			t.Fatalf("header %+v accepted", h)
		}
	})
}
