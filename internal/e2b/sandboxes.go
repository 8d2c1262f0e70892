package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	lc "github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Bounds of what a sandbox carries.
const (
	maxMetadata      = 64
	maxMetadataKey   = 256
	maxMetadataValue = 1024
	maxEnvVars       = 256
	maxEnvBytes      = 128 << 10
	maxTemplateID    = 256
	maxListScan      = 10000
)

// newSandbox is E2B's NewSandbox (POST /sandboxes and /v2/sandboxes).
// Fields kiln cannot honour yet are decoded so that asking for them is
// refused instead of silently ignored.
type newSandbox struct {
	TemplateID          string            `json:"templateID"`
	Timeout             *int64            `json:"timeout"`
	Metadata            map[string]string `json:"metadata"`
	EnvVars             map[string]string `json:"envVars"`
	AllowInternetAccess *bool             `json:"allow_internet_access"`
	Secure              *bool             `json:"secure"`
	AutoPause           *bool             `json:"autoPause"`
	AutoPauseMemory     *bool             `json:"autoPauseMemory"`
	AutoResume          *struct {
		Enabled bool `json:"enabled"`
	} `json:"autoResume"`
	Network      json.RawMessage `json:"network"`
	Mcp          json.RawMessage `json:"mcp"`
	VolumeMounts json.RawMessage `json:"volumeMounts"`
	Iam          json.RawMessage `json:"iam"`

	// policy is Network's egress rules, checked (nil without rules);
	// traffic is its allowPublicTraffic (TrafficPublic by default).
	policy  *rules
	traffic string
}

// set reports whether a raw JSON member carries something.
func set(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s != "" && s != "null" && s != "{}" && s != "[]"
}

// parseNewSandbox decodes and checks a create request.
func parseNewSandbox(body []byte) (newSandbox, error) {
	var in newSandbox
	if len(body) == 0 {
		return in, errorf(400, "request body is empty: templateID is required")
	}
	if err := json.Unmarshal(body, &in); err != nil {
		return in, errorf(400, "request body is not a valid NewSandbox: %v", err)
	}
	if in.TemplateID == "" || len(in.TemplateID) > maxTemplateID {
		return in, errorf(400, "templateID must be 1-%d characters: the name of a kiln image (optionally NAME:VERSION)", maxTemplateID)
	}
	if in.Timeout != nil && (*in.Timeout < 1 || *in.Timeout > MaxTimeout) {
		return in, errorf(400, "timeout must be between 1 and %d seconds, not %d", MaxTimeout, *in.Timeout)
	}
	if err := checkMetadata(in.Metadata); err != nil {
		return in, err
	}
	if err := checkEnv(in.EnvVars); err != nil {
		return in, err
	}
	switch {
	case in.AutoPauseMemory != nil && !*in.AutoPauseMemory:
		return in, errorf(400, "kiln pauses sandboxes with their memory only: leave lifecycle.onTimeout.keepMemory at true")
	case in.AutoResume != nil && in.AutoResume.Enabled && (in.AutoPause == nil || !*in.AutoPause):
		return in, errorf(400, "autoResume needs autoPause (lifecycle.onTimeout \"pause\"): only a paused sandbox can resume on traffic")
	case set(in.Mcp), set(in.VolumeMounts), set(in.Iam):
		return in, errorf(400, "kiln does not support mcp, volumeMounts or iam yet")
	}
	in.traffic = TrafficPublic
	if set(in.Network) {
		var n networkIn
		if err := json.Unmarshal(in.Network, &n); err != nil {
			return in, errorf(400, "network is not a valid SandboxNetworkConfig: %v", err)
		}
		if n.AllowInternetAccess != nil {
			return in, errorf(400, "network.allow_internet_access is for updates: give allow_internet_access beside network")
		}
		r, err := parseNetwork(n)
		if err != nil {
			return in, err
		}
		if n.AllowPublicTraffic != nil && !*n.AllowPublicTraffic {
			in.traffic = TrafficToken
		}
		if in.AllowInternetAccess != nil && !*in.AllowInternetAccess {
			// E2B: the same as denying 0.0.0.0/0 (allowOut still wins).
			r.policy.Deny = append(r.policy.Deny, netip.MustParsePrefix("0.0.0.0/0"))
		}
		if !r.empty() {
			in.policy = &r
		}
	}
	return in, nil
}

