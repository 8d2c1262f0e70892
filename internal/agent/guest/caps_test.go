//go:build linux

package guest

import (
	"os"
	"slices"
	"syscall"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// TestCapExecCmd: an app with the default set goes through the capexec
// step as root, carrying its ids in the arguments; "" and "all" exec the
// workload directly; an unknown set is refused rather than run with all.
func TestCapExecCmd(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root, as the agent runs")
	}
	argv := []string{"app", "--flag"}
	for _, set := range []string{"", proto.CapsAll} {
		attr := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 5}}
		path, args, err := capExecCmd("/bin/app", proto.ExecRequest{Argv: argv, Caps: set}, attr)
		if err != nil || path != "/bin/app" || !slices.Equal(args, argv) || attr.Credential == nil {
			t.Errorf("caps %q: %s %v %v", set, path, args, err)
		}
	}
	attr := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1001, Groups: []uint32{7, 8}}}
	path, args, err := capExecCmd("/bin/app", proto.ExecRequest{Argv: argv, Caps: proto.CapsDefault}, attr)
	want := []string{CapExecArg0, proto.CapsDefault, "1000", "1001", "7,8", "/bin/app", "app", "--flag"}
	if err != nil || path != "/proc/self/exe" || !slices.Equal(args, want) {
		t.Errorf("default: %s %q %v, want /proc/self/exe %q", path, args, err, want)
	}
	if attr.Credential != nil {
		t.Error("the capexec step must start as root; the credential stayed")
	}
	if _, _, err := capExecCmd("/bin/app", proto.ExecRequest{Argv: argv, Caps: "some"}, &syscall.SysProcAttr{}); err == nil {
		t.Error("unknown capability set accepted")
	}
}
