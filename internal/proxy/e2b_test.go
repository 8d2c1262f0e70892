package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
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

// TestE2BEnvdForwarded: with no envd handler (a cluster's edge), a
// request for envd's port is checked as ever and then forwarded to that
// port of the target, without its token; a refused one goes nowhere.
func TestE2BEnvdForwarded(t *testing.T) {
	e := newEnvFull(t, map[string]string{"49983": guest(t, "envd-at-node", false)}, func(c *Config) {
		c.Envd = &Envd{Port: 49983, Authorize: func(tok, id, account string) bool { return tok == "envd-"+id+"-"+account }}
	})
	for _, tc := range []struct {
		tok    string
		status int
	}{{"envd-vm1-acct", 200}, {"envd-vm2-acct", 401}, {"", 401}} {
		req, _ := http.NewRequest("GET", "https://49983-vm1."+domain+"/health", nil)
		if tc.tok != "" {
			req.Header.Set(HeaderEnvdToken, tc.tok)
		}
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Fatalf("token %q: status %d (%s), want %d", tc.tok, resp.StatusCode, body, tc.status)
		}
		if tc.status != 200 {
			continue
		}
		var got map[string]any
		json.Unmarshal(body, &got)
		if got["guest"] != "envd-at-node" || got["envdToken"] != "" {
			t.Fatalf("forwarded envd request reached %v with token %q", got["guest"], got["envdToken"])
		}
	}
}

// TestE2BTraffic: E2B-addressed requests for guest ports without an
// endpoint token pass for a public sandbox, and for one that needs its
// traffic token only with it; anything else (no E2B sandbox, the shell's
// port, a VM without ingress) still needs a kiln token, and a refused
// request wakes nothing. The guest never sees a token.
func TestE2BTraffic(t *testing.T) {
	e := newEnvWith(t, func(c *Config) {
		c.Envd = &Envd{Port: 49983, Handler: http.NotFoundHandler(), Authorize: func(string, string, string) bool { return false },
			Traffic: func(_ context.Context, id, account, tok string) Traffic {
				switch {
				case account != "acct":
					return TrafficNotE2B
				case id == "vm1" || id == "noingress" || id == "sleepy":
					return TrafficPublic
				case id == "vm2" && tok == "traffic-vm2":
					return TrafficToken
				case id == "vm2":
					return TrafficDenied
				}
				return TrafficNotE2B
			}}
	})
	_, port, _ := strings.Cut(e.addr, ":")
	all := []token.PortRange{token.AllPorts}
	tests := []struct {
		name, url string
		headers   map[string]string
		status    int
		woken     bool
	}{
		{"public by host", "https://8080-vm1." + domain + "/", nil, 200, true},
		{"public by headers", "https://127.0.0.1:" + port + "/", map[string]string{HeaderE2BSandboxID: "vm1", HeaderE2BSandboxPort: "9000"}, 200, true},
		{"public, suspended: woken", "https://8080-sleepy." + domain + "/", nil, 200, true},
		{"traffic token", "https://9000-vm2." + domain + "/", map[string]string{HeaderE2BTrafficToken: "traffic-vm2"}, 200, true},
		{"no traffic token", "https://9000-vm2." + domain + "/", nil, 401, false},
		{"wrong traffic token", "https://9000-vm2." + domain + "/", map[string]string{HeaderE2BTrafficToken: "traffic-vm1"}, 401, false},
		{"endpoint token instead", "https://9000-vm2." + domain + "/",
			map[string]string{HeaderAuth: e.mint(t, "acct", "vm2", token.KindEndpoint, all, time.Minute), HeaderE2BTrafficToken: "x"}, 200, true},
		{"no E2B sandbox", "https://8080-otheracct." + domain + "/", nil, 401, false},
		{"shell port of a public sandbox", "https://8022-vm1." + domain + "/", nil, 401, false},
		{"public without ingress", "https://8080-noingress." + domain + "/", nil, 403, false},
		{"public but not E2B-addressed", "https://vm1." + domain + "/", nil, 401, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := "vm1"
			for _, c := range []string{"vm2", "sleepy", "otheracct", "noingress"} {
				if strings.Contains(tc.url, c) || tc.headers[HeaderE2BSandboxID] == c {
					id = c
				}
			}
			before, _ := e.backend.counts(id)
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
			if after, _ := e.backend.counts(id); (after > before) != tc.woken {
				t.Errorf("%s woken %v, want %v", id, after > before, tc.woken)
			}
			if tc.status == 200 {
				var got map[string]any
				json.Unmarshal(body, &got)
				if got["traffic"] != "" || got["auth"] != "" {
					t.Errorf("the guest saw tokens: %v", got)
				}
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

// TestE2BPausedBehindRouteDial: when a route's Dial (a cluster edge's
// tunnel) finds the sandbox paused without auto-resume after the wake
// trusted a cached RUNNING, an E2B-addressed request (a guest port or
// envd) gets E2B's 502 "paused", as from the wake itself; a request with
// a kiln endpoint token keeps kiln's 503.
func TestE2BPausedBehindRouteDial(t *testing.T) {
	e := newEnvWith(t, func(c *Config) {
		c.Envd = &Envd{Port: 49983, Authorize: func(tok, id, account string) bool { return tok == "envd-"+id },
			Traffic: func(context.Context, string, string, string) Traffic { return TrafficPublic }}
	})
	e.backend.vms["paused"] = &fakeVM{tgt: Target{Account: "acct", Addr: netip.MustParseAddr("127.0.0.1"), Ingress: true, Route: "node-a/paused",
		Dial: func(context.Context, uint16) (net.Conn, error) {
			return nil, fmt.Errorf("the microVM is not running on the node; waking it: %w", ErrSuspended)
		}}}
	_, port, _ := strings.Cut(e.addr, ":")
	tests := []struct {
		name    string
		url     string
		headers map[string]string
		status  int
		body    string
	}{
		{"guest port, E2B headers", "https://127.0.0.1:" + port + "/", map[string]string{HeaderE2BSandboxID: "paused", HeaderE2BSandboxPort: "8080"}, 502, "is paused"},
		{"guest port, E2B host", "https://8080-paused." + domain + "/", nil, 502, "is paused"},
		{"envd", "https://49983-paused." + domain + "/files", map[string]string{HeaderEnvdToken: "envd-paused"}, 502, "is paused"},
		{"endpoint token", "https://paused." + domain + "/", map[string]string{HeaderAuth: e.mint(t, "acct", "paused", token.KindEndpoint,
			[]token.PortRange{token.AllPorts}, time.Minute)}, 503, "autoResumeEnabled is false"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
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
			if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.body) {
				t.Errorf("got %d %s, want %d with %q", resp.StatusCode, body, tc.status, tc.body)
			}
		})
	}
}
