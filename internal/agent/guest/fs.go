//go:build linux

package guest

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// listDir answers proto.ListDirRequest: the entry of req.Path with depth 0,
// else its entries down to req.Depth levels (breadth first, so a truncated
// answer holds the shallow entries). Links are reported, never followed.
func listDir(req proto.ListDirRequest) (proto.ListDirResult, error) {
	if !filepath.IsAbs(req.Path) {
		return proto.ListDirResult{}, fmt.Errorf("list: path %q is not absolute", req.Path)
	}
	if req.Depth < 0 || req.Depth > proto.MaxListDepth {
		return proto.ListDirResult{}, fmt.Errorf("list: depth %d outside [0, %d]", req.Depth, proto.MaxListDepth)
	}
	root := filepath.Clean(req.Path)
	names := ownerNames()
	fi, err := os.Lstat(root)
	if err != nil {
		return proto.ListDirResult{}, fmt.Errorf("list: %w", err)
	}
	if req.Depth == 0 {
		return proto.ListDirResult{Entries: []proto.DirEntry{dirEntry(root, fi, names)}}, nil
	}
	if !fi.IsDir() {
		return proto.ListDirResult{}, fmt.Errorf("list: %s: %w", root, syscall.ENOTDIR)
	}
	var res proto.ListDirResult
	level := []string{root}
	for depth := 1; depth <= req.Depth && len(level) > 0; depth++ {
		var next []string
		for _, dir := range level {
			ents, err := os.ReadDir(dir)
			if err != nil {
				if dir == root {
					return proto.ListDirResult{}, fmt.Errorf("list: %w", err)
				}
				continue // a subdirectory vanished or is unreadable: skip it
			}
			for _, de := range ents {
				if len(res.Entries) >= proto.MaxListEntries {
					res.Truncated = true
					return res, nil
				}
				p := filepath.Join(dir, de.Name())
				info, err := os.Lstat(p)
				if err != nil {
					continue
				}
				res.Entries = append(res.Entries, dirEntry(p, info, names))
				if info.IsDir() {
					next = append(next, p)
				}
			}
		}
		level = next
	}
	return res, nil
}

// idNames maps uids and gids to names from /etc/passwd and /etc/group.
type idNames struct{ users, groups map[string]string }

func ownerNames() idNames {
	n := idNames{users: map[string]string{}, groups: map[string]string{}}
	for file, m := range map[string]map[string]string{"/etc/passwd": n.users, "/etc/group": n.groups} {
		rows, _ := readColonFile(file)
		for _, f := range rows {
			if len(f) >= 3 {
				m[f[2]] = f[0]
			}
		}
	}
	return n
}

func dirEntry(p string, fi fs.FileInfo, names idNames) proto.DirEntry {
	e := proto.DirEntry{Name: fi.Name(), Path: p, Size: fi.Size(), Mode: uint32(fi.Mode().Perm()), ModTime: fi.ModTime().UTC()}
	if p == "/" {
		e.Name = "/"
	}
	if fi.Mode()&fs.ModeSetuid != 0 {
		e.Mode |= syscall.S_ISUID
	}
	if fi.Mode()&fs.ModeSetgid != 0 {
		e.Mode |= syscall.S_ISGID
	}
	if fi.Mode()&fs.ModeSticky != 0 {
		e.Mode |= syscall.S_ISVTX
	}
	switch {
	case fi.Mode().IsRegular():
		e.Type = proto.FileRegular
	case fi.IsDir():
		e.Type = proto.FileDir
	case fi.Mode()&fs.ModeSymlink != 0:
		e.Type = proto.FileSymlink
		e.Target, _ = os.Readlink(p)
	default:
		e.Type = proto.FileOther
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.UID, e.GID = st.Uid, st.Gid
		e.Owner = names.users[strconv.FormatUint(uint64(st.Uid), 10)]
		e.Group = names.groups[strconv.FormatUint(uint64(st.Gid), 10)]
	}
	return e
}
