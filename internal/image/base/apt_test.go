package base

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestAptSources(t *testing.T) {
	etc := t.TempDir()
	os.MkdirAll(filepath.Join(etc, "sources.list.d"), 0o755)
	os.WriteFile(filepath.Join(etc, "sources.list.d", "debian.sources"), []byte(`Types: deb
# a comment inside the stanza
URIs: http://mirror.test/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.test/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.test/debian
Suites: bookworm
Components: main
Enabled: no

types: deb
uris: http://security.test/debian-security
suites: bookworm-security
components: main
 contrib
`), 0o644)
	os.WriteFile(filepath.Join(etc, "sources.list"), []byte("# old style\ndeb [arch=amd64 signed-by=/k.gpg] http://line.test/debian bookworm main contrib\ndeb-src http://x/ bookworm main\n"), 0o644)
	os.WriteFile(filepath.Join(etc, "sources.list.d", "x.list.disabled"), []byte("deb http://no.test/ bookworm main\n"), 0o644)
	got, err := HostAptSources(etc)
	if err != nil {
		t.Fatal(err)
	}
	want := []AptSource{
		{URI: "http://mirror.test/debian", Suites: []string{"bookworm", "bookworm-updates"}, Components: []string{"main"}},
		{URI: "http://security.test/debian-security", Suites: []string{"bookworm-security"}, Components: []string{"main", "contrib"}},
		{URI: "http://line.test/debian", Suites: []string{"bookworm"}, Components: []string{"main", "contrib"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	tests := []struct {
		suite, want string
		ok          bool
	}{
		{"bookworm", "http://mirror.test/debian", true},
		{"bookworm-security", "http://security.test/debian-security", true},
		{"trixie", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.suite, func(t *testing.T) {
			m, ok := MirrorFor(got, tt.suite)
			if m != tt.want || ok != tt.ok {
				t.Fatalf("MirrorFor(%q) = %q, %v", tt.suite, m, ok)
			}
		})
	}
}
