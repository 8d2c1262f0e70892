package proto

import (
	"encoding/json"
	"path"
	"testing"
)

func TestValidateFileOp(t *testing.T) {
	dir := &DirEntry{Name: "b", Path: "/a/b", Type: FileDir, Mode: 0o755}
	if err := ValidateFileOp(FileOpRequest{Op: OpMkdir, Path: "/a/b"}, FileOpResult{Created: true, Entry: dir}); err != nil {
		t.Fatalf("valid mkdir answer refused: %v", err)
	}
	if err := ValidateFileOp(FileOpRequest{Op: OpMove, Path: "/x", Dest: "/a/b"}, FileOpResult{Entry: dir}); err != nil {
		t.Fatalf("valid move answer refused: %v", err)
	}
	bad := map[string]struct {
		req FileOpRequest
		res FileOpResult
	}{
		"mkdir no entry":    {FileOpRequest{Op: OpMkdir, Path: "/a/b"}, FileOpResult{}},
		"mkdir other path":  {FileOpRequest{Op: OpMkdir, Path: "/a/c"}, FileOpResult{Entry: dir}},
		"mkdir a file":      {FileOpRequest{Op: OpMkdir, Path: "/a/b"}, FileOpResult{Entry: &DirEntry{Name: "b", Path: "/a/b", Type: FileRegular}}},
		"move source entry": {FileOpRequest{Op: OpMove, Path: "/a/b", Dest: "/d"}, FileOpResult{Entry: dir}},
		"remove entry":      {FileOpRequest{Op: OpRemove, Path: "/a/b"}, FileOpResult{Entry: dir}},
		"name differs":      {FileOpRequest{Op: OpMkdir, Path: "/a/b"}, FileOpResult{Entry: &DirEntry{Name: "passwd", Path: "/a/b", Type: FileDir}}},
		"unknown op":        {FileOpRequest{Op: "chown", Path: "/a/b"}, FileOpResult{Entry: dir}},
	}
	for name, c := range bad {
		if err := ValidateFileOp(c.req, c.res); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestValidateWatchEvents(t *testing.T) {
	ok := WatchEvents{Events: []WatchEvent{{Name: "f", Op: WatchCreate}, {Name: "d/g", Op: WatchWrite}}}
	if err := ValidateWatchEvents(true, ok); err != nil {
		t.Fatalf("valid events refused: %v", err)
	}
	bad := map[string]WatchEvents{
		"absolute":  {Events: []WatchEvent{{Name: "/etc/passwd", Op: WatchCreate}}},
		"climbs":    {Events: []WatchEvent{{Name: "../x", Op: WatchCreate}}},
		"dotdot":    {Events: []WatchEvent{{Name: "..", Op: WatchCreate}}},
		"unclean":   {Events: []WatchEvent{{Name: "a//b", Op: WatchCreate}}},
		"empty":     {Events: []WatchEvent{{Name: "", Op: WatchCreate}}},
		"nul":       {Events: []WatchEvent{{Name: "a\x00b", Op: WatchCreate}}},
		"op":        {Events: []WatchEvent{{Name: "a", Op: "open"}}},
		"too many":  {Events: make([]WatchEvent, MaxWatchEvents+1)},
		"flat deep": {Events: []WatchEvent{{Name: "d/g", Op: WatchWrite}}},
	}
	for name, res := range bad {
		if err := ValidateWatchEvents(name != "flat deep", res); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzValidateFileOp feeds arbitrary agent answers to a file operation
// through the decoder and the host's check.
func FuzzValidateFileOp(f *testing.F) {
	f.Add(OpMkdir, "/a/b", "", []byte(`{"created":true,"entry":{"name":"b","path":"/a/b","type":"dir"}}`))
	f.Add(OpMove, "/a", "/c/d", []byte(`{"entry":{"name":"d","path":"/c/d","type":"file"}}`))
	f.Add(OpRemove, "/a", "", []byte(`{}`))
	f.Fuzz(func(t *testing.T, op, p, dest string, body []byte) {
		var res FileOpResult
		if json.Unmarshal(body, &res) != nil {
			return
		}
		req := FileOpRequest{Op: op, Path: p, Dest: dest}
		if ValidateFileOp(req, res) != nil {
			return
		}
		if op == OpRemove {
			if res.Entry != nil {
				t.Fatalf("remove accepted an entry")
			}
			return
		}
		want := p
		if op == OpMove {
			want = dest
		}
		if res.Entry == nil || len(res.Entry.Path) > maxPathLen || res.Entry.Path != path.Clean(want) {
			t.Fatalf("accepted %+v for %+v", res.Entry, req)
		}
	})
}

// FuzzValidateWatchEvents feeds arbitrary agent answers to a watch read
// through the decoder and the host's check.
func FuzzValidateWatchEvents(f *testing.F) {
	f.Add(true, []byte(`{"events":[{"name":"a/b","op":"create"}]}`))
	f.Add(false, []byte(`{"events":[{"name":"../etc","op":"write"}]}`))
	f.Add(false, []byte(`{"events":[]}`))
	f.Fuzz(func(t *testing.T, recursive bool, body []byte) {
		var res WatchEvents
		if json.Unmarshal(body, &res) != nil {
			return
		}
		if ValidateWatchEvents(recursive, res) != nil {
			return
		}
		for _, e := range res.Events {
			if e.Name == "" || e.Name[0] == '/' || e.Name == ".." || len(e.Name) >= 3 && e.Name[:3] == "../" {
				t.Fatalf("accepted %+v", e)
			}
		}
	})
}
