//go:build linux

package layer

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// maxXattrBytes bounds the name list and each value read from a source
// file (Linux's own limit for one value is 64 KiB).
const maxXattrBytes = 64 << 10

// keptXattr says which extended attributes a copy into an image root
// keeps: file capabilities (ping's cap_net_raw) and user attributes. Not
// trusted.* or security labels, which mean something to the host.
func keptXattr(name string) bool {
	return name == "security.capability" || strings.HasPrefix(name, "user.")
}

// copyXattrs copies the kept extended attributes of in onto target in
// dst. It runs after chown, which clears file capabilities. A file system
// that has no extended attributes (or refuses one) is not an error.
func copyXattrs(in *os.File, dst *os.Root, target string) error {
	buf := make([]byte, maxXattrBytes)
	n, err := unix.Flistxattr(int(in.Fd()), buf)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ERANGE) {
			return nil
		}
		return fmt.Errorf("listing extended attributes: %w", err)
	}
	var names []string
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		if len(name) > 0 && keptXattr(string(name)) {
			names = append(names, string(name))
		}
	}
	if len(names) == 0 {
		return nil
	}
	out, err := dst.OpenFile(target, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer out.Close()
	val := make([]byte, maxXattrBytes)
	for _, name := range names {
		m, err := unix.Fgetxattr(int(in.Fd()), name, val)
		if err != nil {
			continue // gone, or larger than we read: not copied
		}
		if err := unix.Fsetxattr(int(out.Fd()), name, val[:m], 0); err != nil && !errors.Is(err, unix.ENOTSUP) && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("setting %s on %q: %w", name, target, err)
		}
	}
	return nil
}
