// Package console serves kiln's web console at /console/ on the API
// address: the front-end (built from ./web by `make build` into ./dist and
// embedded here), sign-in with an access key, and a session API that runs
// the very operations of internal/api (through api.Server.SessionHandler)
// as the signed-in account. It never imports the engine or the VMM.
package console

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

//go:embed all:dist
var assets embed.FS

// Prefix is where the console is mounted.
const Prefix = "/console/"

const (
	cookieName = "kiln_console"
	// csrfHeader must carry the session's CSRF token on every call that
	// changes state; a cross-site page can neither read the token nor set
	// the header without a CORS preflight that kiln never grants.
	csrfHeader = "X-Kiln-Csrf"
	// accountHeader lets the operator act in another account.
	accountHeader = "X-Kiln-Account"
	// maxSessions bounds the session table (sign-ins beyond it evict the
	// oldest).
	maxSessions = 10000
	// maxSignInBody bounds the sign-in request.
	maxSignInBody = 4 << 10
)

// Config configures a Console.
type Config struct {
	// API runs the operations; Store checks keys and feeds the usage page.
	API   *api.Server
	Store store.Store
	// Operators are the accounts that see and act in every account.
	Operators []string
	// TLS says the API address serves HTTPS: cookies are then Secure.
	TLS bool
	// Domain and EndpointPort name microVM endpoints
	// (https://ID.Domain:EndpointPort), which the page's content policy
	// lets the browser shell connect to.
	Domain       string
	EndpointPort string
	// SessionTTL is how long a session lasts from sign-in (default 1 h).
	SessionTTL time.Duration
	// HostMemoryMiB is the memory microVMs may commit on this host, for
	// the usage page (0: unknown).
	HostMemoryMiB int64
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Console is the web console's HTTP handler.
type Console struct {
	cfg    Config
	mu     sync.Mutex
	byID   map[string]*session
	fails  map[string][]time.Time // failed sign-ins per client address
	static http.Handler
	built  bool
}

type session struct {
	id      string
	csrf    string
	key     store.AccessKey
	expires time.Time
	created time.Time
}

// New returns the console over cfg.API.
func New(cfg Config) *Console {
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Domain == "" {
		cfg.Domain = "microvm.localhost"
	}
	sub, _ := fs.Sub(assets, "dist")
	_, err := fs.Stat(sub, "index.html")
	return &Console{cfg: cfg, byID: map[string]*session{}, fails: map[string][]time.Time{},
		static: http.FileServerFS(sub), built: err == nil}
}

// Handler serves everything under Prefix.
func (c *Console) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+Prefix+"api/session", c.signIn)
	mux.HandleFunc("GET "+Prefix+"api/session", c.whoAmI)
	mux.HandleFunc("DELETE "+Prefix+"api/session", c.signOut)
	mux.HandleFunc("GET "+Prefix+"api/usage", c.usage)
	mux.Handle(Prefix+"api/aws/", http.StripPrefix(strings.TrimSuffix(Prefix, "/")+"/api/aws", http.HandlerFunc(c.operation)))
	mux.HandleFunc(Prefix+"api/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, http.StatusNotFound, "UnknownOperationException", fmt.Sprintf("no console operation at %s %s", r.Method, r.URL.Path))
	})
	mux.HandleFunc(Prefix, c.asset)
	return securityHeaders(c.contentPolicy(), mux)
}

// contentPolicy allows nothing but this origin, and WebSockets to the
// microVM endpoints for the browser shell: no external requests at all.
func (c *Console) contentPolicy() string {
	ep := "*." + c.cfg.Domain
	if c.cfg.EndpointPort != "" && c.cfg.EndpointPort != "443" {
		ep += ":" + c.cfg.EndpointPort
	}
	return "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; " +
		"connect-src 'self' wss://" + ep + "; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
}

func securityHeaders(csp string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		next.ServeHTTP(w, r)
	})
}

// asset serves the embedded front-end; any path that is not a file is the
// single-page app's index.
func (c *Console) asset(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if !c.built {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "kiln's console assets were not built into this binary: run `make build` (it builds internal/console/web with npm) and start the new bin/kiln\n")
		return
	}
	name := strings.TrimPrefix(r.URL.Path, Prefix)
	if name == "" || path.Ext(name) == "" {
		r = r.Clone(r.Context())
		r.URL.Path = "/"
		w.Header().Set("Cache-Control", "no-cache")
	} else {
		r = r.Clone(r.Context())
		r.URL.Path = "/" + name
	}
	c.static.ServeHTTP(w, r)
}

type errorBody struct {
	Type    string `json:"__type"`
	Message string `json:"message"`
}

