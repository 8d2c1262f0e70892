//go:build linux

package remote

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type entry struct {
	name, link, body string
	typ              byte
	mode             int64
}

func tarOf(t testing.TB, es ...entry) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body))}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return b.Bytes()
}

// listTree names everything under dir (relative), links marked "->".
func listTree(t testing.TB, dir string) []string {
	var out []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == dir {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.Mode()&os.ModeSymlink != 0 {
			l, _ := os.Readlink(p)
			rel += " -> " + l
		}
		out = append(out, rel)
		return nil
	})
	return out
}

// TestReceiveTree: a guest's tar lands as docker cp would put it, and a
// hostile one writes nothing outside the destination: no climbing names,
// no writes through its own links, no set-id bits, no devices.
func TestReceiveTree(t *testing.T) {
	ctx := context.Background()
	good := tarOf(t,
		entry{name: "app/", typ: tar.TypeDir, mode: 0o755},
		entry{name: "app/a.txt", typ: tar.TypeReg, body: "alpha"},
		entry{name: "app/sub/", typ: tar.TypeDir, mode: 0o700},
		entry{name: "app/sub/b.txt", typ: tar.TypeReg, body: "beta", mode: 0o4755},
		entry{name: "app/abs", typ: tar.TypeSymlink, link: "/etc/passwd"},
		entry{name: "app/hard", typ: tar.TypeLink, link: "app/a.txt"},
		entry{name: "app/dev", typ: tar.TypeChar},
	)
	t.Run("into an existing directory, then as a new name", func(t *testing.T) {
		dir := t.TempDir()
		var warned []string
		if err := ReceiveTree(ctx, bytes.NewReader(good), dir, func(w string) { warned = append(warned, w) }); err != nil {
			t.Fatal(err)
		}
		if err := ReceiveTree(ctx, bytes.NewReader(good), filepath.Join(dir, "renamed"), nil); err != nil {
			t.Fatal(err)
		}
		got := strings.Join(listTree(t, dir), ",")
		want := "app,app/a.txt,app/abs -> /etc/passwd,app/hard,app/sub,app/sub/b.txt,renamed,renamed/a.txt,renamed/abs -> /etc/passwd,renamed/hard,renamed/sub,renamed/sub/b.txt"
		if got != want {
			t.Fatalf("tree %s\nwant %s", got, want)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "app/sub/b.txt")); string(b) != "beta" {
			t.Fatalf("b.txt holds %q", b)
		}
		if fi, _ := os.Stat(filepath.Join(dir, "app/sub/b.txt")); fi.Mode()&os.ModeSetuid != 0 || fi.Mode().Perm() != 0o755 {
			t.Fatalf("b.txt mode %v: set-id bits must go", fi.Mode())
		}
		if len(warned) != 1 || !strings.Contains(warned[0], "dev") {
			t.Fatalf("warnings %q, want one for the device", warned)
		}
		// The same again into the now non-empty app: refused.
		if err := ReceiveTree(ctx, bytes.NewReader(good), dir, nil); err == nil || !strings.Contains(err.Error(), "not empty") {
			t.Fatalf("over a non-empty directory: %v", err)
		}
	})
	t.Run("a single file replaces a file", func(t *testing.T) {
		dir := t.TempDir()
		dst := filepath.Join(dir, "local.txt")
		os.WriteFile(dst, []byte("old"), 0o600)
		if err := ReceiveTree(ctx, bytes.NewReader(tarOf(t, entry{name: "remote.txt", typ: tar.TypeReg, body: "new"})), dst, nil); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(dst); string(b) != "new" || len(listTree(t, dir)) != 1 {
			t.Fatalf("%s holds %q; tree %v", dst, b, listTree(t, dir))
		}
	})
	hostile := map[string][]byte{
		"write through its own link": tarOf(t,
			entry{name: "app/", typ: tar.TypeDir},
			entry{name: "app/up", typ: tar.TypeSymlink, link: "../../.."},
			entry{name: "app/up/pwned", typ: tar.TypeReg, body: "x"}),
		"climbing name":     tarOf(t, entry{name: "app/", typ: tar.TypeDir}, entry{name: "app/../../pwned", typ: tar.TypeReg, body: "x"}),
		"a second top":      tarOf(t, entry{name: "app/", typ: tar.TypeDir}, entry{name: "other/pwned", typ: tar.TypeReg, body: "x"}),
		"absolute first":    tarOf(t, entry{name: "/etc/pwned", typ: tar.TypeReg, body: "x"}),
		"dot-dot first":     tarOf(t, entry{name: "../pwned", typ: tar.TypeReg, body: "x"}),
		"garbage":           []byte("not a tar at all, not even close"),
		"trailing flood":    append(tarOf(t, entry{name: "f", typ: tar.TypeReg, body: "x"}), make([]byte, maxTrailer+10)...),
		"link out, written": tarOf(t, entry{name: "app/", typ: tar.TypeDir}, entry{name: "app/h", typ: tar.TypeLink, link: "../../pwned"}, entry{name: "app/h", typ: tar.TypeReg, body: "x"}),
	}
	for name, b := range hostile {
		t.Run(name, func(t *testing.T) {
			parent := t.TempDir()
			dst := filepath.Join(parent, "in", "dst")
			os.MkdirAll(filepath.Dir(dst), 0o755)
			err := ReceiveTree(ctx, bytes.NewReader(b), dst, nil)
			for _, p := range listTree(t, parent) {
				if p != "in" && p != filepath.Join("in", "dst") && !strings.HasPrefix(p, filepath.Join("in", "dst")+"/") {
					t.Fatalf("wrote %s outside the destination (err %v)", p, err)
				}
			}
			if name != "link out, written" && err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func FuzzReceiveTree(f *testing.F) {
	f.Add(tarOf(f, entry{name: "a/", typ: tar.TypeDir}, entry{name: "a/b", typ: tar.TypeReg, body: "x"}))
	f.Add(tarOf(f, entry{name: "a/", typ: tar.TypeDir}, entry{name: "a/l", typ: tar.TypeSymlink, link: ".."}, entry{name: "a/l/x", typ: tar.TypeReg, body: "x"}))
	f.Add(tarOf(f, entry{name: "a", typ: tar.TypeReg, body: "x", mode: 0o6777}))
	f.Fuzz(func(t *testing.T, b []byte) {
		parent := t.TempDir()
		dst := filepath.Join(parent, "d")
		if ReceiveTree(context.Background(), bytes.NewReader(b), dst, nil) != nil {
			for _, p := range listTree(t, parent) {
				t.Fatalf("a failed copy left %s", p)
			}
			return
		}
		for _, p := range listTree(t, parent) {
			if p != "d" && !strings.HasPrefix(p, "d/") {
				t.Fatalf("wrote %s outside the destination", p)
			}
			if fi, err := os.Lstat(filepath.Join(parent, p)); err == nil && fi.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky) != 0 {
				t.Fatalf("%s kept mode %v", p, fi.Mode())
			}
		}
	})
}
