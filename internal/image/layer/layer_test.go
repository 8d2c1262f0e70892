package layer

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

type zent struct {
	name string
	mode fs.FileMode
	body string
	// declared, if nonzero, overrides the uncompressed size in the
	// central directory (a lying zip).
	size int
}

func writeZip(t testing.TB, ents []zent) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range ents {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "src.zip")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// sandbox makes a parent folder with a build folder inside and a canary
// file beside it, so a test can prove nothing outside was touched.
func sandbox(t testing.TB) (parent, dst string) {
	t.Helper()
	parent = t.TempDir()
	dst = filepath.Join(parent, "build")
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(parent, "canary"), []byte("untouched"), 0o644); err != nil {
		t.Fatal(err)
	}
	return parent, dst
}

func checkOutside(t testing.TB, parent string) {
	t.Helper()
	ents, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() != "build" && e.Name() != "canary" {
			t.Errorf("extraction wrote %s outside the build folder", e.Name())
		}
	}
	if b, _ := os.ReadFile(filepath.Join(parent, "canary")); string(b) != "untouched" {
		t.Errorf("canary outside the build folder changed: %q", b)
	}
}

func TestExtractZip(t *testing.T) {
	big := strings.Repeat("A", 10_000)
	small := Limits{MaxEntries: 5, MaxEntryBytes: 4096, MaxTotalBytes: 6000}
	tests := []struct {
		name    string
		ents    []zent
		limits  Limits
		wantErr error
		errHas  string
		check   func(t *testing.T, dst string)
	}{
		{
			name: "ordinary package",
			ents: []zent{
				{name: "Dockerfile", body: "FROM scratch\n"},
				{name: "app/", mode: fs.ModeDir | 0o755},
				{name: "app/main.py", body: "print(1)\n", mode: 0o755},
				{name: "app/link", mode: fs.ModeSymlink | 0o777, body: "main.py"},
			},
			check: func(t *testing.T, dst string) {
				b, err := os.ReadFile(filepath.Join(dst, "app/link"))
				if err != nil || string(b) != "print(1)\n" {
					t.Fatalf("app/link = %q, %v", b, err)
				}
				fi, _ := os.Stat(filepath.Join(dst, "app/main.py"))
				if fi.Mode().Perm() != 0o755 {
					t.Fatalf("mode = %v", fi.Mode())
				}
			},
		},
		{name: "dot-dot entry", ents: []zent{{name: "../evil", body: "x"}}, wantErr: ErrUnsafe, errHas: `".."`},
		{name: "nested dot-dot", ents: []zent{{name: "a/../../evil", body: "x"}}, wantErr: ErrUnsafe},
		{name: "absolute path", ents: []zent{{name: "/tmp/evil", body: "x"}}, wantErr: ErrUnsafe, errHas: "absolute"},
		{name: "backslash dot-dot", ents: []zent{{name: `..\evil`, body: "x"}}, wantErr: ErrUnsafe},
		{name: "symlink out with dot-dot", ents: []zent{{name: "l", mode: fs.ModeSymlink | 0o777, body: "../canary"}}, wantErr: ErrUnsafe, errHas: "outside the build folder"},
		{name: "absolute symlink", ents: []zent{{name: "l", mode: fs.ModeSymlink | 0o777, body: "/etc"}}, wantErr: ErrUnsafe},
		{
			name: "write through a symlink",
			// The link itself is refused before the write is attempted.
			ents:    []zent{{name: "d", mode: fs.ModeSymlink | 0o777, body: ".."}, {name: "d/canary", body: "pwned"}},
			wantErr: ErrUnsafe,
		},
		{
			name: "write through an inner symlink replaces the link",
			ents: []zent{
				{name: "real", body: "original"},
				{name: "l", mode: fs.ModeSymlink | 0o777, body: "real"},
				{name: "l", body: "replaced"},
			},
			check: func(t *testing.T, dst string) {
				if b, _ := os.ReadFile(filepath.Join(dst, "real")); string(b) != "original" {
					t.Fatalf("write followed the link: real = %q", b)
				}
				if b, _ := os.ReadFile(filepath.Join(dst, "l")); string(b) != "replaced" {
					t.Fatalf("l = %q", b)
				}
			},
		},
		{name: "char device", ents: []zent{{name: "dev", mode: fs.ModeDevice | fs.ModeCharDevice | 0o666}}, wantErr: ErrUnsafe, errHas: "character device"},
		{name: "named pipe", ents: []zent{{name: "p", mode: fs.ModeNamedPipe | 0o666}}, wantErr: ErrUnsafe},
		{name: "too many entries", limits: small, ents: []zent{{name: "1"}, {name: "2"}, {name: "3"}, {name: "4"}, {name: "5"}, {name: "6"}}, wantErr: ErrLimit, errHas: "MaxEntries"},
		{name: "entry too large", limits: small, ents: []zent{{name: "big", body: big[:5000]}}, wantErr: ErrLimit, errHas: "MaxEntryBytes"},
		{name: "total too large", limits: small, ents: []zent{{name: "a", body: big[:4000]}, {name: "b", body: big[:4000]}}, wantErr: ErrLimit, errHas: "MaxTotalBytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent, dst := sandbox(t)
			zp := writeZip(t, tt.ents)
			err := ExtractZip(context.Background(), zp, dst, Options{Limits: tt.limits})
			checkOutside(t, parent)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err %q does not mention %q", err, tt.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.check != nil {
				tt.check(t, dst)
			}
		})
	}
}

