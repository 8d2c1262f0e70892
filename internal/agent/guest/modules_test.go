//go:build linux

package guest

import (
	"os"
	"testing"
)

func TestGlobMatch(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"virtio:d00000002v*", "virtio:d00000002v00001AF4", true},
		{"virtio:d00000002v*", "virtio:d00000001v00001AF4", false},
		{"acpi*:LNRO0005:*", "acpi:LNRO0005:", true},
		{"acpi*:LNRO0005:*", "acpi:PNP0A08:", false},
		{"of:N*T*Cvirtio,mmio", "of:NvirtioTCvirtio,mmio", true},
		{"pci:v00001AF4d*sv*sd*bc*sc*i*", "pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00", true},
		{"a?c", "abc", true},
		{"a?c", "ac", false},
		{"x[0-9]", "x5", true},
		{"*", "", true},
		{"", "a", false},
	}
	for _, tt := range tests {
		t.Run(tt.pattern+"~"+tt.s, func(t *testing.T) {
			if got := globMatch(tt.pattern, tt.s); got != tt.want {
				t.Errorf("globMatch(%q, %q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
			}
		})
	}
}

func TestReadModinfoNotAModule(t *testing.T) {
	// The test binary is an ELF without .modinfo: not parsed, so the agent
	// would load it rather than guess.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if m := readModinfo(exe); m.parsed {
		t.Errorf("parsed a .modinfo from %s", exe)
	}
	if m := readModinfo("/no/such/file.ko"); m.parsed {
		t.Error("parsed a missing file")
	}
}
