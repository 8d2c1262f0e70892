//go:build linux

package guest

import (
	"bytes"
	"debug/elf"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// module is a kernel module from the initramfs with its .modinfo.
type module struct {
	name    string // as listed, e.g. "virtio_net.ko"
	base    string // kernel name, e.g. "virtio_net"
	aliases []string
	depends []string
	parsed  bool
	loaded  bool
}

// loadModules loads, in list order, the modules this VM needs: those whose
// aliases match a device present (the way udev coldplug does), those given
// parameters on the kernel command line, modules without device aliases
// that nothing else depends on, and the dependencies of all of these. Under
// TCG each finit_module costs 30-140 ms, so skipping drivers for absent
// devices (the NIC, vsock, virtio-mmio on q35) is a large part of boot.
// A module named skip is not loaded.
func loadModules(log *slog.Logger, skip string) {
	list, err := os.ReadFile(filepath.Join(modulesDir, "modules.list"))
	if err != nil {
		log.Warn("no module list", "err", err)
		return
	}
	t0 := time.Now()
	var mods []*module
	byBase := map[string]*module{}
	for _, name := range strings.Fields(string(list)) {
		if strings.HasPrefix(name, "#") {
			continue
		}
		if filepath.Base(name) == skip {
			continue
		}
		m := readModinfo(filepath.Join(modulesDir, filepath.Base(name)))
		m.name = filepath.Base(name)
		m.base = strings.ReplaceAll(strings.TrimSuffix(m.name, ".ko"), "-", "_")
		mods = append(mods, m)
		byBase[m.base] = m
	}
	needed := map[string]bool{} // modules some other listed module depends on
	for _, m := range mods {
		for _, d := range m.depends {
			needed[d] = true
		}
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	log.Debug("read modinfo", "elapsed", time.Since(t0))

	var load func(m *module)
	load = func(m *module) {
		if m.loaded {
			return
		}
		m.loaded = true
		for _, d := range m.depends {
			if dm := byBase[d]; dm != nil {
				load(dm)
			}
		}
		t := time.Now()
		if err := loadModule(filepath.Join(modulesDir, m.name)); err != nil {
			log.Warn("loading module", "module", m.name, "err", err)
			return
		}
		log.Debug("loaded module", "module", m.name, "elapsed", time.Since(t))
	}
	// A bus driver (virtio_mmio) makes new devices appear: rescan until
	// nothing more loads.
	for pass := 0; pass < 4; pass++ {
		t1 := time.Now()
		devs := scanDevices()
		log.Debug("scanned devices", "virtio", len(devs.virtio), "elapsed", time.Since(t1))
		progress := false
		for _, m := range mods {
			if m.loaded {
				continue
			}
			want := !m.parsed ||
				bytes.Contains(cmdline, []byte(m.base+".")) ||
				(len(m.aliases) == 0 && !needed[m.base]) ||
				devs.wants(m.aliases)
			if want {
				load(m)
				progress = true
			}
		}
		if !progress {
			break
		}
	}
	for _, m := range mods {
		if !m.loaded {
			log.Debug("skipped module: no matching device", "module", m.name)
		}
	}
}

// readModinfo reads a module's aliases and dependencies from its .modinfo
// section. On failure parsed stays false and the module is loaded anyway.
func readModinfo(file string) *module {
	m := &module{}
	f, err := elf.Open(file)
	if err != nil {
		return m
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return m
	}
	data, err := sec.Data()
	if err != nil {
		return m
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "alias":
			m.aliases = append(m.aliases, v)
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					m.depends = append(m.depends, strings.ReplaceAll(d, "-", "_"))
				}
			}
		}
	}
	m.parsed = true
	return m
}

// devices is what the agent knows about the VM's hardware. Reading every
// modalias in sysfs took ~0.5 s under TCG (ACPI devices), more than the
// modules it would spare, so only cheap sources are read: virtio device
// modaliases, the names of ACPI devices, and whether a device tree exists.
type devices struct {
	virtio     []string
	acpiIDs    map[string]bool
	deviceTree bool
}

func scanDevices() devices {
	d := devices{acpiIDs: map[string]bool{}}
	files, _ := filepath.Glob("/sys/bus/virtio/devices/*/modalias")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil {
			d.virtio = append(d.virtio, strings.TrimSpace(string(b)))
		}
	}
	if ents, err := os.ReadDir("/sys/bus/acpi/devices"); err == nil {
		for _, e := range ents {
			id, _, _ := strings.Cut(e.Name(), ":") // "LNRO0005:00"
			d.acpiIDs[id] = true
		}
	}
	_, err := os.Stat("/sys/firmware/devicetree/base")
	d.deviceTree = err == nil
	return d
}

// wants reports whether a module with these aliases drives a device that
// is present. Alias kinds it cannot check cheaply count as present: loading
// a needless module is slow, missing a needed one breaks the VM.
func (d devices) wants(aliases []string) bool {
	for _, a := range aliases {
		kind, rest, _ := strings.Cut(a, ":")
		switch {
		case kind == "virtio":
			for _, v := range d.virtio {
				if globMatch(a, v) {
					return true
				}
			}
		case strings.HasPrefix(kind, "acpi"):
			// "acpi*:LNRO0005:*": the second field is the ACPI id.
			id, _, _ := strings.Cut(rest, ":")
			if strings.ContainsAny(id, "*?[") {
				return true
			}
			if d.acpiIDs[id] {
				return true
			}
		case kind == "of":
			if d.deviceTree {
				return true
			}
		default:
			return true
		}
	}
	return false
}

// globMatch matches like the kernel's fnmatch for module aliases: '*' spans
// any characters (including '/'), '?' one; brackets go to path.Match.
func globMatch(pattern, s string) bool {
	if strings.Contains(pattern, "[") {
		ok, _ := path.Match(pattern, s)
		return ok
	}
	for len(pattern) > 0 {
		switch pattern[0] {
		case '*':
			for i := len(s); i >= 0; i-- {
				if globMatch(pattern[1:], s[i:]) {
					return true
				}
			}
			return false
		case '?':
			if s == "" {
				return false
			}
		default:
			if s == "" || s[0] != pattern[0] {
				return false
			}
		}
		pattern, s = pattern[1:], s[1:]
	}
	return s == ""
}
