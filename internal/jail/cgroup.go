//go:build linux

package jail

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// cgroupRoot is where cgroup hierarchies are mounted (Configure).
var cgroupRoot = "/sys/fs/cgroup"

// CgroupVersion is "v2" (a unified hierarchy), "v1" (separate memory,
// pids and cpu hierarchies; the hybrid layout with an empty v2 hierarchy
// at /sys/fs/cgroup/unified counts as v1), or "" when neither is usable.
// A v2 hierarchy without the memory controller (all controllers bound to
// v1 hierarchies elsewhere) still places commands in cgroups of their
// own, but limits nothing: see CgroupLimits.
func CgroupVersion() string {
	versionOnce.Do(func() {
		switch {
		case hasController(filepath.Join(cgroupRoot, "cgroup.controllers"), "memory"):
			version, limits = "v2", true
		case dirExists(filepath.Join(cgroupRoot, "memory")):
			version, limits = "v1", true
		case isCgroup2FS(cgroupRoot):
			version, limits = "v2", false
		}
		switch {
		case version == "":
			slog.Warn("jail: no usable cgroup hierarchy (neither v2 nor v1 memory) under " + cgroupRoot + ": jailed commands cannot be limited")
		case !limits:
			slog.Warn("jail: the cgroup v2 hierarchy at " + cgroupRoot + " has no memory controller: jailed commands get cgroups of their own but no memory, pids or cpu limits")
		default:
			slog.Info("jail: using cgroup " + version + " for memory, pids and cpu limits")
		}
	})
	return version
}

// CgroupLimits says whether the jail's cgroups carry memory, pids and cpu
// limits (CgroupVersion found the controllers).
func CgroupLimits() bool {
	CgroupVersion()
	return limits
}

var (
	versionOnce sync.Once
	version     string
	limits      bool
)

func hasController(file, c string) bool {
	b, err := os.ReadFile(file)
	return err == nil && strings.Contains(" "+strings.TrimSpace(string(b))+" ", " "+c+" ")
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

var cgroupNameRe = regexp.MustCompile(`^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$`)

func checkCgroupName(name string) error {
	if !cgroupNameRe.MatchString(name) || len(name) > 200 {
		return fmt.Errorf("jail: cgroup name %q: use path components of letters, digits, '.', '_' or '-': %w", name, errdefs.ErrInvalid)
	}
	for _, c := range strings.Split(name, "/") {
		if c == "." || c == ".." {
			return fmt.Errorf("jail: cgroup name %q: no '.' or '..' components: %w", name, errdefs.ErrInvalid)
		}
	}
	return nil
}

// v1 controllers kiln sets limits with; cpu may be mounted as
// "cpu,cpuacct" with "cpu" a link to it, which the path resolves.
var v1Controllers = []string{"memory", "pids", "cpu"}

// v1Hierarchies are the directories of every cgroup hierarchy mounted
// under cgroupRoot (cgroup v1), kiln's controllers first, each once
// (cpu and cpuacct are often links to "cpu,cpuacct").
//
// QEMU joins a cgroup of its own in every one, not only in those that
// limit it: a process left in its parent's freezer, devices or
// name=systemd cgroup dies with the parent's container when the runtime
// kills what is in it (the node Pod's restart), and keeps the container's
// cgroups from being removed.
func v1Hierarchies() []string {
	v1Once.Do(func() {
		seen := map[string]bool{}
		add := func(name string) {
			p := filepath.Join(cgroupRoot, name)
			real, err := filepath.EvalSymlinks(p)
			if err != nil || seen[real] || !isCgroupFS(p) {
				return
			}
			seen[real] = true
			v1Dirs = append(v1Dirs, p)
		}
		for _, c := range v1Controllers {
			add(c)
		}
		entries, _ := os.ReadDir(cgroupRoot)
		for _, e := range entries {
			add(e.Name())
		}
	})
	return v1Dirs
}

var (
	v1Once sync.Once
	v1Dirs []string
)

func isCgroupFS(p string) bool {
	var st unix.Statfs_t
	return unix.Statfs(p, &st) == nil && (st.Type == unix.CGROUP_SUPER_MAGIC || st.Type == unix.CGROUP2_SUPER_MAGIC)
}

func isCgroup2FS(p string) bool {
	var st unix.Statfs_t
	return unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// cgroupDirs lists the directories of a cgroup name, one per hierarchy.
func cgroupDirs(name string) []string {
	switch CgroupVersion() {
	case "v2":
		return []string{filepath.Join(cgroupRoot, name)}
	case "v1":
		var out []string
		for _, h := range v1Hierarchies() {
			out = append(out, filepath.Join(h, name))
		}
		return out
	}
	return nil
}

// fillCpuset gives each new level of a v1 cpuset cgroup its parent's CPUs
// and memory nodes: a new cpuset cgroup starts with none, and joining it
// fails (ENOSPC) until it has some.
func fillCpuset(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, "cpuset.cpus")); err != nil {
		return nil // not the cpuset hierarchy
	}
	parent := filepath.Dir(dir)
	if _, err := os.Stat(filepath.Join(parent, "cpuset.cpus")); err == nil {
		if err := fillCpuset(parent); err != nil {
			return err
		}
	}
	for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return fmt.Errorf("jail: reading %s: %w", filepath.Join(dir, f), err)
		}
		if strings.TrimSpace(string(b)) != "" {
			continue
		}
		pb, err := os.ReadFile(filepath.Join(parent, f))
		if err != nil {
			return fmt.Errorf("jail: reading %s: %w", filepath.Join(parent, f), err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), pb, 0); err != nil {
			return fmt.Errorf("jail: setting %s: %w", filepath.Join(dir, f), err)
		}
	}
	return nil
}