// TestExtractZipLyingSize crafts a zip whose central directory claims a
// tiny size for an entry that inflates to much more (a zip bomb's trick).
func TestExtractZipLyingSize(t *testing.T) {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	payload := bytes.Repeat([]byte{0}, 1<<20)
	// CreateRaw lets the test write a header whose sizes disagree with
	// the compressed data.
	var comp bytes.Buffer
	{
		tmp := zip.NewWriter(&comp)
		w, _ := tmp.CreateHeader(&zip.FileHeader{Name: "x", Method: zip.Deflate})
		w.Write(payload)
		tmp.Close()
	}
	zr, err := zip.NewReader(bytes.NewReader(comp.Bytes()), int64(comp.Len()))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := zr.File[0].OpenRaw()
	h := zr.File[0].FileHeader // sizes from the real data, then a lie:
	h.UncompressedSize64 = 10
	w, err := zw.CreateRaw(&h)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := copyAll(w, raw); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	p := filepath.Join(t.TempDir(), "bomb.zip")
	os.WriteFile(p, buf.Bytes(), 0o644)
	_, dst := sandbox(t)
	err = ExtractZip(context.Background(), p, dst, Options{Limits: Limits{MaxEntryBytes: 4096, MaxTotalBytes: 4096}})
	if err == nil {
		t.Fatal("lying zip extracted without error")
	}
	fi, serr := os.Stat(filepath.Join(dst, "x"))
	if serr == nil && fi.Size() > 4096 {
		t.Fatalf("wrote %d bytes past the declared size", fi.Size())
	}
}

func copyAll(w interface{ Write([]byte) (int, error) }, r interface{ Read([]byte) (int, error) }) (int64, error) {
	var b bytes.Buffer
	if _, err := b.ReadFrom(r); err != nil {
		return 0, err
	}
	n, err := w.Write(b.Bytes())
	return int64(n), err
}

type tent struct {
	hdr  tar.Header
	body string
}

func tarOf(t testing.TB, ents []tent) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if e.body != "" {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return &buf
}