func checkMetadata(md map[string]string) error {
	if len(md) > maxMetadata {
		return errorf(400, "metadata has %d entries; at most %d", len(md), maxMetadata)
	}
	for k, v := range md {
		if k == "" || len(k) > maxMetadataKey || len(v) > maxMetadataValue {
			return errorf(400, "metadata keys must be 1-%d bytes and values at most %d bytes", maxMetadataKey, maxMetadataValue)
		}
	}
	return nil
}

func checkEnv(env map[string]string) error {
	if len(env) > maxEnvVars {
		return errorf(400, "envVars has %d entries; at most %d", len(env), maxEnvVars)
	}
	n := 0
	for k, v := range env {
		n += len(k) + len(v)
		if !validEnvName(k) || strings.ContainsRune(v, 0) {
			return errorf(400, "envVars name %q is not a valid variable name (letters, digits and _, not starting with a digit) or its value holds a NUL byte", k)
		}
	}
	if n > maxEnvBytes {
		return errorf(400, "envVars hold %d bytes; at most %d", n, maxEnvBytes)
	}
	return nil
}

func validEnvName(k string) bool {
	if k == "" || len(k) > 256 || (k[0] >= '0' && k[0] <= '9') {
		return false
	}
	for _, c := range k {
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// sandboxOut is E2B's Sandbox (create, connect).
type sandboxOut struct {
	SandboxID       string `json:"sandboxID"`
	TemplateID      string `json:"templateID"`
	ClientID        string `json:"clientID"`
	EnvdVersion     string `json:"envdVersion"`
	EnvdAccessToken string `json:"envdAccessToken"`
	Domain          string `json:"domain,omitempty"`
	// TrafficAccessToken is what the sandbox's ports need when it was
	// made with network.allowPublicTraffic false.
	TrafficAccessToken string `json:"trafficAccessToken,omitempty"`
}

// clientID names the node in E2B; kiln is one.
const clientID = "kiln"

func (s *Server) sandboxView(account string, sb store.E2BSandbox) sandboxOut {
	out := sandboxOut{SandboxID: sb.ID, TemplateID: sb.TemplateID, ClientID: clientID, EnvdVersion: EnvdVersion,
		EnvdAccessToken: s.cfg.Tokens.Mint(account, sb.ID), Domain: s.cfg.Domain}
	if sb.Traffic == TrafficToken && s.cfg.TrafficTokens != nil {
		out.TrafficAccessToken = s.cfg.TrafficTokens.Mint(account, sb.ID)
	}
	return out
}

// listedSandbox is E2B's ListedSandbox; sandboxDetail adds the rest.
type listedSandbox struct {
	SandboxID   string            `json:"sandboxID"`
	TemplateID  string            `json:"templateID"`
	ClientID    string            `json:"clientID"`
	StartedAt   string            `json:"startedAt"`
	EndAt       string            `json:"endAt"`
	State       string            `json:"state"`
	CPUCount    int64             `json:"cpuCount"`
	MemoryMB    int64             `json:"memoryMB"`
	DiskSizeMB  int64             `json:"diskSizeMB"`
	EnvdVersion string            `json:"envdVersion"`
	Metadata    map[string]string `json:"metadata,omitempty"`
}

type sandboxDetail struct {
	listedSandbox
	EnvdAccessToken     string      `json:"envdAccessToken"`
	Domain              string      `json:"domain,omitempty"`
	AllowInternetAccess bool        `json:"allowInternetAccess"`
	Lifecycle           lifecycle   `json:"lifecycle"`
	Network             *networkOut `json:"network,omitempty"`
}

// lifecycle is E2B's SandboxLifecycle: what the timeout does.
type lifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"`
}

func lifecycleOf(m store.Microvm) lifecycle {
	if m.OnDeadline == store.DeadlineSuspend {
		return lifecycle{OnTimeout: "pause", AutoResume: m.IdlePolicy != nil && m.IdlePolicy.AutoResumeEnabled}
	}
	return lifecycle{OnTimeout: "kill"}
}

// stateOf is E2B's state of a live microVM: paused once suspending.
func stateOf(st store.MicrovmState) string {
	if st == store.StateSuspended || st == store.StateSuspending {
		return "paused"
	}
	return "running"
}

func listedView(sb store.E2BSandbox, m store.Microvm) listedSandbox {
	return listedSandbox{SandboxID: sb.ID, TemplateID: sb.TemplateID, ClientID: clientID,
		StartedAt: m.StartedAt.UTC().Format(time.RFC3339Nano), EndAt: m.DeadlineAt.UTC().Format(time.RFC3339Nano),
		State: stateOf(m.State), CPUCount: max(m.VCPUs, 1), MemoryMB: m.MemoryMiB, EnvdVersion: EnvdVersion, Metadata: sb.Metadata}
}

// runInput is the RunMicrovm request the create maps to.
type runInput struct {
	ImageIdentifier          string   `json:"imageIdentifier"`
	ImageVersion             string   `json:"imageVersion,omitempty"`
	MaximumDurationInSeconds int64    `json:"maximumDurationInSeconds"`
	EgressNetworkConnectors  []string `json:"egressNetworkConnectors,omitempty"`
	IngressNetworkConnectors []string `json:"ingressNetworkConnectors,omitempty"`
}

func (s *Server) create(ctx context.Context, q *request) (int, any, error) {
	in, err := parseNewSandbox(q.body)
	if err != nil {
		return 0, nil, err
	}
	snap, isSnap, err := s.snapshotOf(ctx, q.key.Account, in.TemplateID)
	if err != nil {
		return 0, nil, err
	}
	if isSnap && len(snap.EnvVars) > 0 {
		// envd's env vars are the host's (not in the guest's memory): a
		// sandbox from a snapshot has its source's, then its own.
		env := maps.Clone(snap.EnvVars)
		maps.Copy(env, in.EnvVars)
		if err := checkEnv(env); err != nil {
			return 0, nil, err
		}
		in.EnvVars = env
	}
	if in.traffic == TrafficToken && s.cfg.TrafficTokens == nil {
		return 0, nil, errorf(501, "this kiln server cannot mint traffic access tokens: leave network.allowPublicTraffic unset")
	}
	run := runInput{MaximumDurationInSeconds: DefaultTimeout, IngressNetworkConnectors: s.cfg.Ingress}
	if run.ImageIdentifier, run.ImageVersion, err = s.resolveTemplate(ctx, q.key.Account, in.TemplateID); err != nil {
		return 0, nil, err
	}
	if in.Timeout != nil {
		run.MaximumDurationInSeconds = *in.Timeout
	}
	if in.AllowInternetAccess != nil && *in.AllowInternetAccess || in.policy != nil {
		// Rules filter internet egress: a sandbox with rules has it,
		// narrowed by them (allow_internet_access false is a deny of
		// 0.0.0.0/0 under its allowOut, as in E2B).
		run.EgressNetworkConnectors = []string{s.cfg.Egress}
	}
	var m struct {
		MicrovmID string `json:"microvmId"`
	}
	if err := s.op(ctx, q.key, "POST", "/microvms", nil, run, &m); err != nil {
		var ae *apiError
		if errors.As(err, &ae) && ae.Code == 404 {
			ae.Message = fmt.Sprintf("template %q not found: E2B templates are kiln images of your account (%s)", in.TemplateID, ae.Message)
		}
		return 0, nil, err
	}
	sb := store.E2BSandbox{ID: m.MicrovmID, Account: q.key.Account, TemplateID: in.TemplateID,
		Metadata: in.Metadata, EnvVars: in.EnvVars, Traffic: in.traffic, CreatedAt: s.cfg.Now().UTC()}
	if in.policy != nil {
		sb.AllowOut, sb.DenyOut = in.policy.allowOut(), prefixStrings(in.policy.policy.Deny)
	}
	if err := s.cfg.Sandboxes.PutE2BSandbox(ctx, sb); err != nil {
		s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvms/"+sb.ID, nil, nil, nil)
		return 0, nil, fmt.Errorf("recording sandbox: %w", err)
	}
	if in.AllowInternetAccess != nil && !*in.AllowInternetAccess && in.policy == nil {
		if rec, err := s.cfg.Store.GetMicrovm(ctx, q.key.Account, sb.ID); err == nil && len(rec.EgressNetworkConnectors) > 0 {
			s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvms/"+sb.ID, nil, nil, nil)
			return 0, nil, errorf(400, "allowInternetAccess false: template %s (or this server's --default-egress) gives its microVMs internet egress, which kiln cannot take away per sandbox yet", in.TemplateID)
		}
	}
	if in.AutoPause != nil && *in.AutoPause {
		// Before the wait: the deadline controller must find it set even
		// when the timeout is shorter than the boot.
		_, err := s.cfg.Store.UpdateMicrovm(ctx, q.key.Account, sb.ID, nil, func(m *store.Microvm) error {
			m.OnDeadline = store.DeadlineSuspend
			if in.AutoResume != nil && in.AutoResume.Enabled {
				// The endpoint proxy resumes a suspended microVM on traffic
				// when its idle policy says so (as for AWS's microVMs);
				// no idle time: E2B pauses only at the timeout. It stays
				// suspended as long as any paused sandbox.
				m.IdlePolicy = &store.IdlePolicy{SuspendedDurationSeconds: lc.SuspendedRetentionSeconds, AutoResumeEnabled: true}
			}
			return nil
		})
		if err != nil {
			s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvms/"+sb.ID, nil, nil, nil)
			return 0, nil, fmt.Errorf("recording autoPause: %w", err)
		}
	}
	if _, err := s.waitFor(ctx, q.key.Account, sb.ID, store.StateRunning); err != nil {
		s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvms/"+sb.ID, nil, nil, nil)
		return 0, nil, err
	}
	if in.policy != nil {
		// Before the sandbox is handed out, but after its start: a guest
		// restored from a snapshot may reach out in the moment between
		// (the deny list holds all along; only the tenant's own rules
		// arrive this late).
		if err := s.applyNetwork(ctx, sb.ID, *in.policy); err != nil {
			s.op(context.WithoutCancel(ctx), q.key, "DELETE", "/microvms/"+sb.ID, nil, nil, nil)
			return 0, nil, err
		}
	}
	return http.StatusCreated, s.sandboxView(q.key.Account, sb), nil
}

func (s *Server) get(ctx context.Context, q *request) (int, any, error) {
	sb, m, err := s.sandboxOf(ctx, q.key.Account, q.r.PathValue("id"))
	if err != nil {
		return 0, nil, err
	}
	d := sandboxDetail{listedSandbox: listedView(sb, m), EnvdAccessToken: s.cfg.Tokens.Mint(q.key.Account, sb.ID),
		Domain: s.cfg.Domain, AllowInternetAccess: slices.Contains(m.EgressNetworkConnectors, s.cfg.Egress), Lifecycle: lifecycleOf(m),
		Network: networkView(sb)}
	return 200, d, nil
}

func (s *Server) kill(ctx context.Context, q *request) (int, any, error) {
	id := q.r.PathValue("id")
	if _, _, err := s.sandboxOf(ctx, q.key.Account, id); err != nil {
		return 0, nil, err
	}
	if err := s.op(ctx, q.key, "DELETE", "/microvms/"+id, nil, nil, nil); err != nil {
		var ae *apiError
		if errors.As(err, &ae) && ae.Code == 409 {
			return 0, nil, errorf(404, "sandbox %s not found (it is already being killed)", id)
		}
		return 0, nil, err
	}
	return http.StatusNoContent, nil, nil
}

// timeoutBody is E2B's timeout body (setTimeout, connect).
type timeoutBody struct {
	Timeout *int64 `json:"timeout"`
}

func parseTimeout(body []byte, required bool) (*int64, error) {
	var in timeoutBody
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return nil, errorf(400, "request body is not valid JSON: %v", err)
		}
	}
	if in.Timeout == nil {
		if required {
			return nil, errorf(400, "timeout (seconds) is required")
		}
		return nil, nil
	}
	if *in.Timeout < 0 || *in.Timeout > MaxTimeout {
		return nil, errorf(400, "timeout must be between 0 and %d seconds, not %d", MaxTimeout, *in.Timeout)
	}
	return in.Timeout, nil
}

