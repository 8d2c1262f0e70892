//go:build linux

package imagebuild

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestBuilderLeavesDriverFilesAlone: the builder reaches VMs, disks and
// templates only through vmm.Driver. It names none of the QEMU driver's
// files, runs no qemu-img and imports neither the driver nor the qcow2
// parser, so another driver can serve it. (Before CommitDisk and
// CopyTemplate it read VMDIR/disk.qcow2 and rewrote template files.)
func TestBuilderLeavesDriverFilesAlone(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	driverFiles := []string{"disk.qcow2", "overlay.qcow2", "chain.json", "template.json", "vm.json", "qemu-img"}
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		file, err := parser.ParseFile(fset, f, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range file.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); strings.HasSuffix(p, "/internal/vmm/qemu") || strings.HasSuffix(p, "/internal/qcow2") {
				t.Errorf("%s imports %s: ask vmm.Driver instead", f, p)
			}
		}
		ast.Inspect(file, func(n ast.Node) bool {
			lit, ok := n.(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return true
			}
			s, _ := strconv.Unquote(lit.Value)
			for _, name := range driverFiles {
				if strings.Contains(s, name) {
					t.Errorf("%s: %q names the driver's %s: ask vmm.Driver instead", fset.Position(lit.Pos()), s, name)
				}
			}
			return true
		})
	}
}