func TestExtractTar(t *testing.T) {
	tests := []struct {
		name    string
		rootfs  bool
		ents    []tent
		wantErr error
		check   func(t *testing.T, dst string)
	}{
		{
			name:   "rootfs tree with absolute link and device",
			rootfs: true,
			ents: []tent{
				{hdr: tar.Header{Name: "./usr/", Typeflag: tar.TypeDir, Mode: 0o755}},
				{hdr: tar.Header{Name: "/usr/bin/sh", Typeflag: tar.TypeReg, Mode: 0o4755}, body: "#!"},
				{hdr: tar.Header{Name: "bin", Typeflag: tar.TypeSymlink, Linkname: "/usr/bin"}},
				{hdr: tar.Header{Name: "usr/bin/sh2", Typeflag: tar.TypeLink, Linkname: "usr/bin/sh"}},
				{hdr: tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}},
			},
			check: func(t *testing.T, dst string) {
				if l, _ := os.Readlink(filepath.Join(dst, "bin")); l != "/usr/bin" {
					t.Fatalf("bin -> %q", l)
				}
				fi, err := os.Stat(filepath.Join(dst, "usr/bin/sh"))
				if err != nil || fi.Mode()&fs.ModeSetuid == 0 {
					t.Fatalf("sh mode %v, %v", fi.Mode(), err)
				}
				if _, err := os.Lstat(filepath.Join(dst, "dev/null")); err == nil {
					t.Fatal("device node created")
				}
			},
		},
		{
			name:   "rootfs write through absolute symlink stays inside",
			rootfs: true,
			ents: []tent{
				{hdr: tar.Header{Name: "etc", Typeflag: tar.TypeSymlink, Linkname: "/"}},
				{hdr: tar.Header{Name: "etc/canary", Typeflag: tar.TypeReg}, body: "pwned"},
			},
			wantErr: fs.ErrInvalid, // os.Root: absolute link refused ("path escapes")
		},
		{
			name:   "rootfs relative symlink escaping, then write through it",
			rootfs: true,
			ents: []tent{
				{hdr: tar.Header{Name: "up", Typeflag: tar.TypeSymlink, Linkname: "../"}},
				{hdr: tar.Header{Name: "up/canary", Typeflag: tar.TypeReg}, body: "pwned"},
			},
			wantErr: fs.ErrInvalid,
		},
		{name: "dot-dot in rootfs", rootfs: true, ents: []tent{{hdr: tar.Header{Name: "../x", Typeflag: tar.TypeReg}, body: "x"}}, wantErr: ErrUnsafe},
		{name: "hard link to outside", rootfs: true, ents: []tent{{hdr: tar.Header{Name: "x", Typeflag: tar.TypeLink, Linkname: "../canary"}}}, wantErr: ErrUnsafe},
		{name: "device in code package", ents: []tent{{hdr: tar.Header{Name: "d", Typeflag: tar.TypeBlock}}}, wantErr: ErrUnsafe},
		{name: "absolute in code package", ents: []tent{{hdr: tar.Header{Name: "/x", Typeflag: tar.TypeReg}, body: "x"}}, wantErr: ErrUnsafe},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent, dst := sandbox(t)
			err := ExtractTar(context.Background(), tarOf(t, tt.ents), dst, Options{Rootfs: tt.rootfs, KeepOwners: true})
			checkOutside(t, parent)
			if tt.wantErr != nil {
				if err == nil {
					t.Fatalf("want error %v", tt.wantErr)
				}
				if tt.wantErr != fs.ErrInvalid && !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.check != nil {
				tt.check(t, dst)
			}
		})
	}
}

func TestCopyTreeExclude(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "app/node_modules"), 0o755)
	os.WriteFile(filepath.Join(src, "app/a.txt"), []byte("a"), 0o600)
	os.WriteFile(filepath.Join(src, "app/node_modules/x"), []byte("x"), 0o644)
	os.Symlink("a.txt", filepath.Join(src, "app/l"))
	dst := t.TempDir()
	sr, _ := os.OpenRoot(src)
	dr, _ := os.OpenRoot(dst)
	defer sr.Close()
	defer dr.Close()
	err := CopyTree(context.Background(), sr, "app", dr, "opt/app", CopyOptions{
		Options: Options{Owner: &Owner{UID: 123, GID: 456}},
		Exclude: func(rel string, _ bool) bool { return rel == "node_modules" },
	})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "opt/app/a.txt")); string(b) != "a" {
		t.Fatalf("a.txt = %q", b)
	}
	if _, err := os.Stat(filepath.Join(dst, "opt/app/node_modules")); err == nil {
		t.Fatal("excluded folder copied")
	}
	if l, _ := os.Readlink(filepath.Join(dst, "opt/app/l")); l != "a.txt" {
		t.Fatalf("link = %q", l)
	}
	if os.Geteuid() == 0 {
		fi, _ := os.Lstat(filepath.Join(dst, "opt/app/a.txt"))
		if uid, gid := owner(fi); uid != 123 || gid != 456 {
			t.Fatalf("owner %d:%d", uid, gid)
		}
	}
}