// extend sets the sandbox to end timeout seconds from now. The AWS API
// fixes a microVM's maximum duration at run, so this is the one record
// change the E2B API makes itself: a compare-and-set on a live record,
// after which the API's reaper enforces the new deadline like any other.
func (s *Server) extend(ctx context.Context, account, id string, timeout int64) error {
	live := []store.MicrovmState{store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended}
	_, err := s.cfg.Store.UpdateMicrovm(ctx, account, id, live, func(m *store.Microvm) error {
		now := s.cfg.Now().UTC()
		m.DeadlineAt = now.Add(time.Duration(timeout) * time.Second)
		m.MaximumDurationInSeconds = int64(m.DeadlineAt.Sub(m.StartedAt).Round(time.Second) / time.Second)
		m.UpdatedAt = now
		return nil
	})
	if err != nil {
		return errorf(404, "sandbox %s not found: %v", id, err)
	}
	return nil
}

func (s *Server) setTimeout(ctx context.Context, q *request) (int, any, error) {
	t, err := parseTimeout(q.body, true)
	if err != nil {
		return 0, nil, err
	}
	id := q.r.PathValue("id")
	if _, _, err := s.sandboxOf(ctx, q.key.Account, id); err != nil {
		return 0, nil, err
	}
	if err := s.extend(ctx, q.key.Account, id, *t); err != nil {
		return 0, nil, err
	}
	return http.StatusNoContent, nil, nil
}