func writeErr(w http.ResponseWriter, status int, typ, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("x-amzn-ErrorType", typ)
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(errorBody{Type: typ, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func randomToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// sameOrigin refuses a browser request sent by another site's page: when
// the browser names an Origin it must be this host. (SameSite=Strict
// already keeps the cookie off such requests; this covers sign-in, which
// has no cookie yet.)
func sameOrigin(r *http.Request) bool {
	o := r.Header.Get("Origin")
	if o == "" {
		return r.Header.Get("Sec-Fetch-Site") == "" || r.Header.Get("Sec-Fetch-Site") == "same-origin"
	}
	u, err := url.Parse(o)
	return err == nil && u.Host == r.Host
}

func clientAddr(r *http.Request) string {
	h, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return h
}

// tooManyFailures allows 10 failed sign-ins per client address a minute.
func (c *Console) tooManyFailures(addr string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	recent := slices.DeleteFunc(c.fails[addr], func(t time.Time) bool { return now.Sub(t) > time.Minute })
	if len(recent) == 0 {
		delete(c.fails, addr)
	} else {
		c.fails[addr] = recent
	}
	return len(recent) >= 10
}

func (c *Console) failed(addr string, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.fails) > maxSessions { // a flood of addresses: forget the oldest state
		clear(c.fails)
	}
	c.fails[addr] = append(c.fails[addr], now)
}

type signInInput struct {
	AccessKeyID     string `json:"accessKeyId"`
	SecretAccessKey string `json:"secretAccessKey"`
}

// sessionInfo is what the page learns about its session.
type sessionInfo struct {
	AccessKeyID string    `json:"accessKeyId"`
	Account     string    `json:"account"`
	Operator    bool      `json:"operator"`
	Accounts    []string  `json:"accounts,omitempty"`
	CSRFToken   string    `json:"csrfToken"`
	ExpiresAt   time.Time `json:"expiresAt"`
	Domain      string    `json:"domain"`
}

func (c *Console) signIn(w http.ResponseWriter, r *http.Request) {
	now := c.cfg.Now()
	if !sameOrigin(r) {
		writeErr(w, http.StatusForbidden, "AccessDeniedException", "sign-in must come from the console's own page")
		return
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		writeErr(w, http.StatusBadRequest, "ValidationException", "sign-in takes a JSON body {accessKeyId, secretAccessKey}")
		return
	}
	addr := clientAddr(r)
	if c.tooManyFailures(addr, now) {
		w.Header().Set("Retry-After", "60")
		writeErr(w, http.StatusTooManyRequests, "ThrottlingException", "too many failed sign-ins from this address: wait a minute and try again")
		return
	}
	var in signInInput
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxSignInBody)).Decode(&in); err != nil {
		writeErr(w, http.StatusBadRequest, "ValidationException", "sign-in takes a JSON body {accessKeyId, secretAccessKey}")
		return
	}
	if in.AccessKeyID == "" || in.SecretAccessKey == "" || len(in.AccessKeyID) > 128 || len(in.SecretAccessKey) > 256 {
		writeErr(w, http.StatusBadRequest, "ValidationException", "give the access key id and the secret access key (as in the credentials file)")
		return
	}
	key, err := c.cfg.Store.GetAccessKey(r.Context(), in.AccessKeyID)
	if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		slog.Error("console: reading access key", "err", err)
		writeErr(w, http.StatusInternalServerError, "InternalServerException", "reading the access key failed: try again")
		return
	}
	// One answer for an unknown id and a wrong secret: no key-id oracle.
	if err != nil || subtle.ConstantTimeCompare([]byte(key.Secret), []byte(in.SecretAccessKey)) != 1 {
		c.failed(addr, now)
		slog.Warn("console: failed sign-in", "client", addr)
		writeErr(w, http.StatusForbidden, "AccessDeniedException", "the access key id or secret access key is wrong")
		return
	}
	s := &session{id: randomToken(), csrf: randomToken(), key: key, created: now, expires: now.Add(c.cfg.SessionTTL)}
	c.mu.Lock()
	c.sweepLocked(now)
	if len(c.byID) >= maxSessions {
		var oldest *session
		for _, o := range c.byID {
			if oldest == nil || o.created.Before(oldest.created) {
				oldest = o
			}
		}
		delete(c.byID, oldest.id)
	}
	c.byID[s.id] = s
	c.mu.Unlock()
	slog.Info("console: signed in", "account", key.Account, "key", key.ID, "client", addr)
	http.SetCookie(w, c.cookie(s.id, s.expires))
	info, err := c.info(r.Context(), s)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, "InternalServerException", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (c *Console) cookie(value string, expires time.Time) *http.Cookie {
	ck := &http.Cookie{Name: cookieName, Value: value, Path: Prefix, HttpOnly: true, Secure: c.cfg.TLS, SameSite: http.SameSiteStrictMode}
	if value == "" {
		ck.MaxAge = -1
	} else {
		ck.Expires = expires
	}
	return ck
}

