//go:build linux

package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Extra disks (vmm.BootSpec.Disks) come, like the root chain, as
// descriptors: a read-write disk as two (read-write, read-only), a
// read-only one as one, after the TAP's. QEMU opens them as raw whatever
// their content: a guest that wrote a qcow2 header into one gets no
// other file opened on its next use. Their device nodes follow the root
// disk's, so the root stays the guest's first disk (/dev/vda).

// maxExtraDisks bounds BootSpec.Disks.
const maxExtraDisks = 8

// extraDiskFDSet is the descriptor set of extra disk i, above any layer's.
func extraDiskFDSet(i int) int { return 64 + i }

var serialRE = regexp.MustCompile(`^[a-z0-9-]{1,20}$`)

func checkExtraDisks(ds []vmm.Disk) ([]vmm.Disk, error) {
	if len(ds) > maxExtraDisks {
		return nil, fmt.Errorf("%d extra disks, at most %d: %w", len(ds), maxExtraDisks, errdefs.ErrInvalid)
	}
	out := make([]vmm.Disk, 0, len(ds))
	seen := map[string]bool{}
	for _, d := range ds {
		p, err := filepath.Abs(d.Path)
		if err != nil {
			return nil, err
		}
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return nil, fmt.Errorf("extra disk %q is not a file: %w", d.Path, errdefs.ErrInvalid)
		}
		if !serialRE.MatchString(d.Serial) || seen[d.Serial] {
			return nil, fmt.Errorf("extra disk serial %q: use 1-20 of a-z, 0-9 and '-', each once: %w", d.Serial, errdefs.ErrInvalid)
		}
		seen[d.Serial] = true
		out = append(out, vmm.Disk{Path: p, ReadOnly: d.ReadOnly, Serial: d.Serial})
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// firstExtraDiskFD is the first descriptor after the chain's and the TAP's.
func (v *vm) firstExtraDiskFD() int {
	fd := v.tapFD()
	if v.meta.Net != nil {
		fd++
	}
	return fd
}

// openExtraDisks opens the extra disks in the order extraDiskArgs names
// their descriptors.
func (v *vm) openExtraDisks() ([]*os.File, error) {
	var files []*os.File
	for _, d := range v.meta.Disks {
		modes := []int{os.O_RDWR, os.O_RDONLY}
		if d.ReadOnly {
			modes = modes[1:]
		}
		for _, m := range modes {
			f, err := os.OpenFile(d.Path, m, 0)
			if err != nil {
				for _, f := range files {
					f.Close()
				}
				return nil, fmt.Errorf("opening extra disk: %w", err)
			}
			files = append(files, f)
		}
	}
	return files, nil
}

func (v *vm) extraDiskArgs(bus string) []string {
	var a []string
	fd := v.firstExtraDiskFD()
	for i, d := range v.meta.Disks {
		set := extraDiskFDSet(i)
		n := 2
		if d.ReadOnly {
			n = 1
		}
		for k := 0; k < n; k++ {
			a = append(a, "-add-fd", fmt.Sprintf("fd=%d,set=%d", fd, set))
			fd++
		}
		node := fmt.Sprintf("xdisk%d", i)
		cache := map[string]any{"direct": false, "no-flush": false}
		file := map[string]any{"driver": "file", "node-name": node + "-file", "filename": fmt.Sprintf("/dev/fdset/%d", set),
			"read-only": d.ReadOnly, "cache": cache}
		raw := map[string]any{"driver": "raw", "node-name": node, "file": node + "-file", "read-only": d.ReadOnly, "cache": cache}
		a = append(a, "-blockdev", jsonArg(file), "-blockdev", jsonArg(raw),
			"-device", "virtio-blk-"+bus+",drive="+node+",serial="+d.Serial+",write-cache=on")
	}
	return a
}
