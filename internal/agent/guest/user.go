//go:build linux

package guest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// identity is who a workload runs as.
type identity struct {
	uid, gid uint32
	groups   []uint32
	home     string
	name     string
}

// lookupUser resolves "name", "uid", "name:group" or "uid:gid" against
// /etc/passwd and /etc/group under root, like container runtimes do: a
// numeric uid missing from /etc/passwd is allowed (gid 0, home "/").
func lookupUser(root, spec string) (identity, error) {
	id := identity{home: "/root", name: "root"}
	if spec == "" {
		spec = "0"
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	passwd, _ := readColonFile(filepath.Join(root, "etc/passwd"))
	groups, _ := readColonFile(filepath.Join(root, "etc/group"))

	found := false
	uidNum, numErr := strconv.ParseUint(userPart, 10, 32)
	for _, f := range passwd {
		if len(f) < 7 {
			continue
		}
		if f[0] == userPart || (numErr == nil && f[2] == userPart) {
			uid, err1 := strconv.ParseUint(f[2], 10, 32)
			gid, err2 := strconv.ParseUint(f[3], 10, 32)
			if err1 != nil || err2 != nil {
				continue
			}
			id = identity{uid: uint32(uid), gid: uint32(gid), home: f[5], name: f[0]}
			found = true
			break
		}
	}
	if !found {
		if numErr != nil {
			return id, fmt.Errorf("user %q not found in /etc/passwd", userPart)
		}
		id = identity{uid: uint32(uidNum), gid: 0, home: "/"}
	}
	if hasGroup {
		gidNum, err := strconv.ParseUint(groupPart, 10, 32)
		if err != nil {
			ok := false
			for _, f := range groups {
				if len(f) >= 3 && f[0] == groupPart {
					if g, err := strconv.ParseUint(f[2], 10, 32); err == nil {
						gidNum, ok = g, true
						break
					}
				}
			}
			if !ok {
				return id, fmt.Errorf("group %q not found in /etc/group", groupPart)
			}
		}
		id.gid = uint32(gidNum)
	}
	// Supplementary groups: every group listing the user as a member,
	// unless the group was named, as runc does.
	id.groups = []uint32{id.gid}
	if id.name != "" && !hasGroup {
		for _, f := range groups {
			if len(f) < 4 {
				continue
			}
			for _, m := range strings.Split(f[3], ",") {
				if m == id.name {
					if g, err := strconv.ParseUint(f[2], 10, 32); err == nil && uint32(g) != id.gid {
						id.groups = append(id.groups, uint32(g))
					}
				}
			}
		}
	}
	if id.home == "" {
		id.home = "/"
	}
	return id, nil
}

// readColonFile reads a passwd-style file (bounded: these are small).
func readColonFile(path string) ([][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() && len(out) < 100000 {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out, sc.Err()
}