func (s *Server) pause(ctx context.Context, q *request) (int, any, error) {
	id := q.r.PathValue("id")
	_, m, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	if stateOf(m.State) == "paused" {
		return 0, nil, errorf(409, "sandbox %s is already paused", id)
	}
	if err := s.op(ctx, q.key, "POST", "/microvms/"+id+"/suspend", nil, nil, nil); err != nil {
		return 0, nil, err
	}
	if _, err := s.waitFor(ctx, q.key.Account, id, store.StateSuspended); err != nil {
		return 0, nil, err
	}
	// A paused sandbox does not run out its timeout (E2B's rule): it is
	// kept for the retention, then killed.
	if err := s.extend(ctx, q.key.Account, id, lc.SuspendedRetentionSeconds); err != nil {
		return 0, nil, err
	}
	return http.StatusNoContent, nil, nil
}

// resumeTimeout is the timeout of a sandbox resumed by a connect that
// names none (E2B's ConnectSandboxV2 default).
var resumeTimeout int64 = lc.ResumedTimeoutSeconds

// connect resumes a paused sandbox (201) or returns a running one (200),
// setting its timeout when the body names one.
func (s *Server) connect(ctx context.Context, q *request) (int, any, error) {
	t, err := parseTimeout(q.body, false)
	if err != nil {
		return 0, nil, err
	}
	id := q.r.PathValue("id")
	sb, m, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	status := 200
	if m.State == store.StateSuspending {
		if m, err = s.waitFor(ctx, q.key.Account, id, store.StateSuspended); err != nil {
			return 0, nil, err
		}
	}
	if m.State == store.StateSuspended {
		status = http.StatusCreated
		// The timeout starts again at the resume (its deadline passed if
		// the timeout paused it): E2B's default when none is given.
		if t == nil {
			t = &resumeTimeout
		}
		if err := s.extend(ctx, q.key.Account, id, *t); err != nil {
			return 0, nil, err
		}
		if err := s.op(ctx, q.key, "POST", "/microvms/"+id+"/resume", nil, nil, nil); err != nil {
			return 0, nil, err
		}
	}
	if _, err := s.waitFor(ctx, q.key.Account, id, store.StateRunning); err != nil {
		return 0, nil, err
	}
	if t != nil {
		if err := s.extend(ctx, q.key.Account, id, *t); err != nil {
			return 0, nil, err
		}
	}
	return status, s.sandboxView(q.key.Account, sb), nil
}

