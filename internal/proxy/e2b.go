package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/metrics"
)

// E2B's addressing of a sandbox's ports (internal/e2b): the host
// "PORT-ID.DOMAIN", or, when the SDK is given one sandbox URL
// (E2B_SANDBOX_URL) for every sandbox, these headers; and envd's token.
const (
	HeaderE2BSandboxID   = "E2b-Sandbox-Id"
	HeaderE2BSandboxPort = "E2b-Sandbox-Port"
	HeaderEnvdToken      = "X-Access-Token"
	// HeaderE2BTrafficToken carries a sandbox's traffic access token, which
	// its guest ports need when it was made with allowPublicTraffic false.
	HeaderE2BTrafficToken = "E2b-Traffic-Access-Token"
)

// Traffic is what an E2B-addressed request for a guest port (not envd's)
// without an endpoint token may do, as Envd.Traffic decides it.
type Traffic int

const (
	// TrafficNotE2B: the microVM is no E2B sandbox with a traffic policy;
	// the endpoint token rules apply (a token is required).
	TrafficNotE2B Traffic = iota
	// TrafficPublic: E2B's public traffic; no token is needed.
	TrafficPublic
	// TrafficToken: the sandbox's traffic access token was given.
	TrafficToken
	// TrafficDenied: the sandbox needs its traffic access token, and the
	// request's is missing or wrong.
	TrafficDenied
)

// Envd routes E2B's in-sandbox API to a handler on the host instead of a
// guest port: every request for Port, however it is addressed, goes to
// Handler once Authorize accepted its X-Access-Token for the microVM and
// its account, so no endpoint token reaches a guest on that port.
type Envd struct {
	Port      uint16
	Authorize func(tok, microvmID, account string) bool
	// Signed, if set, admits a request without X-Access-Token that carries
	// a ?signature= (E2B's signed /files URLs): nil error lets it through.
	Signed func(r *http.Request, microvmID, account string) error
	// Handler serves envd. Nil forwards the checked request to Port of
	// the backend's target as if it were a guest port: a cluster's edge,
	// whose nodes serve envd at the far end of the tunnel.
	Handler http.Handler
	// Traffic, if set, decides E2B-addressed requests for other ports that
	// carry no endpoint token, from the sandbox's allowPublicTraffic and
	// the traffic token given (tok, "" if none). Never asked for the
	// shell's port, which needs a shell token whatever E2B says.
	Traffic func(ctx context.Context, microvmID, account, tok string) Traffic
}

// e2bTraffic decides an E2B-addressed request for a guest port without an
// endpoint token: true when the sandbox lets it through (public, or its
// traffic token matched; the token is then removed so the guest never
// sees it); false when the endpoint token rules apply. A refusal is
// answered here, with done true.
func (s *Server) e2bTraffic(w http.ResponseWriter, r *http.Request, id string, port uint16) (through, done bool) {
	if s.cfg.Envd == nil || s.cfg.Envd.Traffic == nil || port == ShellPort {
		return false, false
	}
	tok := r.Header.Get(HeaderE2BTrafficToken)
	if len(tok) > 512 {
		writeError(w, http.StatusBadRequest, "token too long")
		return false, true
	}
	tgt, err := s.cfg.Backend.Lookup(r.Context(), id)
	if err != nil {
		s.backendError(w, id, err)
		return false, true
	}
	if tgt.Account == "" {
		return false, false
	}
	switch s.cfg.Envd.Traffic(r.Context(), id, tgt.Account, tok) {
	case TrafficPublic, TrafficToken:
		r.Header.Del(HeaderE2BTrafficToken)
		return true, false
	case TrafficDenied:
		writeError(w, http.StatusUnauthorized, "missing or invalid "+HeaderE2BTrafficToken+" (the sandbox's trafficAccessToken)")
		return false, true
	}
	return false, false
}

// Account returns the account owning the microVM a request is routed to
// (set for envd requests).
func Account(ctx context.Context) string { s, _ := ctx.Value(keyAccount).(string); return s }

