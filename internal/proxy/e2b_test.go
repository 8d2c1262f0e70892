package proxy

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// TestE2BRouting: E2B's two ways of naming a sandbox port (the host
// PORT-ID.DOMAIN, or one URL and the E2b-Sandbox-Id/-Port headers) reach
// the right VM; envd's port goes to the host-side envd handler only with
// the sandbox's envd token, and never to the guest with an endpoint token.
func TestE2BRouting(t *testing.T) {
	envdHandler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"envd": MicrovmID(r.Context()), "account": Account(r.Context()),
			"token": r.Header.Get(HeaderEnvdToken)})
	})
	e := newEnvWith(t, func(c *Config) {
		c.Envd = &Envd{Port: 49983, Handler: envdHandler,
			Authorize: func(tok, id, account string) bool { return tok == "envd-"+id+"-"+account }}
	})
	all := []token.PortRange{token.AllPorts}
	_, port, _ := strings.Cut(e.addr, ":")
	tests := []struct {
		name, url string
		headers   map[string]string
		status    int
		envd      string // the VM envd served
		guest     string // the guest port that answered
		woken     string
	}{
		{"envd by host", "https://49983-vm1." + domain + "/health", map[string]string{HeaderEnvdToken: "envd-vm1-acct"}, 200, "vm1", "", "vm1"},
		{"envd by headers at loopback", "https://127.0.0.1:" + port + "/health",
			map[string]string{HeaderE2BSandboxID: "vm2", HeaderE2BSandboxPort: "49983", HeaderEnvdToken: "envd-vm2-acct"}, 200, "vm2", "", "vm2"},
		{"envd without token", "https://49983-vm1." + domain + "/", nil, 401, "", "", ""},
		{"envd token of another vm", "https://49983-vm2." + domain + "/", map[string]string{HeaderEnvdToken: "envd-vm1-acct"}, 401, "", "", ""},
		{"endpoint token on envd's port", "https://vm1." + domain + "/",
			map[string]string{HeaderAuth: e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), HeaderPort: "49983"}, 401, "", "", ""},
		{"other port by host", "https://9000-vm1." + domain + "/",
			map[string]string{HeaderAuth: e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute)}, 200, "", "port9000", "vm1"},
		{"headers and host disagree", "https://49983-vm1." + domain + "/",
			map[string]string{HeaderE2BSandboxID: "vm2", HeaderE2BSandboxPort: "49983", HeaderEnvdToken: "envd-vm2-acct"}, 400, "", "", ""},
		{"unknown sandbox", "https://127.0.0.1:" + port + "/",
			map[string]string{HeaderE2BSandboxID: "ghost", HeaderE2BSandboxPort: "49983", HeaderEnvdToken: "envd-ghost-acct"}, 404, "", "", ""},
		{"port zero", "https://0-vm1." + domain + "/", nil, 400, "", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := map[string]int{}
			for _, id := range []string{"vm1", "vm2"} {
				before[id], _ = e.backend.counts(id)
			}
			req, _ := http.NewRequest("GET", tc.url, nil)
			for k, v := range tc.headers {
				req.Header.Set(k, v)
			}
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, tc.status)
			}
			for _, id := range []string{"vm1", "vm2"} {
				after, _ := e.backend.counts(id)
				if woken := after > before[id]; woken != (tc.woken == id) {
					t.Errorf("%s woken=%v, want %v", id, woken, tc.woken == id)
				}
			}
			if tc.status != 200 {
				return
			}
			var got map[string]string
			json.Unmarshal(body, &got)
			if got["envd"] != tc.envd || got["guest"] != tc.guest {
				t.Fatalf("answered by %v, want envd %q guest %q", got, tc.envd, tc.guest)
			}
			if tc.envd != "" && (got["account"] != "acct" || got["token"] != "") {
				t.Fatalf("envd saw account %q and token %q", got["account"], got["token"])
			}
		})
	}
}

// FuzzE2BRoute: whatever the host and headers, a route names a sandbox id
// without dots and a port other than 0.
func FuzzE2BRoute(f *testing.F) {
	s := &Server{cfg: Config{Domain: domain}}
	f.Add("49983-mvm-abc."+domain, "", "")
	f.Add("127.0.0.1:8443", "mvm-abc", "49983")
	f.Add("99999-x."+domain, "x", "1")
	f.Add("1-."+domain, "a.b", "-1")
	f.Fuzz(func(t *testing.T, host, id, port string) {
		r := httptest.NewRequest("GET", "/", nil)
		r.Host = host
		if id != "" {
			r.Header.Set(HeaderE2BSandboxID, id)
			r.Header.Set(HeaderE2BSandboxPort, port)
		}
		gotID, gotPort, ok, err := s.e2bRoute(r)
		if err != nil || !ok {
			return
		}
		if gotID == "" || strings.Contains(gotID, ".") || gotPort == 0 {
			t.Fatalf("route %q port %d from host %q id %q port %q", gotID, gotPort, host, id, port)
		}
	})
}
