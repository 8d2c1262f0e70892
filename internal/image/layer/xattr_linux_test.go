//go:build linux

package layer

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// TestCopyTreeKeepsCapabilities: COPY --from of a file with capabilities
// (ping) keeps them and user attributes, after the chown that clears
// them; host-meaningful attributes (trusted.*) are not copied.
func TestCopyTreeKeepsCapabilities(t *testing.T) {
	testenv.NeedRoot(t, "set capabilities and trusted.* attributes")
	srcDir, dstDir := t.TempDir(), t.TempDir()
	ping := filepath.Join(srcDir, "ping")
	if err := os.WriteFile(ping, []byte("#!ping"), 0o755); err != nil {
		t.Fatal(err)
	}
	capv := []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0} // cap_net_raw+ep
	for name, val := range map[string][]byte{"security.capability": capv, "user.origin": []byte("debian"), "trusted.secret": []byte("host")} {
		if err := unix.Setxattr(ping, name, val, 0); err != nil {
			t.Skipf("setting %s on the test folder's file system: %v", name, err)
		}
	}
	src, _ := os.OpenRoot(srcDir)
	defer src.Close()
	dst, _ := os.OpenRoot(dstDir)
	defer dst.Close()
	opts := CopyOptions{Options: Options{Rootfs: true, Owner: &Owner{UID: 65534, GID: 65534}, Limits: DefaultImageLimits}}
	if err := CopyTree(context.Background(), src, "ping", dst, "bin/ping", opts); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dstDir, "bin/ping")
	buf := make([]byte, 64)
	tests := []struct {
		name string
		want string // "" = must be absent
	}{
		{"security.capability", string(capv)},
		{"user.origin", "debian"},
		{"trusted.secret", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := unix.Getxattr(out, tt.name, buf)
			switch {
			case tt.want == "" && err == nil:
				t.Errorf("%s was copied", tt.name)
			case tt.want != "" && (err != nil || string(buf[:n]) != tt.want):
				t.Errorf("%s = %x, %v; want %x", tt.name, buf[:max(n, 0)], err, tt.want)
			}
		})
	}
}
