package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// MaxDurationSeconds caps maximumDurationInSeconds (8 hours), as AWS does.
const MaxDurationSeconds = 28800

// MaxRunHookPayload bounds runHookPayload (16 KB, as AWS documents).
const MaxRunHookPayload = 16 << 10

// ShellIngressConnector names the managed ingress connector a microVM must
// have been run with to accept shell tokens.
const ShellIngressConnector = "aws-network-connector:SHELL_INGRESS"

type idlePolicyIn struct {
	MaxIdleDurationSeconds   *int64 `json:"maxIdleDurationSeconds"`
	SuspendedDurationSeconds *int64 `json:"suspendedDurationSeconds"`
	AutoResumeEnabled        *bool  `json:"autoResumeEnabled"`
}

type runMicrovmInput struct {
	ImageIdentifier          string          `json:"imageIdentifier"`
	ImageVersion             string          `json:"imageVersion,omitempty"`
	IngressNetworkConnectors []string        `json:"ingressNetworkConnectors,omitempty"`
	EgressNetworkConnectors  []string        `json:"egressNetworkConnectors,omitempty"`
	ExecutionRoleArn         string          `json:"executionRoleArn,omitempty"`
	IdlePolicy               *idlePolicyIn   `json:"idlePolicy,omitempty"`
	Logging                  json.RawMessage `json:"logging,omitempty"`
	RunHookPayload           *string         `json:"runHookPayload,omitempty"`
	MaximumDurationInSeconds *int64          `json:"maximumDurationInSeconds,omitempty"`
	ClientToken              string          `json:"clientToken,omitempty"`
}

// microvmOut is GetMicrovmResponse and RunMicrovmResponse.
type microvmOut struct {
	MicrovmID                string             `json:"microvmId"`
	State                    store.MicrovmState `json:"state"`
	Endpoint                 string             `json:"endpoint"`
	ImageArn                 string             `json:"imageArn"`
	ImageVersion             string             `json:"imageVersion"`
	MaximumDurationInSeconds int64              `json:"maximumDurationInSeconds"`
	StartedAt                *epoch             `json:"startedAt"`
	ExecutionRoleArn         string             `json:"executionRoleArn,omitempty"`
	IdlePolicy               *store.IdlePolicy  `json:"idlePolicy,omitempty"`
	TerminatedAt             *epoch             `json:"terminatedAt,omitempty"`
	StateReason              string             `json:"stateReason,omitempty"`
	IngressNetworkConnectors []string           `json:"ingressNetworkConnectors,omitempty"`
	EgressNetworkConnectors  []string           `json:"egressNetworkConnectors,omitempty"`
}

func microvmView(m store.Microvm) microvmOut {
	return microvmOut{
		MicrovmID: m.ID, State: m.State, Endpoint: m.Endpoint, ImageArn: m.ImageARN, ImageVersion: m.ImageVersion,
		MaximumDurationInSeconds: m.MaximumDurationInSeconds, StartedAt: ts(m.StartedAt), ExecutionRoleArn: m.ExecutionRoleArn,
		IdlePolicy: m.IdlePolicy, TerminatedAt: tsp(m.TerminatedAt), StateReason: m.StateReason,
		IngressNetworkConnectors: m.IngressNetworkConnectors, EgressNetworkConnectors: m.EgressNetworkConnectors,
	}
}

// clientToken checks an idempotency token. It returns the resource id of
// the first request with the same token and input, or a ClientToken to
// record with the new resource; a token reused with another input is a
// ConflictException.
func (s *Server) clientToken(ctx context.Context, c *call, op, token string, input any) (*store.ClientToken, string, error) {
	if token == "" {
		return nil, "", nil
	}
	if len(token) > 128 {
		return nil, "", fieldError("clientToken", nil, "Member must have length less than or equal to 128")
	}
	b, err := json.Marshal(input)
	if err != nil {
		return nil, "", fmt.Errorf("hashing input: %w", err)
	}
	sum := sha256.Sum256(b)
	hash := hex.EncodeToString(sum[:])
	prev, err := s.st.GetClientToken(ctx, c.account, op, token)
	switch {
	case err == nil && prev.InputHash == hash:
		return nil, prev.ResourceID, nil
	case err == nil:
		return nil, "", conflict("clientToken", token, "clientToken %s was already used with different parameters", token)
	case !errors.Is(err, errdefs.ErrNotFound):
		return nil, "", err
	}
	return &store.ClientToken{Account: c.account, Operation: op, Token: token, InputHash: hash, CreatedAt: s.cfg.Now().UTC()}, "", nil
}

