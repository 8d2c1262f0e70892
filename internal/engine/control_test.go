//go:build linux

package engine

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
)

var _ ControlPlane = (*lifecycle.StoreControl)(nil)

// TestNoStoreAccess: the engine reaches the control plane only through
// ControlPlane. None of its (non-test) files names an interface of
// internal/store (store.Store, store.Cluster, store.UsageStore, ...), and
// no field of Config is one, so the records' types are all it shares with
// the store.
func TestNoStoreAccess(t *testing.T) {
	fset := token.NewFileSet()
	storeIfaces := map[string]bool{}
	for _, name := range goFiles(t, filepath.Join("..", "store")) {
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if ts, ok := n.(*ast.TypeSpec); ok {
				if _, ok := ts.Type.(*ast.InterfaceType); ok {
					storeIfaces[ts.Name.Name] = true
				}
			}
			return true
		})
	}
	if !storeIfaces["Store"] || !storeIfaces["Cluster"] {
		t.Fatalf("found no store.Store or store.Cluster among %v: has internal/store moved?", storeIfaces)
	}
	for _, name := range goFiles(t, ".") {
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if id, ok := sel.X.(*ast.Ident); ok && id.Name == "store" && storeIfaces[sel.Sel.Name] {
				t.Errorf("%s: the engine uses store.%s; go through ControlPlane instead", fset.Position(sel.Pos()), sel.Sel.Name)
			}
			return true
		})
	}
	cfg := reflect.TypeOf(Config{})
	for i := range cfg.NumField() {
		ft := cfg.Field(i).Type
		for ft.Kind() == reflect.Pointer || ft.Kind() == reflect.Slice {
			ft = ft.Elem()
		}
		if strings.HasSuffix(ft.PkgPath(), "/internal/store") && ft.Kind() == reflect.Interface {
			t.Errorf("engine.Config.%s is a %s: the engine must not hold the store", cfg.Field(i).Name, ft)
		}
	}
}

// goFiles lists the non-test Go files of the package in dir.
func goFiles(t *testing.T, dir string) []string {
	t.Helper()
	all, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, name := range all {
		if !strings.HasSuffix(name, "_test.go") {
			out = append(out, name)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no Go files in %s", dir)
	}
	return out
}
