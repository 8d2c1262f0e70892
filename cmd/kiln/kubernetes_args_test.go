package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestKubernetesCommandLines: every container of deploy/kubernetes/base
// runs a kiln command that exists, with flags that command accepts (the
// manifests' own tests cannot see cmd/kiln). $(VAR) references are
// filled with a stand-in value as the kubelet would fill them.
func TestKubernetesCommandLines(t *testing.T) {
	files, _ := filepath.Glob("../../deploy/kubernetes/base/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests in deploy/kubernetes/base")
	}
	seen := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range strings.Split(string(b), "\n---\n") {
			var kind struct{ Kind string }
			if err := yaml.Unmarshal([]byte(doc), &kind); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			var spec *corev1.PodSpec
			switch kind.Kind {
			case "Deployment":
				var d appsv1.Deployment
				if err := yaml.UnmarshalStrict([]byte(doc), &d); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				spec = &d.Spec.Template.Spec
			case "DaemonSet":
				var d appsv1.DaemonSet
				if err := yaml.UnmarshalStrict([]byte(doc), &d); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				spec = &d.Spec.Template.Spec
			default:
				continue
			}
			for _, c := range spec.Containers {
				args := make([]string, len(c.Args))
				for i, a := range c.Args {
					args[i] = regexp.MustCompile(`\$\([A-Z_]+\)`).ReplaceAllString(a, "10.0.0.1")
				}
				cmd, rest, err := rootCmd.Find(args)
				if err != nil || cmd == rootCmd {
					t.Errorf("%s/%s: kiln %v: no such command (%v)", f, c.Name, c.Args, err)
					continue
				}
				seen[cmd.Name()] = true
				if err := cmd.ParseFlags(rest); err != nil {
					t.Errorf("%s/%s: kiln %s: %v", f, c.Name, cmd.Name(), err)
				} else if len(cmd.Flags().Args()) > 0 {
					t.Errorf("%s/%s: kiln %s: stray arguments %v", f, c.Name, cmd.Name(), cmd.Flags().Args())
				}
				// Back to the defaults for the tests that run commands.
				cmd.Flags().VisitAll(func(fl *pflag.Flag) {
					if fl.Changed {
						fl.Value.Set(fl.DefValue)
						fl.Changed = false
					}
				})
			}
		}
	}
	for _, role := range []string{"control", "node", "edge"} {
		if !seen[role] {
			t.Errorf("no manifest runs kiln %s", role)
		}
	}
}
