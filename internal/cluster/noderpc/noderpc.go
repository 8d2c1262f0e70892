// Package noderpc is the RPC boundary between kiln's control plane and a
// node (one host's VM engine): gRPC over mutual TLS (clusterca), with
// messages as JSON, the same records the store keeps, so that a request
// carries everything the node needs and both sides share one definition
// of a microVM. There is no .proto: the service is described here, and
// the codec is registered under the content subtype "json".
//
// Who may call what is checked per method against the caller
// certificate's role: control drives the life cycle and builds; an edge
// may only wake a microVM and report its traffic.
package noderpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// ServiceName is the gRPC service a node serves.
const ServiceName = "kiln.node.v1.Node"

// MaxMessage bounds one message either way: the largest is a log read or
// a build's Dockerfile configuration, far below it.
const MaxMessage = 8 << 20

// Service is what a node does for the cluster: the engine's half of
// lifecycle.Backend (and its optional capabilities), plus what an edge
// asks. Every method returns quickly, as lifecycle.Backend's do.
type Service interface {
	StartMicrovm(ctx context.Context, m store.Microvm) error
	SuspendMicrovm(ctx context.Context, m store.Microvm) error
	ResumeMicrovm(ctx context.Context, m store.Microvm) error
	TerminateMicrovm(ctx context.Context, m store.Microvm) error
	BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error
	DeleteImageVersion(ctx context.Context, account, image, version string) error
	SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error)
	MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error)
	// EnsureRunning resumes a suspended microVM with auto-resume (through
	// the node's life cycle, as a request to it would on one host) and
	// returns once it runs; see proxy.Backend.
	EnsureRunning(ctx context.Context, id string) error
	// Activity marks microVMs as used at the times given (an edge's
	// requests), for the node's idle tracking.
	Activity(ctx context.Context, seen map[string]time.Time) error
	// ExportTemplate sends an image version's template (another node
	// lacks it): the first chunk holds the app's settings and the
	// manifest. errdefs.ErrNotFound if this node does not hold it.
	ExportTemplate(ctx context.Context, account, image, version string, send func(*TemplateChunk) error) error
	// Usage measures a microVM this node runs (E2B's getMetrics).
	Usage(ctx context.Context, id string) (vmm.Usage, error)
	// SetEgressPolicy replaces a microVM's own egress rules (E2B's
	// network rules), as e2b.Policer.
	SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error
}

// TemplateChunk is one message of a template moving between nodes.
type TemplateChunk struct {
	// App is the version's app settings (engine.AppConfig), first chunk only.
	App  json.RawMessage  `json:"app,omitempty"`
	Part vmm.TemplatePart `json:"part"`
}

// Messages. Empty answers are Empty.
type (
	MicrovmRequest struct {
		Microvm store.Microvm `json:"microvm"`
	}
	BuildRequest struct {
		Version store.ImageVersion `json:"version"`
		Builds  []store.Build      `json:"builds"`
	}
	VersionRequest struct {
		Account string `json:"account"`
		Image   string `json:"image"`
		Version string `json:"version"`
	}
	SnapshotRequest struct {
		Microvm store.Microvm `json:"microvm"`
		Image   string        `json:"image"`
		Version string        `json:"version"`
	}
	SnapshotReply struct {
		Snapshot store.SnapshotBuild `json:"snapshot"`
	}
	LogRequest struct {
		Microvm store.Microvm `json:"microvm"`
		Offset  int64         `json:"offset"`
		Limit   int           `json:"limit"`
	}
	LogReply struct {
		Data []byte `json:"data"`
		Next int64  `json:"next"`
	}
	WakeRequest struct {
		ID string `json:"id"`
	}
	ActivityRequest struct {
		Seen map[string]time.Time `json:"seen"`
	}
	UsageRequest struct {
		ID string `json:"id"`
	}
	UsageReply struct {
		Usage vmm.Usage `json:"usage"`
	}
	EgressRequest struct {
		ID           string             `json:"id"`
		Policy       netns.EgressPolicy `json:"policy"`
		AllowDomains []string           `json:"allowDomains"`
	}
	Empty struct{}
)

// codec carries messages as JSON.
type codec struct{}

func (codec) Name() string { return "json" }

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	if data.Len() > MaxMessage {
		return fmt.Errorf("message of %d bytes is over %d", data.Len(), MaxMessage)
	}
	return json.Unmarshal(data.Materialize(), v)
}

// callers says which roles may call each method.
var callers = map[string][]clusterca.Role{
	"Start": {clusterca.Control}, "Suspend": {clusterca.Control}, "Resume": {clusterca.Control},
	"Terminate": {clusterca.Control}, "Build": {clusterca.Control}, "DeleteImageVersion": {clusterca.Control},
	"Snapshot": {clusterca.Control}, "Log": {clusterca.Control},
	"Usage": {clusterca.Control}, "SetEgressPolicy": {clusterca.Control},
	"EnsureRunning": {clusterca.Control, clusterca.Edge}, "Activity": {clusterca.Control, clusterca.Edge},
	"ExportTemplate": {clusterca.Node},
}

func method[Req, Resp any](name string, call func(context.Context, Service, *Req) (*Resp, error)) grpc.MethodDesc {
	full := "/" + ServiceName + "/" + name
	return grpc.MethodDesc{MethodName: name, Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
		if err := allowed(ctx, name); err != nil {
			return nil, err
		}
		req := new(Req)
		if err := dec(req); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "decoding %s: %v", name, err)
		}
		h := func(ctx context.Context, r any) (any, error) {
			resp, err := call(ctx, srv.(Service), r.(*Req))
			return resp, toStatus(err)
		}
		if ic == nil {
			return h(ctx, req)
		}
		return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: full}, h)
	}}
}