func validateConnectors(field string, list []string) error {
	if len(list) > 10 {
		return fieldError(field, nil, "Member must have length less than or equal to 10")
	}
	for i, a := range list {
		if len(a) > 2048 || !connARNRE.MatchString(a) {
			return fieldError(fmt.Sprintf("%s.%d", field, i+1), a, "Member must be a network connector ARN (arn:aws:lambda:REGION:ACCOUNT:network-connector:NAME)")
		}
	}
	return nil
}

func validateIdlePolicy(p *idlePolicyIn) (*store.IdlePolicy, error) {
	if p == nil {
		return nil, nil
	}
	switch {
	case p.MaxIdleDurationSeconds == nil:
		return nil, fieldError("idlePolicy.maxIdleDurationSeconds", nil, "Member must not be null")
	case p.SuspendedDurationSeconds == nil:
		return nil, fieldError("idlePolicy.suspendedDurationSeconds", nil, "Member must not be null")
	case p.AutoResumeEnabled == nil:
		return nil, fieldError("idlePolicy.autoResumeEnabled", nil, "Member must not be null")
	case *p.MaxIdleDurationSeconds < 60:
		return nil, fieldError("idlePolicy.maxIdleDurationSeconds", *p.MaxIdleDurationSeconds, "Member must have value greater than or equal to 60")
	case *p.SuspendedDurationSeconds < 0:
		return nil, fieldError("idlePolicy.suspendedDurationSeconds", *p.SuspendedDurationSeconds, "Member must have value greater than or equal to 0")
	}
	return &store.IdlePolicy{MaxIdleDurationSeconds: *p.MaxIdleDurationSeconds, SuspendedDurationSeconds: *p.SuspendedDurationSeconds, AutoResumeEnabled: *p.AutoResumeEnabled}, nil
}