// listQuery is GET /v2/sandboxes' query.
type listQuery struct {
	metadata map[string]string
	states   []string
	limit    int
	after    string
}

// parseListQuery reads metadata (an URL-encoded "k=v&k2=v2" string, each
// key and value encoded once more, as the SDK sends it), state (running,
// paused; comma-separated or repeated), limit (1-100) and nextToken.
func parseListQuery(q url.Values) (listQuery, error) {
	lq := listQuery{limit: 100}
	if md := q.Get("metadata"); md != "" {
		if len(md) > 16<<10 {
			return lq, errorf(400, "metadata filter is longer than 16 KiB")
		}
		pairs, err := url.ParseQuery(md)
		if err != nil {
			return lq, errorf(400, "metadata filter must be URL-encoded key=value pairs: %v", err)
		}
		lq.metadata = map[string]string{}
		for k, vs := range pairs {
			key, err1 := url.QueryUnescape(k)
			val, err2 := url.QueryUnescape(vs[len(vs)-1])
			if err1 != nil || err2 != nil {
				return lq, errorf(400, "metadata filter holds a bad escape")
			}
			lq.metadata[key] = val
		}
		if len(lq.metadata) > maxMetadata {
			return lq, errorf(400, "metadata filter has more than %d keys", maxMetadata)
		}
	}
	for _, v := range q["state"] {
		for _, st := range strings.Split(v, ",") {
			if st != "running" && st != "paused" {
				return lq, errorf(400, "state must be running or paused, not %q", st)
			}
			lq.states = append(lq.states, st)
		}
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 100 {
			return lq, errorf(400, "limit must be between 1 and 100, not %q", l)
		}
		lq.limit = n
	}
	lq.after = q.Get("nextToken")
	if lq.after != "" && !validSandboxID(lq.after) {
		return lq, errorf(400, "nextToken %q is not one this server gave", lq.after)
	}
	return lq, nil
}