// allowed checks the caller's certificate role against the method's.
func allowed(ctx context.Context, name string) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "the node service needs mutual TLS")
	}
	role, name2, err := clusterca.PeerName(ti.State)
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	for _, r := range callers[name] {
		if r == role {
			return nil
		}
	}
	return status.Errorf(codes.PermissionDenied, "%s %s may not call %s", role, name2, name)
}

var empty = &Empty{}

func done(err error) (*Empty, error) { return empty, err }

var serviceDesc = grpc.ServiceDesc{
	ServiceName: ServiceName,
	HandlerType: (*Service)(nil),
	Methods: []grpc.MethodDesc{
		method("Start", func(ctx context.Context, s Service, r *MicrovmRequest) (*Empty, error) {
			return done(s.StartMicrovm(ctx, r.Microvm))
		}),
		method("Suspend", func(ctx context.Context, s Service, r *MicrovmRequest) (*Empty, error) {
			return done(s.SuspendMicrovm(ctx, r.Microvm))
		}),
		method("Resume", func(ctx context.Context, s Service, r *MicrovmRequest) (*Empty, error) {
			return done(s.ResumeMicrovm(ctx, r.Microvm))
		}),
		method("Terminate", func(ctx context.Context, s Service, r *MicrovmRequest) (*Empty, error) {
			return done(s.TerminateMicrovm(ctx, r.Microvm))
		}),
		method("Build", func(ctx context.Context, s Service, r *BuildRequest) (*Empty, error) {
			return done(s.BuildImage(ctx, r.Version, r.Builds))
		}),
		method("DeleteImageVersion", func(ctx context.Context, s Service, r *VersionRequest) (*Empty, error) {
			return done(s.DeleteImageVersion(ctx, r.Account, r.Image, r.Version))
		}),
		method("Snapshot", func(ctx context.Context, s Service, r *SnapshotRequest) (*SnapshotReply, error) {
			sb, err := s.SnapshotMicrovm(ctx, r.Microvm, r.Image, r.Version)
			return &SnapshotReply{Snapshot: sb}, err
		}),
		method("Log", func(ctx context.Context, s Service, r *LogRequest) (*LogReply, error) {
			if r.Limit <= 0 || r.Limit > MaxMessage/2 {
				return nil, fmt.Errorf("log limit %d: want 1 to %d: %w", r.Limit, MaxMessage/2, errdefs.ErrInvalid)
			}
			data, next, err := s.MicrovmLog(ctx, r.Microvm, r.Offset, r.Limit)
			return &LogReply{Data: data, Next: next}, err
		}),
		method("EnsureRunning", func(ctx context.Context, s Service, r *WakeRequest) (*Empty, error) {
			return done(s.EnsureRunning(ctx, r.ID))
		}),
		method("Activity", func(ctx context.Context, s Service, r *ActivityRequest) (*Empty, error) {
			return done(s.Activity(ctx, r.Seen))
		}),
		method("Usage", func(ctx context.Context, s Service, r *UsageRequest) (*UsageReply, error) {
			u, err := s.Usage(ctx, r.ID)
			return &UsageReply{Usage: u}, err
		}),
		method("SetEgressPolicy", func(ctx context.Context, s Service, r *EgressRequest) (*Empty, error) {
			return done(s.SetEgressPolicy(ctx, r.ID, r.Policy, r.AllowDomains))
		}),
	},
	Streams: []grpc.StreamDesc{{StreamName: "ExportTemplate", ServerStreams: true,
		Handler: func(srv any, stream grpc.ServerStream) error {
			if err := allowed(stream.Context(), "ExportTemplate"); err != nil {
				return err
			}
			var req VersionRequest
			if err := stream.RecvMsg(&req); err != nil {
				return status.Errorf(codes.InvalidArgument, "decoding ExportTemplate: %v", err)
			}
			return toStatus(srv.(Service).ExportTemplate(stream.Context(), req.Account, req.Image, req.Version,
				func(c *TemplateChunk) error { return stream.SendMsg(c) }))
		}}},
}

// NewServer returns a gRPC server for svc on the node's identity, which
// admits control, edges and other nodes (each to its own methods).
func NewServer(id *clusterca.Identity, svc Service) *grpc.Server {
	s := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(id.ServerTLS(clusterca.Control, clusterca.Edge, clusterca.Node))),
		grpc.ForceServerCodecV2(codec{}),
		grpc.MaxRecvMsgSize(MaxMessage), grpc.MaxSendMsgSize(MaxMessage),
		grpc.ConnectionTimeout(10*time.Second),
	)
	s.RegisterService(&serviceDesc, svc)
	return s
}

// Error categories cross the wire as gRPC codes, and come back as the
// same errdefs category with the node's message.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Unknown
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, errdefs.ErrConflict):
		code = codes.FailedPrecondition
	case errors.Is(err, errdefs.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, errdefs.ErrExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, errdefs.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}

// RemoteError is an error a node returned, in its errdefs category.
type RemoteError struct {
	Node string
	Code codes.Code
	Msg  string
}

func (e *RemoteError) Error() string { return "node " + e.Node + ": " + e.Msg }

func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case codes.NotFound:
		return errdefs.ErrNotFound
	case codes.FailedPrecondition, codes.AlreadyExists:
		return errdefs.ErrConflict
	case codes.InvalidArgument:
		return errdefs.ErrInvalid
	case codes.ResourceExhausted:
		return errdefs.ErrExhausted
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Aborted:
		return errdefs.ErrUnavailable
	}
	return nil
}

func fromStatus(node string, err error) error {
	if err == nil {
		return nil
	}
	st, _ := status.FromError(err)
	return &RemoteError{Node: node, Code: st.Code(), Msg: st.Message()}
}
