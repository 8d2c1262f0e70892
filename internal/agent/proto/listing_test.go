package proto

import (
	"encoding/json"
	"testing"
	"time"
)

func TestValidateListing(t *testing.T) {
	ok := ListDirResult{Entries: []DirEntry{
		{Name: "a", Path: "/tmp/a", Type: FileRegular, Mode: 0o644},
		{Name: "b", Path: "/tmp/d/b", Type: FileDir, Mode: 0o755},
	}}
	if err := ValidateListing("/tmp", 2, ok); err != nil {
		t.Fatalf("valid listing refused: %v", err)
	}
	if err := ValidateListing("/", 1, ListDirResult{Entries: []DirEntry{{Name: "etc", Path: "/etc", Type: FileDir}}}); err != nil {
		t.Fatalf("listing of / refused: %v", err)
	}
	bad := map[string]ListDirResult{
		"outside":      {Entries: []DirEntry{{Name: "passwd", Path: "/etc/passwd", Type: FileRegular}}},
		"climbs":       {Entries: []DirEntry{{Name: "x", Path: "/tmp/../etc/x", Type: FileRegular}}},
		"prefix twin":  {Entries: []DirEntry{{Name: "x", Path: "/tmpx/x", Type: FileRegular}}},
		"too deep":     {Entries: []DirEntry{{Name: "c", Path: "/tmp/d/e/c", Type: FileRegular}}},
		"bad type":     {Entries: []DirEntry{{Name: "a", Path: "/tmp/a", Type: "socket"}}},
		"name differs": {Entries: []DirEntry{{Name: "b", Path: "/tmp/a", Type: FileRegular}}},
		"bad mode":     {Entries: []DirEntry{{Name: "a", Path: "/tmp/a", Type: FileRegular, Mode: 0o170000}}},
		"neg size":     {Entries: []DirEntry{{Name: "a", Path: "/tmp/a", Type: FileRegular, Size: -1}}},
	}
	for name, res := range bad {
		if err := ValidateListing("/tmp", 2, res); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzValidateListing feeds arbitrary agent answers through the decoder
// and the check the host applies before relaying a listing.
func FuzzValidateListing(f *testing.F) {
	seed, _ := json.Marshal(ListDirResult{Entries: []DirEntry{{Name: "a", Path: "/tmp/a", Type: FileRegular, ModTime: time.Unix(1, 0)}}})
	f.Add("/tmp", 1, seed)
	f.Add("/", 0, []byte(`{"entries":[{"name":"/","path":"/","type":"dir"}]}`))
	f.Add("/tmp", 3, []byte(`{"entries":[{"name":"..","path":"/tmp/..","type":"dir"}]}`))
	f.Fuzz(func(t *testing.T, dir string, depth int, body []byte) {
		var res ListDirResult
		if json.Unmarshal(body, &res) != nil {
			return
		}
		if ValidateListing(dir, depth, res) != nil {
			return
		}
		for _, e := range res.Entries {
			if len(e.Path) > maxPathLen || (depth > 0 && e.Name == "..") {
				t.Fatalf("accepted entry %+v", e)
			}
		}
	})
}
