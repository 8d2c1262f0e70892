//go:build linux

package envd

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/guest"
)

// fsEnv is envd over a real in-process agent whose /etc/passwd (under a
// temporary root) names "user" (uid 4242), with a world-writable "open"
// dir and a root-only "closed" one.
func fsEnv(t *testing.T) (*httptest.Server, string) {
	t.Helper()
	root := t.TempDir()
	os.Chmod(filepath.Dir(root), 0o755) // t.TempDir's parent is 0700
	os.Chmod(root, 0o755)
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\nuser:x:4242:4242::/home/user:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nuser:x:4242:\n"), 0o644)
	os.Mkdir(filepath.Join(root, "open"), 0o777)
	os.Chmod(filepath.Join(root, "open"), 0o777)
	os.Mkdir(filepath.Join(root, "closed"), 0o700)
	h := New(Config{Agents: oneAgent{newAgentWith(t, guest.Config{Root: root})},
		Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	t.Cleanup(func() { stopServer(hs) })
	return hs, root
}

// unary makes a Connect unary call as user ("" for none) and returns the
// status and decoded answer.
func unary(t *testing.T, hs *httptest.Server, method, user string, req any) (int, map[string]any) {
	t.Helper()
	b, _ := json.Marshal(req)
	r, _ := http.NewRequest("POST", hs.URL+"/filesystem.Filesystem/"+method, bytes.NewReader(b))
	r.Header.Set("Content-Type", contentUnary)
	if user != "" {
		r.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

func uidOf(t *testing.T, p string) uint32 {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Uid
}

// TestEnvdFilesystemOps: MakeDir (already_exists the second time), Move,
// Remove and Stat's not_found, as root and as another user whose uid the
// guest acts with; before this change each answered 501.
func TestEnvdFilesystemOps(t *testing.T) {
	hs, root := fsEnv(t)
	d := filepath.Join(root, "open/a/b")
	if st, out := unary(t, hs, "MakeDir", "", map[string]any{"path": d}); st != 200 || out["entry"].(map[string]any)["type"] != "FILE_TYPE_DIRECTORY" {
		t.Fatalf("MakeDir: %d %v", st, out)
	}
	if st, out := unary(t, hs, "MakeDir", "", map[string]any{"path": d}); st != 409 || out["code"] != "already_exists" {
		t.Fatalf("MakeDir of an existing dir: %d %v", st, out)
	}
	u := filepath.Join(root, "open/mine")
	if st, out := unary(t, hs, "MakeDir", "user", map[string]any{"path": u}); st != 200 {
		t.Fatalf("MakeDir as user: %d %v", st, out)
	}
	if uid := uidOf(t, u); uid != 4242 {
		t.Fatalf("dir made as user belongs to uid %d", uid)
	}
	if st, out := unary(t, hs, "MakeDir", "user", map[string]any{"path": filepath.Join(root, "closed/x")}); st != 403 {
		t.Fatalf("MakeDir as user in root's 0700 dir: %d %v", st, out)
	}
	if st, out := unary(t, hs, "MakeDir", "nosuchuser", map[string]any{"path": filepath.Join(root, "open/x")}); st != 400 {
		t.Fatalf("MakeDir as an unknown user: %d %v", st, out)
	}
	if st, out := unary(t, hs, "MakeDir", "a;b", map[string]any{"path": filepath.Join(root, "open/x")}); st != 400 {
		t.Fatalf("MakeDir as a bad user name: %d %v", st, out)
	}
	dst := filepath.Join(root, "open/c/renamed")
	st, out := unary(t, hs, "Move", "", map[string]any{"source": d, "destination": dst})
	if st != 200 || out["entry"].(map[string]any)["path"] != dst {
		t.Fatalf("Move: %d %v", st, out)
	}
	if _, err := os.Stat(dst); err != nil {
		t.Fatalf("after Move: %v", err)
	}
	if st, out := unary(t, hs, "Remove", "user", map[string]any{"path": filepath.Join(root, "closed")}); st != 403 {
		t.Fatalf("Remove of root's dir as user: %d %v", st, out)
	}
	if st, out := unary(t, hs, "Remove", "", map[string]any{"path": filepath.Join(root, "open/c")}); st != 200 {
		t.Fatalf("Remove: %d %v", st, out)
	}
	if st, out := unary(t, hs, "Stat", "", map[string]any{"path": dst}); st != 404 || out["code"] != "not_found" {
		t.Fatalf("Stat of a removed path: %d %v (the SDK's exists needs not_found)", st, out)
	}
	if st, out := unary(t, hs, "Remove", "", map[string]any{"path": dst}); st != 404 {
		t.Fatalf("Remove of a missing path: %d %v", st, out)
	}
}

// TestEnvdWatch: WatchDir streams start, then create/write/remove events
// named relative to the directory; the watcher calls queue the same.
func TestEnvdWatch(t *testing.T) {
	hs, root := fsEnv(t)
	dir := filepath.Join(root, "open")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	body, _ := json.Marshal(map[string]any{"path": dir, "recursive": true})
	r, _ := http.NewRequestWithContext(ctx, "POST", hs.URL+"/filesystem.Filesystem/WatchDir", bytes.NewReader(envelope(0, string(body))))
	r.Header.Set("Content-Type", contentStream)
	r.Header.Set("Keepalive-Ping-Interval", "1")
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	next := func() string {
		for {
			flags, msg, err := readEnvelope(resp.Body, 1<<20)
			if err != nil || flags&flagEndStream != 0 {
				t.Fatalf("stream ended: %v %s", err, msg)
			}
			if !strings.Contains(string(msg), "keepalive") {
				return string(msg)
			}
		}
	}
	if m := next(); m != `{"start":{}}` {
		t.Fatalf("first message %s", m)
	}
	os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644)
	os.Remove(filepath.Join(dir, "f"))
	var got []string
	for len(got) < 3 {
		got = append(got, next())
	}
	want := []string{`{"filesystem":{"name":"f","type":"EVENT_TYPE_CREATE"}}`, `{"filesystem":{"name":"f","type":"EVENT_TYPE_WRITE"}}`, `{"filesystem":{"name":"f","type":"EVENT_TYPE_REMOVE"}}`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	st, out := unary(t, hs, "CreateWatcher", "user", map[string]any{"path": dir})
	id, _ := out["watcherId"].(string)
	if st != 200 || id == "" {
		t.Fatalf("CreateWatcher: %d %v", st, out)
	}
	if st, out := unary(t, hs, "CreateWatcher", "user", map[string]any{"path": filepath.Join(root, "closed")}); st == 200 {
		t.Fatalf("user watches root's 0700 dir: %v", out)
	}
	os.Mkdir(filepath.Join(dir, "g"), 0o755)
	var evs []any
	for i := 0; i < 50 && len(evs) == 0; i++ {
		_, out = unary(t, hs, "GetWatcherEvents", "", map[string]any{"watcherId": id})
		evs, _ = out["events"].([]any)
		time.Sleep(20 * time.Millisecond)
	}
	if len(evs) != 1 || evs[0].(map[string]any)["name"] != "g" || evs[0].(map[string]any)["type"] != "EVENT_TYPE_CREATE" {
		t.Fatalf("GetWatcherEvents: %v", out)
	}
	if st, _ := unary(t, hs, "RemoveWatcher", "", map[string]any{"watcherId": id}); st != 200 {
		t.Fatalf("RemoveWatcher: %d", st)
	}
	if st, _ := unary(t, hs, "GetWatcherEvents", "", map[string]any{"watcherId": id}); st != 404 {
		t.Fatalf("GetWatcherEvents after RemoveWatcher: %d", st)
	}
}

// TestEnvdFilesAsUser: GET and POST /files as another user than root
// (refused before this change) write files the user owns and read only
// what the user may.
func TestEnvdFilesAsUser(t *testing.T) {
	hs, root := fsEnv(t)
	p := filepath.Join(root, "open/up/f.txt")
	resp, err := http.Post(hs.URL+"/files?username=user&path="+url.QueryEscape(p), "application/octet-stream", strings.NewReader("hi"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("upload as user: %d", resp.StatusCode)
	}
	if uid := uidOf(t, p); uid != 4242 {
		t.Fatalf("uploaded file belongs to uid %d", uid)
	}
	resp, err = http.Post(hs.URL+"/files?username=user&path="+url.QueryEscape(filepath.Join(root, "closed/f")), "application/octet-stream", strings.NewReader("hi"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Fatalf("upload as user into root's 0700 dir: %d", resp.StatusCode)
	}
	os.WriteFile(filepath.Join(root, "closed/secret"), []byte("s"), 0o600)
	resp, err = http.Get(hs.URL + "/files?username=user&path=" + url.QueryEscape(filepath.Join(root, "closed/secret")))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == 200 {
		t.Fatal("user read root's file")
	}
	resp, err = http.Get(hs.URL + "/files?username=user&path=" + url.QueryEscape(p))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "hi" {
		t.Fatalf("download as user: %d %q", resp.StatusCode, b)
	}
}

// TestCheckSignature: the vectors come from the SDK's own getSignature
// (e2b 2.51.0), so kiln accepts exactly the URLs uploadUrl and
// downloadUrl make; anything else, or an expired URL, is refused.
func TestCheckSignature(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	req := func(method, rawQuery string, hdr ...string) *http.Request {
		r, _ := http.NewRequest(method, "https://127.0.0.1/files?"+rawQuery, nil)
		if len(hdr) == 2 {
			r.Header.Set(hdr[0], hdr[1])
		}
		return r
	}
	sig1 := url.QueryEscape("v1_L/btDTj/wg9nlkabhLMpaXMIxssxbW1v/tJL9y6ZX4U")
	sig2 := url.QueryEscape("v1_bP4oZnK8heqip7qm7Ma+TdeYpPRx/mTDi2mZEpDlGk0")
	if err := CheckSignature(req("POST", "username=user&path="+url.QueryEscape("/tmp/a b.txt")+"&signature="+sig1), "ket1.abc", now); err != nil {
		t.Fatalf("SDK's write signature refused: %v", err)
	}
	if err := CheckSignature(req("GET", "signature="+sig2), "ket1.abc", now); err != nil {
		t.Fatalf("SDK's read signature refused: %v", err)
	}
	// An expiring one, signed here the SDK's way.
	exp := strconv.FormatInt(now.Unix()+60, 10)
	expiring := func(e string) string {
		return "path=/x&signature_expiration=" + e + "&signature=" + url.QueryEscape(signFor("/x", "read", "", "tok", e))
	}
	if err := CheckSignature(req("GET", expiring(exp)), "tok", now); err != nil {
		t.Fatalf("live expiring signature refused: %v", err)
	}
	bad := map[string]*http.Request{
		"read signature used to write": req("POST", "signature="+sig2),
		"other path":                   req("POST", "username=user&path=/etc/passwd&signature="+sig1),
		"other user":                   req("POST", "username=root&path="+url.QueryEscape("/tmp/a b.txt")+"&signature="+sig1),
		"user by header":               req("GET", "signature="+sig2, "Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte("root:"))),
		"expired":                      req("GET", expiring(strconv.FormatInt(now.Unix()-1, 10))),
		"expiration changed":           req("GET", strings.Replace(expiring(exp), "expiration="+exp, "expiration=9"+exp, 1)),
		"two signatures":               req("GET", "signature="+sig2+"&signature="+sig2),
	}
	for name, r := range bad {
		if err := CheckSignature(r, "ket1.abc", now); err == nil && name != "expiration changed" || name == "expiration changed" && CheckSignature(r, "tok", now) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := CheckSignature(req("GET", "signature="+sig2), "ket1.other", now); err == nil {
		t.Error("another sandbox's token accepted")
	}
}

// FuzzCheckSignature: whatever the query, a URL is accepted only with the
// signature of its own path, operation, user and expiry under the token.
func FuzzCheckSignature(f *testing.F) {
	f.Add("GET", "path=/a&signature="+url.QueryEscape(signFor("/a", "read", "", "tok", "")))
	f.Add("POST", "username=user&path=/b&signature_expiration=1900000000&signature="+url.QueryEscape(signFor("/b", "write", "user", "tok", "1900000000")))
	f.Add("GET", "signature=v1_&signature_expiration=x")
	f.Add("", "path=/a&signature="+url.QueryEscape(signFor("/a", "read", "", "tok", "")))
	f.Fuzz(func(t *testing.T, method, rawQuery string) {
		r, err := http.NewRequest(method, "https://127.0.0.1/files", nil)
		if err != nil {
			return
		}
		r.URL.RawQuery = rawQuery
		if CheckSignature(r, "tok", time.Unix(1_800_000_000, 0)) != nil {
			return
		}
		q := r.URL.Query()
		// NewRequest turns an empty method into GET, so the request's own
		// method decides the operation, not the fuzzed string.
		op := map[string]string{"GET": "read", "POST": "write"}[r.Method]
		if q.Get("signature") != signFor(q.Get("path"), op, q.Get("username"), "tok", q.Get("signature_expiration")) {
			t.Fatalf("accepted %s %q", method, rawQuery)
		}
	})
}

// TestEnvdListAndStatAsUser: ListDir and Stat (files.list, getInfo,
// exists) run as the calling user, so root's 0700 directory is refused
// with the permission error the SDK raises; root still sees into it.
// Before, both ran as root for everyone.
func TestEnvdListAndStatAsUser(t *testing.T) {
	hs, root := fsEnv(t)
	closed := filepath.Join(root, "closed")
	os.WriteFile(filepath.Join(closed, "secret"), []byte("s"), 0o600)
	if code, out := unary(t, hs, "ListDir", "user", map[string]any{"path": closed}); code != 403 || out["code"] != "permission_denied" {
		t.Fatalf("ListDir of root's 0700 dir as user: %d %v, want 403 permission_denied", code, out)
	}
	if code, out := unary(t, hs, "Stat", "user", map[string]any{"path": filepath.Join(closed, "secret")}); code != 403 || out["code"] != "permission_denied" {
		t.Fatalf("Stat inside root's 0700 dir as user: %d %v, want 403 permission_denied", code, out)
	}
	if code, out := unary(t, hs, "ListDir", "root", map[string]any{"path": closed}); code != 200 || len(out["entries"].([]any)) != 1 {
		t.Fatalf("ListDir of the dir as root: %d %v, want its one entry", code, out)
	}
	if code, out := unary(t, hs, "ListDir", "user", map[string]any{"path": filepath.Join(root, "open")}); code != 200 {
		t.Fatalf("ListDir of an open dir as user: %d %v", code, out)
	}
	if code, out := unary(t, hs, "Stat", "user", map[string]any{"path": closed}); code != 200 || out["entry"] == nil {
		t.Fatalf("Stat of the closed dir itself as user (its parent is open): %d %v", code, out)
	}
}

// stopServer ends the streams a failed check left open before closing:
// Close alone waits for them, for ever when a process still runs.
func stopServer(hs *httptest.Server) {
	hs.CloseClientConnections()
	hs.Close()
}
