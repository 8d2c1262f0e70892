//go:build linux

package qemu

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func qemuImgT(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

// TestTemplateChain: a template's recorded chain wins over its header; a
// copied template (chain.json naming another directory) learns its chain
// from the header kiln rebased.
func TestTemplateChain(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip(err)
	}
	base := t.TempDir()
	d := &Driver{cfg: Config{QEMUImg: "qemu-img"}, log: slog.Default()}
	root, root2, victim := filepath.Join(base, "root.ext4"), filepath.Join(base, "root2.ext4"), filepath.Join(base, "victim")
	for _, f := range []string{root, root2, victim} {
		os.WriteFile(f, nil, 0o600)
		os.Truncate(f, 1<<20)
	}
	a := filepath.Join(base, "a")
	os.Mkdir(a, 0o700)
	qemuImgT(t, "create", "-q", "-f", "qcow2", "-b", root, "-F", "raw", filepath.Join(a, "disk.qcow2"))
	if err := writeChain(a, []layer{{Path: root, Format: "raw"}}); err != nil {
		t.Fatal(err)
	}
	want := []layer{{Path: filepath.Join(a, "disk.qcow2"), Format: "qcow2"}, {Path: root, Format: "raw"}}
	// A compromised QEMU rewrote the header: the record still rules.
	qemuImgT(t, "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", victim, filepath.Join(a, "disk.qcow2"))
	got, err := d.readChain(context.Background(), a)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("chain %+v (%v), want %+v", got, err, want)
	}
	// The image cache's copy: files copied, the disk rebased by kiln.
	b := filepath.Join(base, "b")
	os.Mkdir(b, 0o700)
	for _, f := range []string{"disk.qcow2", chainFile} {
		data, _ := os.ReadFile(filepath.Join(a, f))
		os.WriteFile(filepath.Join(b, f), data, 0o600)
	}
	qemuImgT(t, "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", root2, filepath.Join(b, "disk.qcow2"))
	got, err = d.readChain(context.Background(), b)
	want = []layer{{Path: filepath.Join(b, "disk.qcow2"), Format: "qcow2"}, {Path: root2, Format: "raw"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("copied template's chain %+v (%v), want %+v", got, err, want)
	}
	// And it is recorded now.
	if data, _ := os.ReadFile(filepath.Join(b, chainFile)); !strings.Contains(string(data), root2) {
		t.Errorf("chain.json not rewritten: %s", data)
	}
}

// TestBlockdevArgs: every layer is a descriptor, linked explicitly, with
// no backing below the bottom.
func TestBlockdevArgs(t *testing.T) {
	v := &vm{meta: meta{Chain: []layer{{Path: "/t/disk.qcow2", Format: "qcow2"}, {Path: "/r/root.ext4", Format: "raw"}}}}
	got := strings.Join(v.blockdevArgs(3), " ")
	for _, want := range []string{
		"-add-fd fd=3,set=2", "-add-fd fd=4,set=2", "-add-fd fd=5,set=3", "-add-fd fd=6,set=4",
		`"backing":"layer2"`, `"backing":"layer1"`, `"filename":"/dev/fdset/4"`, `"driver":"raw"`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("args lack %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "/t/") || strings.Contains(got, "/r/") {
		t.Errorf("args name a path:\n%s", got)
	}
	v.meta.Chain = []layer{{Path: "/t/disk.qcow2", Format: "qcow2"}}
	if got := strings.Join(v.blockdevArgs(3), " "); !strings.Contains(got, `"backing":null`) {
		t.Errorf("bottom qcow2 layer without backing:null:\n%s", got)
	}
	if v.tapFD() != 6 {
		t.Errorf("tap fd %d, want 6", v.tapFD())
	}
}