func (s *Server) runMicrovm(ctx context.Context, c *call) (any, error) {
	var in runMicrovmInput
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	name, err := resolve(c, kindImage, "imageIdentifier", in.ImageIdentifier)
	if err != nil {
		return nil, err
	}
	idle, err := validateIdlePolicy(in.IdlePolicy)
	if err != nil {
		return nil, err
	}
	maxDur := int64(MaxDurationSeconds)
	if in.MaximumDurationInSeconds != nil {
		maxDur = *in.MaximumDurationInSeconds
		if maxDur < 1 || maxDur > MaxDurationSeconds {
			return nil, fieldError("maximumDurationInSeconds", maxDur, fmt.Sprintf("Member must have value between 1 and %d", MaxDurationSeconds))
		}
	}
	if in.ExecutionRoleArn != "" && !roleARNRE.MatchString(in.ExecutionRoleArn) {
		return nil, fieldError("executionRoleArn", in.ExecutionRoleArn, "Member must be an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
	}
	if err := validateConnectors("ingressNetworkConnectors", in.IngressNetworkConnectors); err != nil {
		return nil, err
	}
	if err := s.validateEgressConnectors("egressNetworkConnectors", in.EgressNetworkConnectors); err != nil {
		return nil, err
	}
	if err := validateLogging("logging", in.Logging); err != nil {
		return nil, err
	}
	if in.RunHookPayload != nil && len(*in.RunHookPayload) > MaxRunHookPayload {
		return nil, fieldError("runHookPayload", nil, fmt.Sprintf("Member must have length less than or equal to %d", MaxRunHookPayload))
	}
	hashed := in
	hashed.ClientToken = ""
	tok, prev, err := s.clientToken(ctx, c, "RunMicrovm", in.ClientToken, hashed)
	if err != nil {
		return nil, err
	}
	if prev != "" {
		m, err := s.st.GetMicrovm(ctx, c.account, prev)
		if err != nil {
			return nil, toAPIError(err, kindMicrovm, prev)
		}
		return microvmView(m), nil
	}

	img, err := s.st.GetImage(ctx, c.account, name)
	if err != nil {
		return nil, toAPIError(err, kindImage, in.ImageIdentifier)
	}
	version := in.ImageVersion
	if version == "" {
		version = img.LatestActiveVersion
		if version == "" {
			return nil, conflict(kindImage, img.ARN, "image %s has no successfully built version yet (state %s)", img.Name, img.State)
		}
	}
	v, err := s.getVersion(ctx, c.account, name, version)
	if err != nil {
		return nil, toAPIError(err, "microvm-image-version", name+":"+version)
	}
	version = v.Version // the name it is stored under, whichever was asked
	if v.State != store.VersionSuccessful {
		return nil, conflict(kindImage, img.ARN, "image %s version %s is %s, not SUCCESSFUL", name, version, v.State)
	}
	if v.Status != store.VersionActive {
		return nil, conflict(kindImage, img.ARN, "image %s version %s is INACTIVE", name, version)
	}

	mem, vcpus, err := s.microvmSize(ctx, v)
	if err != nil {
		return nil, err
	}
	if ha, ok := s.be.(lifecycle.HostAdmitter); ok {
		if err := ha.AdmitMemory(ctx, mem); err != nil {
			return nil, toAPIError(err, kindMicrovm, "")
		}
	}
	adm, err := s.admission(ctx, c.account)
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now().UTC()
	id := newMicrovmID()
	m := store.Microvm{
		ID: id, Account: c.account, ARN: s.arn(c.account, kindMicrovm, id), State: store.StatePending,
		Endpoint: s.endpoint(id), ImageName: name, ImageARN: img.ARN, ImageVersion: version,
		ExecutionRoleArn: in.ExecutionRoleArn, IdlePolicy: idle, Logging: in.Logging,
		MaximumDurationInSeconds: maxDur, IngressNetworkConnectors: in.IngressNetworkConnectors,
		EgressNetworkConnectors: in.EgressNetworkConnectors, StartedAt: now, UpdatedAt: now,
		DeadlineAt: now.Add(time.Duration(maxDur) * time.Second),
		MemoryMiB:  mem, VCPUs: vcpus,
		Hooks: v.Config.Hooks, VersionLogging: v.Config.Logging, Platform: v.Platform,
	}
	if m.Hooks == nil {
		// Empty, not nil: nil marks a record older than this copy, for
		// which the engine asks for the version's settings.
		m.Hooks = &store.Hooks{}
	}
	if in.RunHookPayload != nil {
		m.RunHookPayload = *in.RunHookPayload
	}
	if len(m.EgressNetworkConnectors) == 0 {
		// The image names the egress a microVM gets unless the run says.
		m.EgressNetworkConnectors = v.Config.EgressNetworkConnectors
	}
	if len(m.EgressNetworkConnectors) == 0 {
		// Neither names one: the operator's default (--default-egress).
		m.EgressNetworkConnectors = s.defaultEgress()
	}
	if tok != nil {
		tok.ResourceID = id
	}
	if err := s.st.CreateMicrovmWithinQuota(ctx, m, tok, adm); err != nil {
		if tok != nil && errors.Is(err, errdefs.ErrConflict) {
			// A concurrent request with the same token won the race.
			return s.runMicrovm(ctx, c)
		}
		if errors.Is(err, errdefs.ErrExhausted) {
			return nil, toAPIError(err, kindMicrovm, "")
		}
		return nil, err
	}
	if err := s.be.StartMicrovm(ctx, m); err != nil {
		bg := context.WithoutCancel(ctx)
		if errors.Is(err, errdefs.ErrExhausted) {
			// The host filled up between the admission check and the start.
			s.rep.MicrovmState(bg, c.account, id, nil, store.StateTerminated, "StartRefused: "+err.Error())
			return nil, toAPIError(err, kindMicrovm, id)
		}
		slog.Error("backend refused to start microvm", "microvm", id, "err", err)
		s.rep.MicrovmState(bg, c.account, id, nil, store.StateTerminated, "StartFailed: "+err.Error())
		return nil, internal("starting microvm: " + err.Error())
	}
	return microvmView(m), nil
}

func (s *Server) endpoint(id string) string {
	u := "https://" + id + "." + s.cfg.Domain
	if s.cfg.EndpointPort != "" && s.cfg.EndpointPort != "443" {
		u += ":" + s.cfg.EndpointPort
	}
	return u
}

func (s *Server) microvm(ctx context.Context, c *call) (store.Microvm, error) {
	ident := c.path("microvmIdentifier")
	id, err := resolve(c, kindMicrovm, "microvmIdentifier", ident)
	if err != nil {
		return store.Microvm{}, err
	}
	m, err := s.st.GetMicrovm(ctx, c.account, id)
	if err != nil {
		return m, toAPIError(err, kindMicrovm, ident)
	}
	return m, nil
}

func (s *Server) getMicrovm(ctx context.Context, c *call) (any, error) {
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	return microvmView(m), nil
}

type microvmItem struct {
	MicrovmID    string             `json:"microvmId"`
	State        store.MicrovmState `json:"state"`
	ImageArn     string             `json:"imageArn"`
	ImageVersion string             `json:"imageVersion"`
	StartedAt    *epoch             `json:"startedAt"`
}

type listOut[T any] struct {
	Items     []T    `json:"items"`
	NextToken string `json:"nextToken,omitempty"`
}

func (s *Server) listMicrovms(ctx context.Context, c *call) (any, error) {
	p, err := pageOf(c, 50)
	if err != nil {
		return nil, err
	}
	q := c.r.URL.Query()
	var f store.MicrovmFilter
	if ident := q.Get("imageIdentifier"); ident != "" {
		if f.ImageName, err = resolve(c, kindImage, "imageIdentifier", ident); err != nil {
			// A malformed identifier is the caller's mistake; an image
			// of another account simply has no microVMs the caller sees.
			var ae *Error
			if errors.As(err, &ae) && ae.Type == "ValidationException" {
				return nil, err
			}
			return listOut[microvmItem]{Items: []microvmItem{}}, nil
		}
	}
	f.ImageVersion = q.Get("imageVersion")
	if f.ImageName != "" && f.ImageVersion != "" {
		// The stored name of the version ("1" or "1.0"), whichever was asked.
		if v, err := s.getVersion(ctx, c.account, f.ImageName, f.ImageVersion); err == nil {
			f.ImageVersion = v.Version
		}
	}
	ms, next, err := s.st.ListMicrovms(ctx, c.account, f, p)
	if err != nil {
		return nil, err
	}
	out := listOut[microvmItem]{Items: make([]microvmItem, 0, len(ms)), NextToken: next}
	for _, m := range ms {
		out.Items = append(out.Items, microvmItem{MicrovmID: m.ID, State: m.State, ImageArn: m.ImageARN, ImageVersion: m.ImageVersion, StartedAt: ts(m.StartedAt)})
	}
	return out, nil
}

func (s *Server) suspendMicrovm(ctx context.Context, c *call) (any, error) {
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	return struct{}{}, s.Suspend(ctx, c.account, m.ID, "SuspendMicrovm")
}

func (s *Server) resumeMicrovm(ctx context.Context, c *call) (any, error) {
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	return struct{}{}, s.Resume(ctx, c.account, m.ID)
}

func (s *Server) terminateMicrovm(ctx context.Context, c *call) (any, error) {
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	return struct{}{}, s.Terminate(ctx, c.account, m.ID, "UserRequested: TerminateMicrovm")
}

// Suspend moves a RUNNING microVM to SUSPENDING and asks the backend to
// suspend it (lifecycle.Service.Suspend), with the API's errors: a
// ConflictException if the microVM is not RUNNING. The endpoint proxy's
// idle controller calls it too.
func (s *Server) Suspend(ctx context.Context, account, id, reason string) error {
	return lifecycleError(s.lc.Suspend(ctx, account, id, reason), id)
}

// Resume asks the backend to resume a SUSPENDED microVM
// (lifecycle.Service.Resume): a ConflictException in any other state, a
// quota error when the host is full (it stays SUSPENDED). The endpoint
// proxy's auto-resume calls it too.
func (s *Server) Resume(ctx context.Context, account, id string) error {
	return lifecycleError(s.lc.Resume(ctx, account, id), id)
}

// Terminate moves a microVM to TERMINATING and asks the backend to stop it
// (lifecycle.Service.Terminate): a TERMINATED one is a ConflictException.
func (s *Server) Terminate(ctx context.Context, account, id, reason string) error {
	return lifecycleError(s.lc.Terminate(ctx, account, id, reason), id)
}

// lifecycleError is a transition's error as the API reports it: what the
// backend refused is the server's fault (but a full host is a quota
// error), the rest maps through toAPIError.
func lifecycleError(err error, id string) error {
	if err == nil {
		return nil
	}
	var be *lifecycle.BackendError
	if errors.As(err, &be) && !errors.Is(err, errdefs.ErrExhausted) {
		return internal(err.Error())
	}
	return toAPIError(err, kindMicrovm, id)
}

type authTokenInput struct {
	ExpirationInMinutes *int64     `json:"expirationInMinutes"`
	AllowedPorts        []PortSpec `json:"allowedPorts"`
}

func validatePorts(ports []PortSpec) error {
	if ports == nil {
		return fieldError("allowedPorts", nil, "Member must not be null")
	}
	if len(ports) == 0 || len(ports) > 20 {
		return fieldError("allowedPorts", nil, "Member must have between 1 and 20 items")
	}
	okPort := func(p *int64) bool { return p != nil && *p >= 1 && *p <= 65535 }
	for i, p := range ports {
		field := fmt.Sprintf("allowedPorts.%d", i+1)
		n := 0
		if p.Port != nil {
			n++
			if !okPort(p.Port) {
				return fieldError(field+".port", *p.Port, "Member must have value between 1 and 65535")
			}
		}
		if p.Range != nil {
			n++
			if !okPort(p.Range.StartPort) || !okPort(p.Range.EndPort) || *p.Range.StartPort > *p.Range.EndPort {
				return fieldError(field+".range", nil, "startPort and endPort must be between 1 and 65535 with startPort <= endPort")
			}
		}
		if p.AllPorts != nil {
			n++
		}
		if n != 1 {
			return fieldError(field, nil, "Member must set exactly one of port, range, allPorts")
		}
	}
	return nil
}

func (s *Server) issueToken(ctx context.Context, c *call, shell bool) (any, error) {
	var in authTokenInput
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	if in.ExpirationInMinutes == nil {
		return nil, fieldError("expirationInMinutes", nil, "Member must not be null")
	}
	if e := *in.ExpirationInMinutes; e < 1 || e > 60 {
		return nil, fieldError("expirationInMinutes", e, "Member must have value between 1 and 60")
	}
	if !shell {
		if err := validatePorts(in.AllowedPorts); err != nil {
			return nil, err
		}
	}
	if m.State == store.StateTerminated || m.State == store.StateTerminating {
		return nil, conflict(kindMicrovm, m.ID, "microvm %s is %s", m.ID, m.State)
	}
	if shell && !slices.ContainsFunc(m.IngressNetworkConnectors, func(a string) bool { return strings.HasSuffix(a, ":"+ShellIngressConnector) }) {
		return nil, validation("microvm %s was not run with the SHELL_INGRESS network connector (arn:aws:lambda:%s:aws:network-connector:%s)", m.ID, s.cfg.Region, ShellIngressConnector)
	}
	tok, err := s.cfg.Tokens.IssueToken(ctx, m, TokenRequest{Shell: shell, Expires: s.cfg.Now().Add(time.Duration(*in.ExpirationInMinutes) * time.Minute), Ports: in.AllowedPorts})
	if err != nil {
		return nil, fmt.Errorf("issuing token: %w", err)
	}
	return map[string]any{"authToken": tok}, nil
}

func (s *Server) createAuthToken(ctx context.Context, c *call) (any, error) {
	return s.issueToken(ctx, c, false)
}

func (s *Server) createShellAuthToken(ctx context.Context, c *call) (any, error) {
	return s.issueToken(ctx, c, true)
}

// getMicrovmLog is a kiln extension serving the backend's LogSource.
func (s *Server) getMicrovmLog(ctx context.Context, c *call) (any, error) {
	m, err := s.microvm(ctx, c)
	if err != nil {
		return nil, err
	}
	src, ok := s.be.(lifecycle.LogSource)
	if !ok {
		return nil, &Error{Status: 501, Type: "UnsupportedOperationException", Message: "this backend keeps no microVM logs"}
	}
	var off int64
	if o := c.r.URL.Query().Get("offset"); o != "" {
		if off, err = strconv.ParseInt(o, 10, 64); err != nil || off < 0 {
			return nil, fieldError("offset", o, "Member must be a non-negative integer")
		}
	}
	data, next, err := src.MicrovmLog(ctx, m, off, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("reading microvm log: %w", err)
	}
	return map[string]any{"microvmId": m.ID, "state": m.State, "log": string(data), "nextOffset": next}, nil
}