// createCgroup makes the cgroup (reusing it if it exists) with its limits
// and returns its directories.
func createCgroup(c CgroupSpec) ([]string, error) {
	if err := checkCgroupName(c.Name); err != nil {
		return nil, err
	}
	v := CgroupVersion()
	if v == "" {
		return nil, fmt.Errorf("jail: no usable cgroup hierarchy under %s: %w", cgroupRoot, errdefs.ErrUnavailable)
	}
	dirs := cgroupDirs(c.Name)
	if !CgroupLimits() {
		// Placement only (see CgroupVersion): the cgroup still keeps the
		// command apart from its starter's.
		if err := os.MkdirAll(dirs[0], 0o755); err != nil {
			return nil, fmt.Errorf("jail: creating cgroup %s: %w", dirs[0], err)
		}
		return dirs, nil
	}
	if v == "v2" {
		if err := enableV2Controllers(c.Name); err != nil {
			return nil, err
		}
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("jail: creating cgroup %s: %w", d, err)
		}
		if v == "v1" {
			if err := fillCpuset(d); err != nil {
				return nil, err
			}
		}
	}
	set := func(file, val string) error {
		for _, d := range dirs {
			p := filepath.Join(d, file)
			if _, err := os.Stat(p); err != nil {
				continue // another controller's directory
			}
			if err := os.WriteFile(p, []byte(val), 0); err != nil {
				return fmt.Errorf("jail: setting %s to %s: %w", p, val, err)
			}
			return nil
		}
		return fmt.Errorf("jail: cgroup %s has no %s: %w", c.Name, file, errdefs.ErrUnavailable)
	}
	err := weighParents(v, dirs)
	if v == "v2" {
		if c.MemoryBytes > 0 {
			err = errors.Join(err, set("memory.max", strconv.FormatInt(c.MemoryBytes, 10)))
			// Swap would let the process use memory past its limit.
			set("memory.swap.max", "0")
		}
		if c.Pids > 0 {
			err = errors.Join(err, set("pids.max", strconv.FormatInt(c.Pids, 10)))
		}
		if c.CPUWeight > 0 {
			err = errors.Join(err, set("cpu.weight", strconv.FormatUint(min(max(c.CPUWeight, 1), 10000), 10)))
		}
	} else {
		if c.MemoryBytes > 0 {
			err = errors.Join(err, set("memory.limit_in_bytes", strconv.FormatInt(c.MemoryBytes, 10)))
			// Only present with swap accounting; it must not be below
			// the memory limit, hence after it.
			set("memory.memsw.limit_in_bytes", strconv.FormatInt(c.MemoryBytes, 10))
		}
		if c.Pids > 0 {
			err = errors.Join(err, set("pids.max", strconv.FormatInt(c.Pids, 10)))
		}
		if c.CPUWeight > 0 {
			shares := max(c.CPUWeight*1024/100, 2)
			err = errors.Join(err, set("cpu.shares", strconv.FormatUint(shares, 10)))
		}
	}
	if err != nil {
		return nil, err
	}
	return dirs, nil
}

