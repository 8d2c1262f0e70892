//go:build linux

package qemu

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
)

// TestKillStraysSparesClaimedAndOthers starts real, idle QEMU processes:
// of this data directory, only the one not claimed is killed; a claimed
// one, one of another data directory whose path ends in this one's, and a
// process not named QEMU that names this directory all live on.
func TestKillStraysSparesClaimedAndOthers(t *testing.T) {
	dataDir := shortDir(t)
	d := newDriver(t, dataDir)
	idle := func(argv0, sock string) *exec.Cmd {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(d.cfg.QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S",
			"-chardev", "socket,id=c,path="+sock+",server=on,wait=off")
		cmd.Args[0] = argv0
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
		return cmd
	}
	stray := idle(d.cfg.QEMU, filepath.Join(d.vmsDir(), "stray", "c.sock"))
	claimed := idle(d.cfg.QEMU, filepath.Join(d.vmsDir(), "claimed", "c.sock"))
	foreign := idle(d.cfg.QEMU, filepath.Join(shortDir(t), dataDir, "vms", "x", "c.sock"))
	unnamed := idle("emulator", filepath.Join(d.vmsDir(), "unnamed", "c.sock"))

	killed := d.killStrays(map[int]bool{claimed.Process.Pid: true})
	if !slices.Equal(killed, []int{stray.Process.Pid}) {
		t.Errorf("killed %v, want only the unclaimed QEMU %d", killed, stray.Process.Pid)
	}
	for name, cmd := range map[string]*exec.Cmd{"claimed": claimed, "foreign": foreign, "unnamed": unnamed} {
		// Signal 0 would also succeed on a zombie: the state tells.
		if st, err := procStat(cmd.Process.Pid); err != nil || st[0] == "Z" {
			t.Errorf("the %s process was killed", name)
		}
	}
	stray.Wait()
	if ws, ok := stray.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("the stray QEMU ended with %v, want SIGKILL", stray.ProcessState)
	}
}

func TestNamesDir(t *testing.T) {
	const dir = "/var/lib/kiln/vms/"
	for _, tt := range []struct {
		arg  string
		want bool
	}{
		{"/var/lib/kiln/vms/a/disk", true},
		{"socket,id=c,path=/var/lib/kiln/vms/a/c.sock,server=on", true},
		{"unix:/var/lib/kiln/vms/a/qmp.sock,server=on", true},
		{"memory-backend-file,id=mem0,mem-path=/var/lib/kiln/vms/a/mem", true},
		{"a,/var/lib/kiln/vms/b", true},
		// Another data directory whose path ends in this one's.
		{"path=/srv/var/lib/kiln/vms/a/c.sock", false},
		{"/srv/var/lib/kiln/vms/a", false},
		// A later mention of the directory itself still counts.
		{"path=/srv/var/lib/kiln/vms/a,path=/var/lib/kiln/vms/b", true},
		{"/var/lib/kiln/vmsx/a", false},
		{"/var/lib/kiln/vms", false},
		{"", false},
	} {
		if got := namesDir(tt.arg, dir); got != tt.want {
			t.Errorf("namesDir(%q) = %v, want %v", tt.arg, got, tt.want)
		}
	}
}
