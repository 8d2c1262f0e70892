package dockerfile

import (
	"os"
	"path/filepath"
	"testing"
)

// TestExamplesParse keeps the Dockerfiles in examples/ within what kiln
// supports.
func TestExamplesParse(t *testing.T) {
	tests := []struct {
		dir    string
		stages int
		base   Base
	}{
		{dir: "python-http", stages: 1, base: Base{Kind: BaseManaged, Ref: "debian-12"}},
		{dir: "go-multistage", stages: 2, base: Base{Kind: BaseManaged, Ref: "debian-12"}},
		{dir: "ready-hook", stages: 1, base: Base{Kind: BaseManaged, Ref: "debian-12"}},
	}
	for _, tt := range tests {
		t.Run(tt.dir, func(t *testing.T) {
			f, err := os.Open(filepath.Join("..", "..", "..", "examples", tt.dir, "Dockerfile"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			p, err := Parse(f, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(p.Stages) != tt.stages || p.Final().Base != tt.base {
				t.Fatalf("stages = %d, final base = %+v", len(p.Stages), p.Final().Base)
			}
		})
	}
}
