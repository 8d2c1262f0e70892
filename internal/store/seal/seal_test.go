package seal

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestSealOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secrets.key")
	s, err := LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != KeySize {
		t.Fatalf("key file: %v %v", fi, err)
	}
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	v, err := s.Seal(secret, "AKIAEXAMPLE")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(v, secret) || !IsSealed(v) {
		t.Fatalf("sealed value %q", v)
	}
	if got, err := s.Open(v, "AKIAEXAMPLE"); err != nil || got != secret {
		t.Fatalf("Open = %q, %v", got, err)
	}
	if _, err := s.Open(v, "AKIAOTHER"); err == nil {
		t.Error("a sealed secret opened under another key id")
	}
	// The same key file gives the same sealer; another does not open it.
	s2, err := LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Open(v, "AKIAEXAMPLE"); err != nil || got != secret {
		t.Fatalf("reloaded key: %q, %v", got, err)
	}
	s3, err := LoadOrCreate(filepath.Join(t.TempDir(), "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s3.Open(v, "AKIAEXAMPLE"); err == nil {
		t.Error("opened with another key")
	}
}

func TestLoadOrCreateRace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secrets.key")
	var wg sync.WaitGroup
	vals := make([]string, 8)
	sealers := make([]*Sealer, 8)
	for i := range sealers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := LoadOrCreate(path)
			if err != nil {
				t.Error(err)
				return
			}
			sealers[i] = s
		}()
	}
	wg.Wait()
	for i, s := range sealers {
		v, err := s.Seal("x", "id")
		if err != nil {
			t.Fatal(err)
		}
		vals[i] = v
	}
	for _, v := range vals {
		for _, s := range sealers {
			if _, err := s.Open(v, "id"); err != nil {
				t.Fatalf("racing creators made different keys: %v", err)
			}
		}
	}
}

func TestShortKeyRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secrets.key")
	os.WriteFile(path, []byte("short"), 0o600)
	if _, err := LoadOrCreate(path); err == nil {
		t.Fatal("short key accepted")
	}
}

// FuzzOpen: stored values come from a database a thief or a bug may have
// altered; Open must fail cleanly, never panic.
func FuzzOpen(f *testing.F) {
	s, err := New(make([]byte, KeySize))
	if err != nil {
		f.Fatal(err)
	}
	v, _ := s.Seal("secret", "id")
	f.Add(v)
	f.Add(prefix)
	f.Add(prefix + "AAAA")
	f.Add("plain")
	f.Fuzz(func(t *testing.T, in string) {
		s.Open(in, "id")
	})
}
