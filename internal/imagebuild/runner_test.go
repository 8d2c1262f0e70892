//go:build linux

package imagebuild

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/image/imagetest"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// TestRunnerConformance runs the steps on warm starts (Runner.WarmDir):
// each step's VM a clone of a snapshot of a build VM booted short of its
// disks. Other tests here boot every step's VM cold.
func TestRunnerConformance(t *testing.T) {
	d := newDriver(t)
	r := &Runner{Driver: d, MemoryMiB: 512, Logger: testLogger(), WarmDir: t.TempDir()}
	imagetest.RunnerConformance(t, r, kilnDataDir())
	checkWarm(t, r)
	if err := r.Close(); err != nil {
		t.Error(err)
	}
	if ents, _ := os.ReadDir(r.WarmDir); len(ents) > 0 {
		t.Errorf("Close left %d entries in WarmDir", len(ents))
	}
	checkNoNetns(t)
}

// checkWarm fails if no step of r started warm. A fallback to a cold boot
// is only logged: a template's boot hangs as rarely as any boot does.
func checkWarm(t *testing.T, r *Runner) {
	t.Helper()
	if r.warm.warmed.Load() == 0 {
		t.Errorf("no step started warm (%d cold)", r.warm.cold.Load())
	} else if n := r.warm.cold.Load(); n > 0 {
		t.Logf("%d steps fell back to a cold boot", n)
	}
}

// TestRestoreRoot checks that what the agent writes into a build VM's
// root (resolv.conf, missing mount points) is undone, and what a step
// writes is kept. No VM: the agent's writes are simulated on the disk.
func TestRestoreRoot(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	tests := []struct {
		name    string
		setup   func(root string)
		step    func(t *testing.T, disk string) // what the step did, after the agent
		want    string                          // resolv.conf content, or "->target", or "" = absent
		wantDev bool                            // /dev still there
	}{
		{name: "absent before", setup: func(string) {}, want: ""},
		{name: "regular before", setup: func(r string) {
			os.WriteFile(filepath.Join(r, "etc/resolv.conf"), []byte("nameserver 9.9.9.9\n"), 0o640)
		}, want: "nameserver 9.9.9.9\n", wantDev: true},
		{name: "symlink before", setup: func(r string) { os.Symlink("../run/resolv.conf", filepath.Join(r, "etc/resolv.conf")) }, want: "->../run/resolv.conf", wantDev: true},
		{
			name:  "step wrote its own",
			setup: func(string) {},
			step: func(t *testing.T, disk string) {
				if err := rootfs.WriteFile(ctx, disk, "/etc/resolv.conf", []byte("nameserver 1.1.1.1\n"), 0o644, 0, 0); err != nil {
					t.Fatal(err)
				}
			},
			want: "nameserver 1.1.1.1\n",
		},
		{
			name:  "step filled a mount point",
			setup: func(string) {},
			step: func(t *testing.T, disk string) {
				if err := rootfs.WriteFile(ctx, disk, "/dev/keep", []byte("x"), 0o644, 0, 0); err != nil {
					t.Fatal(err)
				}
			},
			wantDev: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			root := filepath.Join(dir, "root")
			os.MkdirAll(filepath.Join(root, "etc"), 0o755)
			if tt.wantDev {
				os.MkdirAll(filepath.Join(root, "dev"), 0o755)
			}
			tt.setup(root)
			disk := filepath.Join(dir, "root.ext4")
			if err := rootfs.BuildExt4(ctx, root, disk, 0, "t"); err != nil {
				t.Fatal(err)
			}
			before, err := captureRoot(ctx, disk)
			if err != nil {
				t.Fatal(err)
			}
			// What the agent does at boot.
			if err := rootfs.Mkdir(ctx, disk, "/dev"); err != nil {
				t.Fatal(err)
			}
			if err := rootfs.Remove(ctx, disk, "/etc/resolv.conf"); err != nil {
				t.Fatal(err)
			}
			if err := rootfs.WriteFile(ctx, disk, "/etc/resolv.conf", []byte(agentResolvConf), 0o644, 0, 0); err != nil {
				t.Fatal(err)
			}
			if tt.step != nil {
				tt.step(t, disk)
			}
			if err := restoreRoot(ctx, disk, before); err != nil {
				t.Fatal(err)
			}
			got := ""
			if fi, err := rootfs.Stat(ctx, disk, "/etc/resolv.conf"); err == nil {
				if fi.Mode&0o170000 == 0o120000 {
					l, err := rootfs.Readlink(ctx, disk, "/etc/resolv.conf")
					if err != nil {
						t.Fatal(err)
					}
					got = "->" + l
				} else {
					b, err := rootfs.ReadFile(ctx, disk, "/etc/resolv.conf", 1<<20)
					if err != nil {
						t.Fatal(err)
					}
					got = string(b)
					if tt.name == "regular before" && (fi.Mode&0o777 != 0o640) {
						t.Errorf("mode %o, want 640", fi.Mode&0o777)
					}
				}
			}
			if got != tt.want {
				t.Errorf("resolv.conf = %q, want %q", got, tt.want)
			}
			_, err = rootfs.Stat(ctx, disk, "/dev")
			if (err == nil) != tt.wantDev {
				t.Errorf("/dev exists = %v, want %v", err == nil, tt.wantDev)
			}
			if err := exec.Command("e2fsck", "-n", "-f", disk).Run(); err != nil {
				t.Errorf("e2fsck after the edits: %v", err)
			}
		})
	}
}