// e2bRoute reads E2B's addressing: a host "PORT-ID.DOMAIN" or the
// E2b-Sandbox-Id and E2b-Sandbox-Port headers. ok is false when the
// request uses neither; both at once must agree.
func (s *Server) e2bRoute(r *http.Request) (id string, port uint16, ok bool, err error) {
	host := strings.ToLower(strings.TrimSuffix(hostOnly(r.Host), "."))
	if label, found := strings.CutSuffix(host, "."+s.cfg.Domain); found && !strings.Contains(label, ".") {
		if p, rest, cut := strings.Cut(label, "-"); cut && rest != "" && allDigits(p) {
			n, perr := strconv.ParseUint(p, 10, 16)
			if perr != nil || n == 0 {
				return "", 0, false, fmt.Errorf("bad port %q in host %q", p, r.Host)
			}
			id, port, ok = rest, uint16(n), true
		}
	}
	hid, hport := r.Header.Get(HeaderE2BSandboxID), r.Header.Get(HeaderE2BSandboxPort)
	if hid == "" {
		return id, port, ok, nil
	}
	if len(hid) > 128 || strings.ContainsAny(hid, "./ ") {
		return "", 0, false, fmt.Errorf("bad %s %q", HeaderE2BSandboxID, hid)
	}
	n, perr := strconv.ParseUint(hport, 10, 16)
	if perr != nil || n == 0 {
		return "", 0, false, fmt.Errorf("bad or missing %s %q", HeaderE2BSandboxPort, hport)
	}
	if ok && (hid != id || uint16(n) != port) {
		return "", 0, false, fmt.Errorf("host %q and %s/%s name different sandboxes or ports", r.Host, HeaderE2BSandboxID, HeaderE2BSandboxPort)
	}
	return strings.ToLower(hid), uint16(n), true, nil
}

func allDigits(s string) bool {
	if s == "" || len(s) > 5 {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// serveEnvd checks the envd token, wakes the VM as any request does, and
// hands the request to the envd handler.
func (s *Server) serveEnvd(w http.ResponseWriter, r *http.Request, id string) {
	tok := r.Header.Get(HeaderEnvdToken)
	signed := tok == "" && s.cfg.Envd.Signed != nil && r.URL.Query().Has("signature")
	if tok == "" && !signed {
		writeError(w, http.StatusUnauthorized, "missing "+HeaderEnvdToken+" (the sandbox's envdAccessToken)")
		return
	}
	if len(tok) > 512 {
		writeError(w, http.StatusBadRequest, "token too long")
		return
	}
	ctx := r.Context()
	tgt, err := s.cfg.Backend.Lookup(ctx, id)
	if err != nil {
		s.backendError(w, id, err)
		return
	}
	switch {
	case tgt.Account == "":
		writeError(w, http.StatusUnauthorized, "invalid envd access token for this sandbox")
		return
	case signed:
		if err := s.cfg.Envd.Signed(r, id, tgt.Account); err != nil {
			writeError(w, http.StatusUnauthorized, err.Error())
			return
		}
	case !s.cfg.Envd.Authorize(tok, id, tgt.Account):
		writeError(w, http.StatusUnauthorized, "invalid envd access token for this sandbox")
		return
	}
	s.cfg.Backend.ConnOpened(id)
	defer s.cfg.Backend.ConnClosed(id)
	if !s.wake(ctx, w, id, true) {
		return
	}
	ctx = context.WithValue(WithTarget(ctx, id, tgt.Account), keyE2B, true)
	r.Header.Del(HeaderEnvdToken)
	if s.cfg.Envd.Handler == nil {
		s.forward(ctx, w, r, id, tgt, s.cfg.Envd.Port, nil)
		return
	}
	s.cfg.Envd.Handler.ServeHTTP(w, r.WithContext(ctx))
}

// e2bPaused answers traffic to a paused E2B sandbox made without
// autoResume as E2B's proxy answers a sandbox that does not run: 502,
// which the SDK reads as "not running" (its envd calls raise TimeoutError,
// its health check says false). The sandbox stays paused.
func e2bPaused(w http.ResponseWriter, id string) {
	metrics.ProxyErrors.WithLabelValues(metrics.Class(http.StatusBadGateway)).Inc()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusBadGateway)
	json.NewEncoder(w).Encode(map[string]any{"code": http.StatusBadGateway, "sandboxId": id,
		"message": "sandbox " + id + " is paused: resume it with Sandbox.connect, or create it with lifecycle.autoResume to resume on traffic"})
}