func (lq listQuery) matches(sb store.E2BSandbox, m store.Microvm) bool {
	if len(lq.states) > 0 && !slices.Contains(lq.states, stateOf(m.State)) {
		return false
	}
	for k, v := range lq.metadata {
		if got, ok := sb.Metadata[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// page lists the account's sandboxes that match, oldest first, after the
// token; the next token is the id of the last one returned when more
// match.
func (s *Server) page(ctx context.Context, account string, lq listQuery) ([]listedSandbox, string, error) {
	all, err := s.cfg.Sandboxes.ListE2BSandboxes(ctx, account, maxListScan)
	if err != nil {
		return nil, "", err
	}
	start := 0
	if lq.after != "" {
		i := slices.IndexFunc(all, func(sb store.E2BSandbox) bool { return sb.ID == lq.after })
		if i < 0 {
			return []listedSandbox{}, "", nil // that sandbox is gone: the listing moved past it
		}
		start = i + 1
	}
	out := []listedSandbox{}
	for _, sb := range all[start:] {
		m, err := s.cfg.Store.GetMicrovm(ctx, account, sb.ID)
		if err != nil || gone(m.State) || !lq.matches(sb, m) {
			continue
		}
		if len(out) == lq.limit {
			return out, out[len(out)-1].SandboxID, nil
		}
		out = append(out, listedView(sb, m))
	}
	return out, "", nil
}

func (s *Server) list(ctx context.Context, q *request) (int, any, error) {
	lq, err := parseListQuery(q.r.URL.Query())
	if err != nil {
		return 0, nil, err
	}
	out, next, err := s.page(ctx, q.key.Account, lq)
	if err != nil {
		return 0, nil, err
	}
	if next != "" {
		q.header.Set("X-Next-Token", next)
	}
	return 200, out, nil
}

// listV1 is GET /sandboxes: running sandboxes, metadata filter, no pages.
func (s *Server) listV1(ctx context.Context, q *request) (int, any, error) {
	lq, err := parseListQuery(url.Values{"metadata": q.r.URL.Query()["metadata"]})
	if err != nil {
		return 0, nil, err
	}
	lq.states, lq.limit = []string{"running"}, maxListScan
	out, _, err := s.page(ctx, q.key.Account, lq)
	return 200, out, err
}
