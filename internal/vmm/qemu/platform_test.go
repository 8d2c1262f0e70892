//go:build linux

package qemu

import (
	"errors"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

const cpuinfoA = `processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 85
flags		: fpu vme sse4_2 avx2 avx512f

processor	: 1
vendor_id	: GenuineIntel
cpu family	: 6
model		: 85
flags		: fpu vme sse4_2 avx2 avx512f
`

// TestCPUFingerprint: the fingerprint follows the first processor's
// vendor, model and flags (their order aside), so a host without a
// feature the snapshot's host had has another one.
func TestCPUFingerprint(t *testing.T) {
	a, err := cpuFingerprint(cpuinfoA)
	if err != nil {
		t.Fatal(err)
	}
	reordered, _ := cpuFingerprint(strings.Replace(cpuinfoA, "fpu vme sse4_2 avx2 avx512f", "avx512f fpu vme avx2 sse4_2", 1))
	if reordered != a {
		t.Errorf("flag order changed the fingerprint: %s vs %s", reordered, a)
	}
	noAVX512, _ := cpuFingerprint(strings.ReplaceAll(cpuinfoA, " avx512f", ""))
	if noAVX512 == a {
		t.Error("a host without avx512f has the same fingerprint")
	}
	otherModel, _ := cpuFingerprint(strings.Replace(cpuinfoA, "model\t\t: 85", "model\t\t: 106", 1))
	if otherModel == a {
		t.Error("another CPU model has the same fingerprint")
	}
	if _, err := cpuFingerprint("processor : 0\n"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("cpuinfo without flags: %v", err)
	}
	if _, err := hostCPUFeatures(); err != nil {
		t.Errorf("this host: %v", err)
	}
}

// TestPlatformRefusesOtherCPU: a snapshot from a host whose CPU shows
// other features is refused, saying so, even when QEMU and machine match.
func TestPlatformRefusesOtherCPU(t *testing.T) {
	here := vmm.Platform{QEMUVersion: "10.0.0", Machine: "microvm", Accel: vmm.AccelKVM, CPU: "host", CPUFeatures: "aaaa"}
	if err := comparePlatform("template t", here, here); err != nil {
		t.Fatal(err)
	}
	made := here
	made.CPUFeatures = "bbbb"
	err := comparePlatform("template t", made, here)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "CPU with other features") {
		t.Errorf("other CPU features: %v", err)
	}
	made = here
	made.QEMUVersion = "9.2.0"
	if err := comparePlatform("template t", made, here); err == nil || !strings.Contains(err.Error(), "QEMU 9.2.0") {
		t.Errorf("other QEMU: %v", err)
	}
}
