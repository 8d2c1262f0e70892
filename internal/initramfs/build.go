package initramfs

import (
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// ModulesDir is where the agent looks for kernel modules and modules.list.
const ModulesDir = "lib/modules/kiln"

// Build writes a gzip-compressed newc cpio archive holding the agent binary
// as /init, the modules of moduleList (file names inside modulesDir, with
// or without ".ko") under /lib/modules/kiln with a modules.list giving the
// load order, /dev/console (so the kernel can give /init its stdio) and the
// mount points the agent needs.
func Build(w io.Writer, agentBinary string, modulesDir string, moduleList []string) error {
	// BestSpeed: the archive is rebuilt on the host often and read once by
	// the guest kernel; size barely matters next to the build time.
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	if err := BuildUncompressed(zw, agentBinary, modulesDir, moduleList); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compressing initramfs: %w", err)
	}
	return nil
}

// BuildUncompressed is Build without the gzip layer. The kernel takes a
// plain cpio as well; under TCG it boots ~0.3 s faster (measured: unpacking
// took 0.2 s instead of 0.6 s for a 10 MiB agent), at the price of a larger
// file for QEMU to load.
func BuildUncompressed(w io.Writer, agentBinary string, modulesDir string, moduleList []string) error {
	agent, err := os.ReadFile(agentBinary)
	if err != nil {
		return fmt.Errorf("reading agent binary: %w", err)
	}
	entries := []entry{
		dir("dev"), dir("proc"), dir("sys"), dir("newroot"), dir("etc"), dir("tmp"),
		dir("lib"), dir("lib/modules"), dir(ModulesDir),
		{name: "dev/console", mode: sIFCHR | 0o600, rdevM: 5, rdevm: 1},
		{name: "dev/null", mode: sIFCHR | 0o666, rdevM: 1, rdevm: 3},
		file("init", 0o755, agent),
	}
	var names []string
	for _, m := range moduleList {
		m = strings.TrimSpace(m)
		if m == "" || strings.HasPrefix(m, "#") {
			continue
		}
		base := filepath.Base(m)
		if !strings.HasSuffix(base, ".ko") {
			base += ".ko"
		}
		data, err := os.ReadFile(filepath.Join(modulesDir, base))
		if err != nil {
			return fmt.Errorf("reading module %s: %w", base, err)
		}
		entries = append(entries, file(ModulesDir+"/"+base, 0o644, data))
		names = append(names, base)
	}
	entries = append(entries, file(ModulesDir+"/modules.list", 0o644, []byte(strings.Join(names, "\n")+"\n")))

	cw := &cpioWriter{w: w}
	for _, e := range entries {
		if err := cw.add(e); err != nil {
			return fmt.Errorf("writing initramfs entry %s: %w", e.name, err)
		}
	}
	if err := cw.close(); err != nil {
		return fmt.Errorf("writing initramfs trailer: %w", err)
	}
	return nil
}
