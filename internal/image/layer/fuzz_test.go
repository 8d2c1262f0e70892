package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// fuzzLimits keep one fuzz input from writing much: the point is what a
// hostile archive can make the extractor do, not how fast it inflates.
var fuzzLimits = Limits{MaxEntries: 64, MaxEntryBytes: 1 << 20, MaxTotalBytes: 4 << 20}

// FuzzExtractZip: whatever a tenant's code package holds, extraction ends
// (with or without an error) and writes nothing outside its folder.
func FuzzExtractZip(f *testing.F) {
	for _, ents := range [][]zent{
		{{name: "Dockerfile", body: "FROM scratch\n"}, {name: "app/main.py", body: "print(1)"}},
		{{name: "../escape", body: "x"}},
		{{name: "/abs", body: "x"}},
		{{name: "link", mode: fs.ModeSymlink | 0o777, body: "../../etc"}, {name: "link/x", body: "x"}},
		{{name: "dir/", mode: fs.ModeDir | 0o755}, {name: "dir/f", body: "y"}},
		{{name: "fifo", mode: fs.ModeNamedPipe | 0o644}},
	} {
		b, err := os.ReadFile(writeZip(f, ents))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("PK\x05\x06" + string(make([]byte, 18))))
	f.Fuzz(func(t *testing.T, data []byte) {
		zipPath := filepath.Join(t.TempDir(), "in.zip")
		if err := os.WriteFile(zipPath, data, 0o644); err != nil {
			t.Fatal(err)
		}
		parent, dst := sandbox(t)
		ExtractZip(context.Background(), zipPath, dst, Options{Limits: fuzzLimits})
		checkOutside(t, parent)
	})
}

// FuzzExtractTar: the same for a layer of a tenant's image archive, as an
// image layer (Rootfs) and as a plain archive.
func FuzzExtractTar(f *testing.F) {
	for _, ents := range [][]tent{
		{{hdr: tar.Header{Name: "etc/passwd", Typeflag: tar.TypeReg}, body: "root:x:0:0::/root:/bin/sh\n"}},
		{{hdr: tar.Header{Name: "../escape", Typeflag: tar.TypeReg}, body: "x"}},
		{{hdr: tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "/"}}, {hdr: tar.Header{Name: "l/tmp/x", Typeflag: tar.TypeReg}, body: "x"}},
		{{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "../../etc/shadow"}}},
		{{hdr: tar.Header{Name: "a/.wh.b", Typeflag: tar.TypeReg}}, {hdr: tar.Header{Name: ".wh..wh..opq", Typeflag: tar.TypeReg}}},
		{{hdr: tar.Header{Name: "dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}},
	} {
		f.Add(tarOf(f, ents).Bytes(), false)
		f.Add(tarOf(f, ents).Bytes(), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, rootfs bool) {
		parent, dst := sandbox(t)
		ExtractTar(context.Background(), bytes.NewReader(data), dst, Options{Limits: fuzzLimits, Rootfs: rootfs})
		checkOutside(t, parent)
	})
}
