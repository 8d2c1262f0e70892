//go:build linux

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// A VM's disk is a chain: its own qcow2 overlay (disk.qcow2) on top of
// the layers below it: for a booted VM the raw root disk, for a clone the
// template's disk.qcow2 and whatever that stood on. A qcow2 header names
// its backing file, and QEMU would open that name; but a compromised QEMU
// can rewrite the header of the overlay it writes to, and the next QEMU
// would then open any file it names. So kiln records the chain itself
// (vm.json, and chain.json in a template), opens every layer and hands
// QEMU the descriptors, linking the nodes with explicit backing
// references: QEMU never opens a path it read from a header.

// layer is one image below the VM's overlay.
type layer struct {
	Path   string `json:"path"`
	Format string `json:"format"` // raw or qcow2
}

const chainFile = "chain.json"

// node names; a migration's two sides agree on them because both build
// them from the same chain.
func layerNode(i int) string { return fmt.Sprintf("layer%d", i+1) }

const topNode = "disk0"

// Descriptor sets: the overlay's read-write and read-only descriptors in
// set diskFDSet, layer i's read-only one in set diskFDSet+1+i.
func layerFDSet(i int) int { return diskFDSet + 1 + i }

// openChain opens the overlay (read-write and read-only) and every layer
// (read-only), in the order blockdevArgs expects them as descriptors.
func (v *vm) openChain() ([]*os.File, error) {
	var files []*os.File
	fail := func(err error) ([]*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	rw, err := os.OpenFile(v.path("disk.qcow2"), os.O_RDWR, 0)
	if err != nil {
		return fail(err)
	}
	files = append(files, rw)
	ro, err := os.Open(v.path("disk.qcow2"))
	if err != nil {
		return fail(err)
	}
	files = append(files, ro)
	for _, l := range v.meta.Chain {
		f, err := os.Open(l.Path)
		if err != nil {
			return fail(fmt.Errorf("opening disk layer: %w", err))
		}
		files = append(files, f)
	}
	return files, nil
}

// blockdevArgs describes the chain to QEMU; the descriptors start at
// firstFD in openChain's order.
func (v *vm) blockdevArgs(firstFD int) []string {
	cache := map[string]any{"direct": false, "no-flush": v.meta.ScratchDisk}
	a := []string{
		"-add-fd", fmt.Sprintf("fd=%d,set=%d", firstFD, diskFDSet),
		"-add-fd", fmt.Sprintf("fd=%d,set=%d", firstFD+1, diskFDSet),
	}
	for i := range v.meta.Chain {
		a = append(a, "-add-fd", fmt.Sprintf("fd=%d,set=%d", firstFD+2+i, layerFDSet(i)))
	}
	// Bottom up, so every backing reference names a node defined before.
	for i := len(v.meta.Chain) - 1; i >= 0; i-- {
		l := v.meta.Chain[i]
		file := map[string]any{"driver": "file", "node-name": layerNode(i) + "-file",
			"filename": fmt.Sprintf("/dev/fdset/%d", layerFDSet(i)), "read-only": true, "cache": cache}
		node := map[string]any{"driver": l.Format, "node-name": layerNode(i), "file": layerNode(i) + "-file",
			"read-only": true, "cache": cache}
		if l.Format == "qcow2" {
			if i+1 < len(v.meta.Chain) {
				node["backing"] = layerNode(i + 1)
			} else {
				node["backing"] = nil
			}
		}
		a = append(a, "-blockdev", jsonArg(file), "-blockdev", jsonArg(node))
	}
	file := map[string]any{"driver": "file", "node-name": topNode + "-file",
		"filename": fmt.Sprintf("/dev/fdset/%d", diskFDSet), "discard": "unmap", "cache": cache}
	top := map[string]any{"driver": "qcow2", "node-name": topNode, "file": topNode + "-file",
		"discard": "unmap", "cache": cache, "backing": nil}
	if len(v.meta.Chain) > 0 {
		top["backing"] = layerNode(0)
	}
	return append(a, "-blockdev", jsonArg(file), "-blockdev", jsonArg(top))
}

func jsonArg(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // maps of strings, bools and nil always marshal
	}
	return string(b)
}

// writeChain records a template's chain: its disk.qcow2, then what the
// snapshotted VM's overlay stood on.
func writeChain(dir string, below []layer) error {
	c := append([]layer{{Path: filepath.Join(dir, "disk.qcow2"), Format: "qcow2"}}, below...)
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, chainFile), b)
}

// readChain returns a template's chain (its disk.qcow2 first), which is
// what a clone's overlay stands on. A template made before chains
// were recorded, or copied elsewhere (its chain.json then names the
// original's files; the image cache copies templates and points their
// disk at its own root with qemu-img rebase), learns its chain once from
// the headers, which kiln itself wrote in those cases, and records it.
func (d *Driver) readChain(ctx context.Context, dir string) ([]layer, error) {
	top := filepath.Join(dir, "disk.qcow2")
	b, err := os.ReadFile(filepath.Join(dir, chainFile))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var c []layer
	if err == nil {
		if err := json.Unmarshal(b, &c); err != nil || len(c) == 0 {
			return nil, fmt.Errorf("template %s: malformed %s: %w", dir, chainFile, errdefs.ErrInvalid)
		}
	}
	if len(c) == 0 || c[0].Path != top {
		if c, err = d.chainFromHeaders(ctx, top); err != nil {
			return nil, err
		}
		d.log.Info("template had no disk chain of its own: read it from the image headers once", "template", dir)
		if err := writeChain(dir, c[1:]); err != nil {
			return nil, err
		}
	}
	for _, l := range c {
		if !filepath.IsAbs(l.Path) || (l.Format != "raw" && l.Format != "qcow2") {
			return nil, fmt.Errorf("template %s: bad disk layer %q (%s): %w", dir, l.Path, l.Format, errdefs.ErrInvalid)
		}
	}
	return c, nil
}

func (d *Driver) chainFromHeaders(ctx context.Context, top string) ([]layer, error) {
	out, err := exec.CommandContext(ctx, d.cfg.QEMUImg, "info", "-U", "--backing-chain", "--output=json", top).Output()
	if err != nil {
		return nil, fmt.Errorf("reading the disk chain of %s: %w", top, err)
	}
	var infos []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if err := json.Unmarshal(out, &infos); err != nil || len(infos) == 0 {
		return nil, fmt.Errorf("reading the disk chain of %s: %v: %w", top, err, errdefs.ErrInvalid)
	}
	var c []layer
	for _, i := range infos {
		c = append(c, layer{Path: i.Filename, Format: i.Format})
	}
	return c, nil
}

// statKey identifies a file by device and inode.
func statKey(path string) ([2]uint64, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return [2]uint64{}, false
	}
	return [2]uint64{st.Dev, st.Ino}, true
}
