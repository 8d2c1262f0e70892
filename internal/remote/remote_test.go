package remote

import (
	"strings"
	"testing"
)

func TestParseExecRequest(t *testing.T) {
	tests := []struct {
		name, body, err string
	}{
		{"plain", `{"argv":["ls","-l"],"stdin":true}`, ""},
		{"tty", `{"argv":["sh"],"tty":true,"cols":80,"rows":24}`, ""},
		{"env and cwd", `{"argv":["env"],"env":["A=1","B="],"cwd":"/tmp"}`, ""},
		{"no argv", `{"argv":[]}`, "argv is empty"},
		{"empty command", `{"argv":[""]}`, "argv is empty"},
		{"nul", `{"argv":["a\u0000b"]}`, "NUL"},
		{"env without =", `{"argv":["a"],"env":["A"]}`, "KEY=VALUE"},
		{"env empty key", `{"argv":["a"],"env":["=x"]}`, "KEY=VALUE"},
		{"relative cwd", `{"argv":["a"],"cwd":"tmp"}`, "not absolute"},
		{"tty without size", `{"argv":["a"],"tty":true}`, "cols and rows"},
		{"huge tty", `{"argv":["a"],"tty":true,"cols":5000,"rows":5}`, "cols and rows"},
		{"too long", `{"argv":["` + strings.Repeat("a", maxArgBytes) + `"]}`, "bytes"},
		{"not json", `[`, "exec request"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseExecRequest([]byte(tc.body))
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
		})
	}
}

func TestCopyInfoPlacement(t *testing.T) {
	tests := []struct {
		info           CopyInfo
		dst, dir, name string
	}{
		{CopyInfo{Exists: true, Dir: true}, "/srv", "/srv", "local"},
		{CopyInfo{Exists: true}, "/srv/f.txt", "/srv", "f.txt"},
		{CopyInfo{}, "/srv/new", "/srv", "new"},
	}
	for _, tc := range tests {
		if d, n := tc.info.ExtractDir(tc.dst), tc.info.TopName(tc.dst, "local"); d != tc.dir || n != tc.name {
			t.Errorf("%+v %s: into %s as %s, want %s as %s", tc.info, tc.dst, d, n, tc.dir, tc.name)
		}
	}
}

func FuzzParseExecRequest(f *testing.F) {
	f.Add([]byte(`{"argv":["ls","-l"],"env":["A=1"],"cwd":"/","stdin":true,"tty":true,"cols":80,"rows":24}`))
	f.Add([]byte(`{"argv":["a\u0000"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseExecRequest(b)
		if err != nil {
			return
		}
		if len(r.Argv) == 0 || r.Argv[0] == "" || r.Cwd != "" && !strings.HasPrefix(r.Cwd, "/") || r.TTY && (r.Cols == 0 || r.Rows == 0) {
			t.Fatalf("accepted %+v", r)
		}
		for _, s := range append(append([]string{}, r.Argv...), r.Env...) {
			if strings.ContainsRune(s, 0) {
				t.Fatalf("accepted a NUL in %q", s)
			}
		}
		for _, kv := range r.Env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				t.Fatalf("accepted env %q", kv)
			}
		}
	})
}

func FuzzParseControl(f *testing.F) {
	f.Add([]byte(`{"cols":80,"rows":24}`))
	f.Add([]byte(`{"eof":true}`))
	f.Add([]byte(`{"cols":0,"rows":24}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseControl(b)
		if err == nil && ((c.Cols == 0) != (c.Rows == 0) || c.Cols > maxSide || c.Rows > maxSide) {
			t.Fatalf("accepted %+v", c)
		}
	})
}

func FuzzParseCopyRequest(f *testing.F) {
	f.Add([]byte(`{"path":"/srv/a/../b"}`))
	f.Add([]byte(`{"path":"rel"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseCopyRequest(b)
		if err == nil && (!strings.HasPrefix(r.Path, "/") || strings.Contains(r.Path, "/../") || strings.ContainsRune(r.Path, 0)) {
			t.Fatalf("accepted %q", r.Path)
		}
	})
}

func FuzzDecodeOutput(f *testing.F) {
	f.Add(EncodeOutput(Stdout, []byte("hi")))
	f.Add([]byte{})
	f.Add([]byte{9, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		s, d, err := DecodeOutput(b)
		if err == nil && ((s != Stdout && s != Stderr) || len(d) != len(b)-1) {
			t.Fatalf("decoded stream %d, %d bytes from %d", s, len(d), len(b))
		}
	})
}
