//go:build linux

package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// SetupCommand is what the user runs to install what the engine needs.
const SetupCommand = "make setup"

// ResolveAccel says which accelerator New would choose for requested, and
// why, without starting anything (for `kiln server --require-kvm`).
func ResolveAccel(requested string) (vmm.Accel, string, error) { return chooseAccel(requested) }

// chooseAccel resolves "auto", "kvm" or "tcg" to an accelerator and says why.
// PVM (/sys/module/kvm_pvm) exposes /dev/kvm but emulates privileged
// instructions, which is slower than TCG by far for a stock guest kernel.
func chooseAccel(requested string) (vmm.Accel, string, error) {
	switch requested {
	case "kvm":
		if _, err := os.Stat("/dev/kvm"); err != nil {
			return "", "", fmt.Errorf("--accel kvm: /dev/kvm is not available: %w", errdefs.ErrUnavailable)
		}
		return vmm.AccelKVM, "requested with --accel kvm", nil
	case "tcg":
		return vmm.AccelTCG, "requested with --accel tcg", nil
	case "", "auto":
	default:
		return "", "", fmt.Errorf("accelerator %q: use auto, kvm or tcg: %w", requested, errdefs.ErrInvalid)
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return vmm.AccelTCG, "/dev/kvm is provided by PVM (kvm_pvm loaded), which runs stock guest kernels far slower than TCG", nil
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return vmm.AccelTCG, fmt.Sprintf("/dev/kvm is not usable (%v)", err), nil
	}
	f.Close()
	return vmm.AccelKVM, "/dev/kvm is available", nil
}

var tcgWarning sync.Once

func warnTCG(log *slog.Logger) {
	tcgWarning.Do(func() {
		log.Warn("using TCG software emulation: it is NOT a security boundary (QEMU's security policy covers KVM only); use it for development, never for untrusted code in production")
	})
}

// machineFor picks the machine type for an accelerator. Under TCG the
// microvm machine hung in about 5% of boots here (calibrate_delay waits
// for a PIT tick that never comes) while q35 hung in none of 80, so TCG
// gets q35 (which also brings ACPI and so vmgenid).
func machineFor(a vmm.Accel) (machine, cpu string) {
	if a == vmm.AccelKVM {
		return "microvm", "host"
	}
	return "q35", "max"
}

var versionRe = regexp.MustCompile(`version ([0-9]+\.[0-9]+\.[0-9]+)`)

// qemuVersion runs the binary once to learn its version.
func qemuVersion(ctx context.Context, bin string) (string, error) {
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("running %s --version: %v: %w", bin, err, errdefs.ErrUnavailable)
	}
	m := versionRe.FindStringSubmatch(string(out))
	if m == nil {
		return "", fmt.Errorf("cannot read the version of %s from %q: %w", bin, strings.TrimSpace(string(out)), errdefs.ErrUnavailable)
	}
	return m[1], nil
}

// checkPrerequisites turns a missing QEMU, kernel or module into an error
// that names the set-up command.
func checkPrerequisites(cfg *Config) error {
	var missing []string
	for _, bin := range []*string{&cfg.QEMU, &cfg.QEMUImg} {
		p, err := exec.LookPath(*bin)
		if err != nil {
			missing = append(missing, fmt.Sprintf("%s (not on PATH)", *bin))
			continue
		}
		*bin = p
	}
	for _, f := range []string{cfg.kernelPath(), filepath.Join(cfg.KernelDir, "modules.list")} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if mods, err := cfg.modules(); err == nil {
		for _, m := range mods {
			if _, err := os.Stat(filepath.Join(cfg.KernelDir, "modules", m)); err != nil {
				missing = append(missing, filepath.Join(cfg.KernelDir, "modules", m))
			}
		}
	}
	if _, err := os.Stat(cfg.AgentBinary); err != nil {
		missing = append(missing, fmt.Sprintf("kiln-agent binary %s (build it with `make build`)", cfg.AgentBinary))
	}
	if len(missing) > 0 {
		return fmt.Errorf("the VM engine is not set up: missing %s; run `%s` (data dir %s): %w",
			strings.Join(missing, ", "), SetupCommand, cfg.DataDir, errdefs.ErrUnavailable)
	}
	return nil
}

func (c *Config) kernelPath() string { return filepath.Join(c.KernelDir, "vmlinuz") }

func (c *Config) modules() ([]string, error) {
	b, err := os.ReadFile(filepath.Join(c.KernelDir, "modules.list"))
	if err != nil {
		return nil, err
	}
	var mods []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			if strings.Contains(l, "/") {
				return nil, errors.New("modules.list: entries must be file names")
			}
			mods = append(mods, l)
		}
	}
	return mods, nil
}

// hostCPUFeatures fingerprints what KVM's "host" CPU model shows a guest:
// the vendor, family, model and feature flags of the first processor in
// /proc/cpuinfo.
func hostCPUFeatures() (string, error) {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", fmt.Errorf("reading the host CPU's features: %w", err)
	}
	return cpuFingerprint(string(b))
}

func cpuFingerprint(cpuinfo string) (string, error) {
	want := map[string]string{"vendor_id": "", "cpu family": "", "model": "", "flags": ""}
	for _, line := range strings.Split(cpuinfo, "\n") {
		if strings.TrimSpace(line) == "" {
			break // the end of the first processor's block
		}
		k, v, ok := strings.Cut(line, ":")
		if k = strings.TrimSpace(k); ok {
			if _, asked := want[k]; asked {
				want[k] = strings.TrimSpace(v)
			}
		}
	}
	if want["vendor_id"] == "" || want["flags"] == "" {
		return "", fmt.Errorf("/proc/cpuinfo names no vendor or flags for the first processor: %w", errdefs.ErrUnavailable)
	}
	flags := strings.Fields(want["flags"])
	slices.Sort(flags)
	sum := sha256.Sum256([]byte(want["vendor_id"] + "|" + want["cpu family"] + "|" + want["model"] + "|" + strings.Join(flags, " ")))
	return hex.EncodeToString(sum[:8]), nil
}
