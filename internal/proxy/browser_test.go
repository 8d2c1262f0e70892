package proxy

import (
	"context"
	"fmt"
	"html"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// chromiumPath finds Debian's chromium (scripts/setup.sh installs it).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, p := range []string{os.Getenv("KILN_CHROMIUM"), "/usr/bin/chromium"} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is missing (scripts/setup.sh installs it)")
	}
	t.Skip("chromium is not installed")
	return ""
}

// browserWebSocket opens wsURL with protocols in headless Chromium and
// returns what the page saw: "open proto=P msg=M", "error" or "close:N".
// The page reports to a loopback server, and a script it loads is held
// until that report came, so that --dump-dom (which waits for the load
// event) ends Chromium only after the WebSocket outcome is known.
func browserWebSocket(t *testing.T, wsURL string, protocols []string) string {
	t.Helper()
	bin := chromiumPath(t)
	report := make(chan string, 1)
	quoted := make([]string, len(protocols))
	for i, p := range protocols {
		quoted[i] = fmt.Sprintf("%q", p)
	}
	page := `<!doctype html><body><pre id=r>pending</pre><script>
let done = false;
function report(s) {
  if (done) return; done = true;
  document.getElementById("r").textContent = s;
  fetch("/report?r=" + encodeURIComponent(s));
}
const ws = new WebSocket(` + fmt.Sprintf("%q", wsURL) + `, [` + strings.Join(quoted, ",") + `]);
ws.onopen = () => ws.send("hi");
let seen = "";
ws.onmessage = (e) => {
  const m = String(e.data);
  if (m.startsWith("protocols=")) seen = m;
  if (m.startsWith("echo:")) report("open proto=" + ws.protocol + " app-saw=" + seen + " msg=" + m);
};
ws.onerror = () => report("error");
ws.onclose = (e) => report("close:" + e.code);
setTimeout(() => report("timeout"), 15000);
</script><script src="/hold"></script></body>`
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprint(w, page)
	})
	got := make(chan struct{})
	var result string
	mux.HandleFunc("/report", func(w http.ResponseWriter, r *http.Request) {
		select {
		case report <- r.URL.Query().Get("r"):
		default:
		}
	})
	mux.HandleFunc("/hold", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-got:
		case <-time.After(20 * time.Second):
		}
		w.Header().Set("Content-Type", "text/javascript")
		fmt.Fprint(w, "// done")
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	defer srv.Close()
	go func() {
		result = <-report
		close(got)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
		"--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
		// The endpoint's certificate comes from the test's own CA.
		"--ignore-certificate-errors",
		"--enable-logging=stderr", "--user-data-dir="+t.TempDir(), "--dump-dom", "http://"+ln.Addr().String()+"/")
	out, err := cmd.CombinedOutput()
	select {
	case <-got:
	case <-time.After(time.Second):
		t.Fatalf("the page reported nothing (chromium: %v)\n%s", err, out)
	}
	if !strings.Contains(string(out), html.EscapeString(result)) {
		t.Logf("dumped DOM does not show %q:\n%s", result, out)
	}
	return result
}

// TestBrowserWebSocketSubprotocols is AWS's browser example ("Browser /
// WebSocket": the marker, the token and the port as subprotocols) in a
// real browser, against an app that selects no subprotocol. The browser
// must connect, the app must see none of the platform's subprotocols.
// Before the proxy consumed the bare "lambda-microvms" marker it went to
// the app, nothing came back, and Chromium failed the handshake.
func TestBrowserWebSocketSubprotocols(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.Port(9000)}, time.Minute)
	_, port, _ := net.SplitHostPort(e.addr)
	// *.localhost resolves to loopback in Chromium without any DNS.
	url := "wss://vm1." + domain + ":" + port + "/ws"
	got := browserWebSocket(t, url, []string{"lambda-microvms", "lambda-microvms.authentication." + tok, "lambda-microvms.port.9000"})
	want := "open proto=lambda-microvms app-saw=protocols= msg=echo:hi"
	if got != want {
		t.Fatalf("browser WebSocket: got %q, want %q", got, want)
	}
	waitClosed(t, e, "vm1")
}