func (c *Console) sweepLocked(now time.Time) {
	for id, s := range c.byID {
		if !now.Before(s.expires) {
			delete(c.byID, id)
		}
	}
}

func (c *Console) operator(account string) bool { return slices.Contains(c.cfg.Operators, account) }

func (c *Console) info(ctx context.Context, s *session) (sessionInfo, error) {
	info := sessionInfo{AccessKeyID: s.key.ID, Account: s.key.Account, Operator: c.operator(s.key.Account),
		CSRFToken: s.csrf, ExpiresAt: s.expires, Domain: c.cfg.Domain}
	if info.Operator {
		accts, err := c.accounts(ctx)
		if err != nil {
			return info, err
		}
		info.Accounts = accts
	}
	return info, nil
}

// accounts lists every account that has a key.
func (c *Console) accounts(ctx context.Context) ([]string, error) {
	keys, err := c.cfg.Store.ListAccessKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing accounts: %w", err)
	}
	var out []string
	for _, k := range keys {
		if !slices.Contains(out, k.Account) {
			out = append(out, k.Account)
		}
	}
	slices.Sort(out)
	return out, nil
}

// session returns the request's live session, or answers 401/403 itself.
// Calls that change state must carry the session's CSRF token. The key is
// read again on every call, so deleting it ends its sessions.
func (c *Console) session(w http.ResponseWriter, r *http.Request) (*session, bool) {
	ck, err := r.Cookie(cookieName)
	now := c.cfg.Now()
	c.mu.Lock()
	var s *session
	if err == nil {
		s = c.byID[ck.Value]
		if s != nil && !now.Before(s.expires) {
			delete(c.byID, s.id)
			s = nil
		}
	}
	c.mu.Unlock()
	if s == nil {
		writeErr(w, http.StatusUnauthorized, "UnrecognizedClientException", "not signed in, or the session expired: sign in again")
		return nil, false
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		tok := r.Header.Get(csrfHeader)
		if !sameOrigin(r) || subtle.ConstantTimeCompare([]byte(tok), []byte(s.csrf)) != 1 {
			writeErr(w, http.StatusForbidden, "AccessDeniedException", "missing or wrong CSRF token: reload the console")
			return nil, false
		}
	}
	key, err := c.cfg.Store.GetAccessKey(r.Context(), s.key.ID)
	if err != nil || key.Account != s.key.Account {
		c.mu.Lock()
		delete(c.byID, s.id)
		c.mu.Unlock()
		writeErr(w, http.StatusUnauthorized, "UnrecognizedClientException", "the access key of this session no longer exists: sign in again")
		return nil, false
	}
	return s, true
}

func (c *Console) whoAmI(w http.ResponseWriter, r *http.Request) {
	s, ok := c.session(w, r)
	if !ok {
		return
	}
	info, err := c.info(r.Context(), s)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, "InternalServerException", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (c *Console) signOut(w http.ResponseWriter, r *http.Request) {
	s, ok := c.session(w, r)
	if !ok {
		return
	}
	c.mu.Lock()
	delete(c.byID, s.id)
	c.mu.Unlock()
	http.SetCookie(w, c.cookie("", time.Time{}))
	w.WriteHeader(http.StatusNoContent)
}

// actingAccount is the account a call acts in: the session's, or for the
// operator the one X-Kiln-Account names.
func (c *Console) actingAccount(w http.ResponseWriter, r *http.Request, s *session) (string, bool) {
	want := r.Header.Get(accountHeader)
	if want == "" || want == s.key.Account {
		return s.key.Account, true
	}
	if !c.operator(s.key.Account) {
		writeErr(w, http.StatusForbidden, "AccessDeniedException", "only the operator may act in another account")
		return "", false
	}
	accts, err := c.accounts(r.Context())
	if err != nil {
		writeErr(w, http.StatusInternalServerError, "InternalServerException", err.Error())
		return "", false
	}
	if !slices.Contains(accts, want) {
		writeErr(w, http.StatusNotFound, "ResourceNotFoundException", fmt.Sprintf("account %s has no access key", want))
		return "", false
	}
	return want, true
}

// operation runs an API operation as the session's account.
func (c *Console) operation(w http.ResponseWriter, r *http.Request) {
	s, ok := c.session(w, r)
	if !ok {
		return
	}
	account, ok := c.actingAccount(w, r, s)
	if !ok {
		return
	}
	key := s.key
	key.Secret = ""
	if account != key.Account {
		slog.Info("console: operator acts in another account", "operator", key.Account, "account", account, "op", r.Method+" "+r.URL.Path)
		key.Account = account
	}
	w.Header().Set("Cache-Control", "no-store")
	c.cfg.API.SessionHandler().ServeHTTP(w, r.WithContext(api.WithPrincipal(r.Context(), key)))
}