func TestResolveInRoot(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "run/lock"), 0o755)
	os.MkdirAll(filepath.Join(dir, "usr/lib"), 0o755)
	os.Symlink("/run", filepath.Join(dir, "var-run"))
	os.Symlink("usr/lib", filepath.Join(dir, "lib"))
	os.Symlink("../../../../etc", filepath.Join(dir, "climb"))
	os.Symlink("loop2", filepath.Join(dir, "loop1"))
	os.Symlink("loop1", filepath.Join(dir, "loop2"))
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	tests := []struct {
		name, in, want string
		wantErr        bool
	}{
		{name: "absolute link rebased on the root", in: "var-run/lock/x", want: "run/lock/x"},
		{name: "relative link", in: "lib/libc.so", want: "usr/lib/libc.so"},
		{name: "dot-dot link clamped at the root", in: "climb/passwd", want: "etc/passwd"},
		{name: "missing tail kept", in: "new/dir/file", want: "new/dir/file"},
		{name: "root", in: ".", want: "."},
		{name: "loop", in: "loop1/x", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ResolveInRoot(root, tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("got %q, want error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ResolveInRoot(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

// paxRecord is one PAX extended header record, "LEN key=value\n", LEN
// counting itself.
func paxRecord(k, v string) string {
	s := " " + k + "=" + v + "\n"
	for n := len(s) + 1; ; n++ {
		if r := strconv.Itoa(n) + s; len(r) == n {
			return r
		}
	}
}

// TestExtractTarSparseRefused: a PAX sparse entry, 3 KiB of tar that
// archive/tar would write out as 64 MiB of zeros, is refused, in code
// packages and rootfs trees alike, before anything is written.
func TestExtractTarSparseRefused(t *testing.T) {
	// archive/tar's writer drops GNU.sparse records, so a comment of the
	// same length is written and swapped for them.
	sparseRecs := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", "f") + paxRecord("GNU.sparse.realsize", "67108864")
	fill := ""
	for len(paxRecord("comment", fill)) < len(sparseRecs) {
		fill += "c"
	}
	if len(paxRecord("comment", fill)) != len(sparseRecs) {
		t.Fatal("no comment record has the sparse records' length")
	}
	sparseMap := "1\n67108864\n0\n" + strings.Repeat("\x00", 512-len("1\n67108864\n0\n"))
	buf := tarOf(t, []tent{{hdr: tar.Header{Name: "f", Typeflag: tar.TypeReg, PAXRecords: map[string]string{"comment": fill}}, body: sparseMap}})
	b := bytes.Replace(buf.Bytes(), []byte(paxRecord("comment", fill)), []byte(sparseRecs), 1)
	if bytes.Equal(b, buf.Bytes()) {
		t.Fatal("the test could not make its sparse entry")
	}
	for _, rootfs := range []bool{false, true} {
		parent, dst := sandbox(t)
		err := ExtractTar(context.Background(), bytes.NewReader(b), dst, Options{Rootfs: rootfs})
		checkOutside(t, parent)
		if !errors.Is(err, ErrUnsafe) || !strings.Contains(err.Error(), "sparse") {
			t.Errorf("rootfs=%v: %v, want the sparse entry refused", rootfs, err)
		}
		if _, err := os.Lstat(filepath.Join(dst, "f")); err == nil {
			t.Errorf("rootfs=%v: the sparse file was written", rootfs)
		}
	}
}