// weighParents gives the group holding every VM's cgroup (kiln/) the CPU
// weight of one ordinary task per host CPU. Left at the default it would
// weigh like a single task against every other runnable task on the host,
// so all VMs together would starve (boot timeouts) whenever the host is
// busy; before the jail each QEMU thread weighed as a task of its own.
func weighParents(v string, dirs []string) error {
	file, val := "cpu.shares", strconv.Itoa(min(1024*runtime.NumCPU(), 262144))
	if v == "v2" {
		file, val = "cpu.weight", strconv.Itoa(min(100*runtime.NumCPU(), 10000))
	}
	for _, d := range dirs {
		p := filepath.Join(filepath.Dir(d), file)
		if parent := filepath.Dir(d); parent == cgroupRoot || (v == "v1" && filepath.Dir(parent) == cgroupRoot) {
			continue // a hierarchy's root has no weight to set
		}
		if _, err := os.Stat(p); err != nil {
			continue // another controller's directory
		}
		if err := os.WriteFile(p, []byte(val), 0); err != nil {
			return fmt.Errorf("jail: setting %s to %s: %w", p, val, err)
		}
	}
	return nil
}

// enableV2Controllers lets every level above the cgroup hand memory, pids
// and cpu down to its children.
func enableV2Controllers(name string) error {
	parts := strings.Split(name, "/")
	dir := cgroupRoot
	for _, p := range parts[:len(parts)-1] {
		if err := writeSubtree(dir); err != nil {
			return err
		}
		dir = filepath.Join(dir, p)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("jail: creating cgroup %s: %w", dir, err)
		}
	}
	return writeSubtree(dir)
}

func writeSubtree(dir string) error {
	f := filepath.Join(dir, "cgroup.subtree_control")
	for _, c := range []string{"memory", "pids", "cpu"} {
		if hasController(f, c) {
			continue
		}
		if err := os.WriteFile(f, []byte("+"+c), 0); err != nil && c == "memory" {
			return fmt.Errorf("jail: enabling %s in %s: %w", c, f, err)
		}
	}
	return nil
}

// CgroupDirs returns the host directories of cgroup name (one per
// hierarchy), existing or not; tests read limits from them.
func CgroupDirs(name string) []string { return cgroupDirs(name) }

// RemoveCgroup removes the cgroup once its processes are gone. A process
// that just died may linger briefly as a zombie in it: retry for a moment.
func RemoveCgroup(name string) error {
	if err := checkCgroupName(name); err != nil {
		return err
	}
	var errs []error
	for _, d := range cgroupDirs(name) {
		var err error
		for i := 0; i < 50; i++ {
			err = os.Remove(d)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("jail: removing cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// ListCgroups returns the names of the cgroups directly below parent
// (e.g. "kiln"), as found in the first hierarchy.
func ListCgroups(parent string) ([]string, error) {
	if err := checkCgroupName(parent); err != nil {
		return nil, err
	}
	dirs := cgroupDirs(parent)
	if len(dirs) == 0 {
		return nil, nil
	}
	var out []string
	seen := map[string]bool{}
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		for _, e := range entries {
			if e.IsDir() && !seen[e.Name()] {
				seen[e.Name()] = true
				out = append(out, parent+"/"+e.Name())
			}
		}
	}
	return out, nil
}

// CgroupPopulated says whether any process is in the cgroup.
func CgroupPopulated(name string) bool {
	for _, d := range cgroupDirs(name) {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err == nil && len(strings.TrimSpace(string(b))) > 0 {
			return true
		}
	}
	return false
}
