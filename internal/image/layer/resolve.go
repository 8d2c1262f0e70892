package layer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"
)

// maxLinks bounds symlink hops while resolving, as the kernel's ELOOP does.
const maxLinks = 40

// ResolveInRoot resolves name (slash-separated, relative to the root)
// the way the guest will see it: symbolic links are followed with "/"
// meaning the root, not the host's "/", and ".." never climbs above the
// root. Components that do not exist yet are kept as written. This lets a
// COPY into /var/run/x land in /run/x when /var/run -> /run, which
// os.Root alone refuses because the link is absolute.
func ResolveInRoot(root *os.Root, name string) (string, error) {
	var resolved []string
	todo := splitPath(name)
	hops := 0
	for len(todo) > 0 {
		part := todo[0]
		todo = todo[1:]
		switch part {
		case "", ".":
			continue
		case "..":
			if len(resolved) > 0 {
				resolved = resolved[:len(resolved)-1]
			}
			continue
		}
		cur := path.Join(append(append([]string{}, resolved...), part)...)
		fi, err := root.Lstat(cur)
		if errors.Is(err, fs.ErrNotExist) {
			// The rest does not exist: keep it as written.
			resolved = append(resolved, part)
			for _, p := range todo {
				if p == ".." {
					return "", fmt.Errorf("%w: %q climbs out of a path that does not exist", ErrUnsafe, name)
				}
				if p != "" && p != "." {
					resolved = append(resolved, p)
				}
			}
			break
		}
		if err != nil {
			return "", fmt.Errorf("resolving %q: %w", name, err)
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			resolved = append(resolved, part)
			continue
		}
		hops++
		if hops > maxLinks {
			return "", fmt.Errorf("%w: too many symlinks resolving %q", ErrUnsafe, name)
		}
		target, err := root.Readlink(cur)
		if err != nil {
			return "", fmt.Errorf("resolving %q: %w", name, err)
		}
		if strings.HasPrefix(target, "/") {
			resolved = nil
		}
		todo = append(splitPath(target), todo...)
	}
	if len(resolved) == 0 {
		return ".", nil
	}
	return path.Join(resolved...), nil
}

func splitPath(p string) []string { return strings.Split(p, "/") }
