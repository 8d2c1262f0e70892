package proto

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// maxPathLen bounds a path in a listing (Linux's PATH_MAX).
const maxPathLen = 4096

// ValidateListing checks a ListDirResult the guest sent for a request of
// dir and depth: the host relays it to clients, so an entry must be one of
// the known types, name a clean absolute path under dir at most depth
// levels down (dir itself for depth 0), whose last element is its name,
// and stay within the bounds the agent promises.
func ValidateListing(dir string, depth int, res ListDirResult) error {
	dir = path.Clean(dir)
	if len(res.Entries) > MaxListEntries {
		return fmt.Errorf("%d entries, more than %d", len(res.Entries), MaxListEntries)
	}
	if depth == 0 && len(res.Entries) != 1 {
		return fmt.Errorf("%d entries for one path", len(res.Entries))
	}
	for i, e := range res.Entries {
		switch e.Type {
		case FileRegular, FileDir, FileSymlink, FileOther:
		default:
			return fmt.Errorf("entry %d: unknown type %q", i, e.Type)
		}
		if len(e.Path) > maxPathLen || len(e.Target) > maxPathLen || len(e.Owner) > 256 || len(e.Group) > 256 {
			return fmt.Errorf("entry %d: field too long", i)
		}
		if !path.IsAbs(e.Path) || path.Clean(e.Path) != e.Path || strings.ContainsRune(e.Path, 0) {
			return fmt.Errorf("entry %d: path %q is not clean and absolute", i, e.Path)
		}
		if e.Size < 0 || e.Mode > 0o7777 {
			return fmt.Errorf("entry %d: bad size or mode", i)
		}
		if depth == 0 {
			if e.Path != dir {
				return fmt.Errorf("entry %d: path %q is not %q", i, e.Path, dir)
			}
			continue
		}
		if e.Name != path.Base(e.Path) {
			return fmt.Errorf("entry %d: name %q does not end path %q", i, e.Name, e.Path)
		}
		rel, ok := strings.CutPrefix(e.Path, strings.TrimSuffix(dir, "/")+"/")
		if !ok || rel == "" {
			return errors.New("entry outside the listed directory")
		}
		if strings.Count(rel, "/")+1 > depth {
			return fmt.Errorf("entry %d: %q deeper than %d", i, e.Path, depth)
		}
	}
	return nil
}
