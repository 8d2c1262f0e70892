package noderpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// CallTimeout bounds one call: every node method only accepts work (or
// waits for a wake, which the caller bounds itself).
const CallTimeout = 30 * time.Second

// Client calls one node. It implements Service, so that control holds a
// node as it would hold a local engine.
type Client struct {
	node string
	conn *grpc.ClientConn
}

// Dial prepares a client of the node named node at addr (host:port); the
// connection is made on first use and re-made after failures.
func Dial(node, addr string, cfg *tls.Config) (*Client, error) {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(codec{}), grpc.MaxCallRecvMsgSize(MaxMessage), grpc.MaxCallSendMsgSize(MaxMessage)),
	)
	if err != nil {
		return nil, fmt.Errorf("node %s at %s: %w", node, addr, err)
	}
	return &Client{node: node, conn: conn}, nil
}

// Close ends the client's connection.
func (c *Client) Close() error { return c.conn.Close() }

func call[Resp any](ctx context.Context, c *Client, name string, req any) (*Resp, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, CallTimeout)
		defer cancel()
	}
	resp := new(Resp)
	err := c.conn.Invoke(ctx, "/"+ServiceName+"/"+name, req, resp)
	return resp, fromStatus(c.node, err)
}

func (c *Client) StartMicrovm(ctx context.Context, m store.Microvm) error {
	_, err := call[Empty](ctx, c, "Start", &MicrovmRequest{Microvm: m})
	return err
}

func (c *Client) SuspendMicrovm(ctx context.Context, m store.Microvm) error {
	_, err := call[Empty](ctx, c, "Suspend", &MicrovmRequest{Microvm: m})
	return err
}

func (c *Client) ResumeMicrovm(ctx context.Context, m store.Microvm) error {
	_, err := call[Empty](ctx, c, "Resume", &MicrovmRequest{Microvm: m})
	return err
}

func (c *Client) TerminateMicrovm(ctx context.Context, m store.Microvm) error {
	_, err := call[Empty](ctx, c, "Terminate", &MicrovmRequest{Microvm: m})
	return err
}

func (c *Client) BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error {
	_, err := call[Empty](ctx, c, "Build", &BuildRequest{Version: v, Builds: builds})
	return err
}

func (c *Client) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	_, err := call[Empty](ctx, c, "DeleteImageVersion", &VersionRequest{Account: account, Image: image, Version: version})
	return err
}

func (c *Client) SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error) {
	r, err := call[SnapshotReply](ctx, c, "Snapshot", &SnapshotRequest{Microvm: m, Image: image, Version: version})
	if err != nil {
		return store.SnapshotBuild{}, err
	}
	return r.Snapshot, nil
}

func (c *Client) MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	r, err := call[LogReply](ctx, c, "Log", &LogRequest{Microvm: m, Offset: offset, Limit: limit})
	if err != nil {
		return nil, offset, err
	}
	return r.Data, r.Next, nil
}

func (c *Client) EnsureRunning(ctx context.Context, id string) error {
	_, err := call[Empty](ctx, c, "EnsureRunning", &WakeRequest{ID: id})
	return err
}

func (c *Client) Activity(ctx context.Context, seen map[string]time.Time) error {
	_, err := call[Empty](ctx, c, "Activity", &ActivityRequest{Seen: seen})
	return err
}

func (c *Client) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	r, err := call[UsageReply](ctx, c, "Usage", &UsageRequest{ID: id})
	if err != nil {
		return vmm.Usage{}, err
	}
	return r.Usage, nil
}

func (c *Client) SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error {
	_, err := call[Empty](ctx, c, "SetEgressPolicy", &EgressRequest{ID: id, Policy: p, AllowDomains: allowDomains})
	return err
}

func (c *Client) ExportTemplate(ctx context.Context, account, image, version string, send func(*TemplateChunk) error) error {
	return c.FetchTemplate(ctx, account, image, version, func(next func() (*TemplateChunk, error)) error {
		for {
			ch, err := next()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := send(ch); err != nil {
				return err
			}
		}
	})
}

// FetchTemplate asks the node for an image version's template and hands
// recv the chunks as they come (next returns io.EOF after the last).
func (c *Client) FetchTemplate(ctx context.Context, account, image, version string, recv func(next func() (*TemplateChunk, error)) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.conn.NewStream(ctx, &serviceDesc.Streams[0], "/"+ServiceName+"/ExportTemplate")
	if err != nil {
		return fromStatus(c.node, err)
	}
	if err := st.SendMsg(&VersionRequest{Account: account, Image: image, Version: version}); err != nil {
		return fromStatus(c.node, err)
	}
	if err := st.CloseSend(); err != nil {
		return fromStatus(c.node, err)
	}
	return recv(func() (*TemplateChunk, error) {
		ch := new(TemplateChunk)
		err := st.RecvMsg(ch)
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return ch, fromStatus(c.node, err)
	})
}

var _ Service = (*Client)(nil)

// Dialer gives the client of a node; *Clients is the real one.
type Dialer interface {
	Get(n store.Node) (*Client, error)
}

var _ Dialer = (*Clients)(nil)

// Clients keeps one client per node, re-made when a node registers a new
// address.
type Clients struct {
	cfg *tls.Config
	mu  sync.Mutex
	by  map[string]*pooled
}

type pooled struct {
	addr string
	c    *Client
}

// NewClients returns a pool whose clients use cfg (clusterca's ClientTLS
// for the node role).
func NewClients(cfg *tls.Config) *Clients { return &Clients{cfg: cfg, by: map[string]*pooled{}} }

// Get returns the client of n.
func (p *Clients) Get(n store.Node) (*Client, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.by[n.Name]; ok && c.addr == n.RPCAddr {
		return c.c, nil
	} else if ok {
		c.c.Close()
		delete(p.by, n.Name)
	}
	c, err := Dial(n.Name, n.RPCAddr, p.cfg)
	if err != nil {
		return nil, err
	}
	p.by[n.Name] = &pooled{addr: n.RPCAddr, c: c}
	return c, nil
}

// Close ends every client.
func (p *Clients) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, c := range p.by {
		c.c.Close()
		delete(p.by, k)
	}
}
