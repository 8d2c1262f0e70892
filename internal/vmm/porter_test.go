package vmm

import (
	"encoding/json"
	"testing"
)

func validManifest() *TemplateManifest {
	return &TemplateManifest{Template: Template{MemoryMiB: 256, VCPUs: 1},
		Files: []TemplateFile{{Name: "mem", Size: 256 << 20}, {Name: "state", Size: 1 << 20}, {Name: "disk.qcow2", Size: 1 << 20}, {Name: "layer1.raw", Size: 1 << 30}}}
}

func TestCheckManifest(t *testing.T) {
	if err := CheckManifest(validManifest()); err != nil {
		t.Fatal(err)
	}
	for name, change := range map[string]func(*TemplateManifest){
		"path in a name":     func(m *TemplateManifest) { m.Files[3].Name = "../layer1.raw" },
		"layer out of order": func(m *TemplateManifest) { m.Files[3].Name = "layer2.raw" },
		"unknown format":     func(m *TemplateManifest) { m.Files[3].Name = "layer1.vmdk" },
		"mem not its size":   func(m *TemplateManifest) { m.Files[0].Size = 1 },
		"huge state":         func(m *TemplateManifest) { m.Files[1].Size = MaxTemplateState + 1 },
		"no layer":           func(m *TemplateManifest) { m.Files = m.Files[:3] },
		"files swapped":      func(m *TemplateManifest) { m.Files[1], m.Files[2] = m.Files[2], m.Files[1] },
		"no memory":          func(m *TemplateManifest) { m.Template.MemoryMiB = 0 },
	} {
		m := validManifest()
		change(m)
		if CheckManifest(m) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	m := validManifest()
	for _, p := range []TemplatePart{{File: 4, Data: []byte{1}}, {File: 1, Offset: 1 << 20, Data: []byte{1}},
		{File: 1, Offset: -1, Data: []byte{1}}, {File: 1}, {Manifest: m, Data: []byte{1}}} {
		if CheckPart(m, p) == nil {
			t.Errorf("part %+v accepted", p)
		}
	}
}

// FuzzTemplateParts: whatever a peer sends, an accepted part lies inside
// a file of an accepted manifest.
func FuzzTemplateParts(f *testing.F) {
	b, _ := json.Marshal(validManifest())
	f.Add(b, 3, int64(0), 10)
	f.Add([]byte(`{"template":{"memory_mib":1,"vcpus":1},"files":[{"name":"mem","size":1048576},{"name":"state"},{"name":"disk.qcow2"},{"name":"layer1.qcow2"}]}`), 1, int64(5), 1)
	f.Fuzz(func(t *testing.T, manifest []byte, file int, off int64, n int) {
		var m TemplateManifest
		if json.Unmarshal(manifest, &m) != nil || CheckManifest(&m) != nil {
			return
		}
		if n < 0 || n > MaxTemplatePartData+1 {
			return
		}
		p := TemplatePart{File: file, Offset: off, Data: make([]byte, n)}
		if CheckPart(&m, p) == nil && (off < 0 || off+int64(n) > m.Files[file].Size || n == 0) {
			t.Fatalf("part %d bytes at %d of file %d (%d bytes) accepted", n, off, file, m.Files[file].Size)
		}
	})
}
