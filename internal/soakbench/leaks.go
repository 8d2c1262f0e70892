//go:build linux

package soakbench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// Leaks counts what is left of one data directory's VMs once every
// record is TERMINATED and the server has stopped. Host state other
// kilns share (the `inet kiln` table of the host namespace, IP
// forwarding) is not counted; per-VM state is counted only when it names
// a VM of this data directory, so parallel kilns on the host do not count.
type Leaks struct {
	QEMUProcesses     int      `json:"qemuProcesses"`
	NetworkNamespaces int      `json:"networkNamespaces"`
	HostLinks         int      `json:"hostLinks"`
	TAPDevices        int      `json:"tapDevices"`
	NftablesTables    int      `json:"nftablesTables"`
	Cgroups           int      `json:"cgroups"`
	Mounts            int      `json:"mounts"`
	Files             int      `json:"files"`
	Details           []string `json:"details,omitempty"`
}

// Total is the sum of every count.
func (l Leaks) Total() int {
	return l.QEMUProcesses + l.NetworkNamespaces + l.HostLinks + l.TAPDevices + l.NftablesTables + l.Cgroups + l.Mounts + l.Files
}

func (l *Leaks) add(n *int, format string, args ...any) {
	*n++
	if len(l.Details) < 200 {
		l.Details = append(l.Details, fmt.Sprintf(format, args...))
	}
}

// vmIDRe matches the VM ids kiln makes: microVMs and the build VMs of
// internal/imagebuild.
var vmIDRe = regexp.MustCompile(`\b(?:mvm|build|image|bench)-[0-9a-f]{6,32}\b`)

// vmIDsIn returns the VM ids named in a server log.
func vmIDsIn(log []byte) []string {
	var ids []string
	for _, m := range vmIDRe.FindAll(log, -1) {
		ids = append(ids, string(m))
	}
	return ids
}

// cgroupGlobs find the VM cgroups (v2, then v1's hierarchies) whose
// names end in a data directory's suffix.
var cgroupGlobs = []string{"/sys/fs/cgroup/kiln/*.", "/sys/fs/cgroup/memory/kiln/*.", "/sys/fs/cgroup/pids/kiln/*.", "/sys/fs/cgroup/cpu/kiln/*."}

// countLeaks counts, with no live record left, everything that still
// belongs to data's VMs. ids are the VM ids known to have existed;
// images are the image directories of versions the store holds.
func countLeaks(ctx context.Context, data string, ids []string, images map[string]bool) Leaks {
	var l Leaks
	seen := map[string]bool{}
	for _, sub := range []string{"vms", "net"} {
		ents, _ := os.ReadDir(filepath.Join(data, sub))
		for _, e := range ents {
			ids = append(ids, e.Name())
		}
	}
	var all []string
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			all = append(all, id)
		}
	}
	sort.Strings(all)
	suffix := qemu.CgroupSuffix(data)

	for _, pid := range qemu.Processes(data) {
		l.add(&l.QEMUProcesses, "qemu process %d", pid)
	}
	for _, id := range all {
		ns := filepath.Join(netns.NetnsDir, netns.NSPrefix+id)
		if _, err := os.Stat(ns); err == nil {
			l.add(&l.NetworkNamespaces, "network namespace %s", ns)
			if inNS(ctx, netns.NSPrefix+id, "ip", "-o", "link", "show", netns.TapName) {
				l.add(&l.TAPDevices, "tap %s in %s", netns.TapName, ns)
			}
			if inNS(ctx, netns.NSPrefix+id, "nft", "list", "table", "inet", netns.TableName) {
				l.add(&l.NftablesTables, "nftables table inet %s in %s", netns.TableName, ns)
			}
		}
		if link := netns.HostLinkName(id); linkExists(link) {
			l.add(&l.HostLinks, "host link %s of %s", link, id)
		}
	}
	for _, pat := range cgroupGlobs {
		m, _ := filepath.Glob(pat + suffix)
		for _, d := range m {
			l.add(&l.Cgroups, "cgroup %s", d)
		}
	}
	for _, mp := range mountsUnder(data) {
		l.add(&l.Mounts, "mount %s", mp)
	}
	for _, f := range strayFiles(data, images) {
		l.add(&l.Files, "file %s", f)
	}
	return l
}

// inNS says whether the command succeeds in the named network namespace.
func inNS(ctx context.Context, ns string, args ...string) bool {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...).Run() == nil
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// mountsUnder lists the mount points at or under dir.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// strayFiles lists what no live record owns once every microVM is
// TERMINATED and no build runs: anything in DATA_DIR/vms (VM
// directories, jails), DATA_DIR/net and DATA_DIR/tmp (build work), run-time files other than the shared initramfs images,
// image directories of no version, and temporary files anywhere (a write
// cut short by a kill).
func strayFiles(data string, images map[string]bool) []string {
	var out []string
	for _, sub := range []string{"vms", "net", "tmp"} {
		ents, _ := os.ReadDir(filepath.Join(data, sub))
		for _, e := range ents {
			out = append(out, filepath.Join(data, sub, e.Name()))
		}
	}
	ents, _ := os.ReadDir(filepath.Join(data, "run"))
	for _, e := range ents {
		if n := e.Name(); !(strings.HasPrefix(n, "initrd-") && strings.HasSuffix(n, ".img")) {
			out = append(out, filepath.Join(data, "run", n))
		}
	}
	vers, _ := filepath.Glob(filepath.Join(data, "images", "*", "*", "*"))
	for _, v := range vers {
		if !images[v] {
			out = append(out, v)
		}
	}
	filepath.WalkDir(data, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && p != data && (d.Type()&fs.ModeSymlink != 0 || filepath.Base(p) == "kernel") {
			return fs.SkipDir
		}
		if n := d.Name(); strings.HasSuffix(n, ".tmp") || strings.HasPrefix(n, ".tmp") || strings.Contains(n, ".tmp-") {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// removeAll is the clean-up after a soak that failed before its end:
// kills the QEMUs of data and removes its VMs' networks and cgroups, so
// that a failed run leaves nothing on the host.
func removeAll(data string, ids []string, progress io.Writer) {
	suffix := qemu.CgroupSuffix(data)
	qemu.KillProcesses(data) // each waited for
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		if err := netns.Teardown(context.Background(), id); err != nil {
			fmt.Fprintf(progress, "soak: removing the network of %s: %v\n", id, err)
		}
	}
	for _, pat := range cgroupGlobs {
		m, _ := filepath.Glob(pat + suffix)
		for _, d := range m {
			os.Remove(d)
		}
	}
}
