package tunnel

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"
)

// dialTimeout bounds a Dial whose ctx has no earlier deadline: TCP, TLS,
// request and the node's reply (which includes its dial of the guest).
const dialTimeout = 15 * time.Second

// Dial opens a tunnel to port of microVM id on the node at nodeAddr
// (store.Node.TunnelAddr), authenticating with cfg (the edge's client
// certificate and the cluster CA). The connection returned carries the
// guest port's bytes; CloseWrite half-closes it. A refusal is a
// *ReplyError wrapping ErrNoSuchMicrovm, ErrUnavailable, ErrRefused,
// ErrBadRequest or ErrVersion.
func Dial(ctx context.Context, nodeAddr string, cfg *tls.Config, id string, port uint16) (net.Conn, error) {
	hdr, err := AppendRequest(make([]byte, 0, MaxRequestLen), Request{ID: id, Port: port})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	nc, err := d.DialContext(ctx, "tcp", nodeAddr)
	if err != nil {
		return nil, fmt.Errorf("tunnel to node %s: %w", nodeAddr, err)
	}
	c := nc.(*tls.Conn)
	// The deadline covers the exchange only; ctx ending breaks it too.
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	rep, err := exchange(c, hdr)
	if !stop() || err != nil {
		c.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("tunnel to microVM %s port %d on node %s: %w", id, port, nodeAddr, err)
	}
	if rep.Code != CodeOK {
		c.Close()
		return nil, fmt.Errorf("tunnel to microVM %s port %d on node %s: %w", id, port, nodeAddr, &ReplyError{Code: rep.Code, Msg: rep.Msg})
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

func exchange(c *tls.Conn, hdr []byte) (Reply, error) {
	if _, err := c.Write(hdr); err != nil {
		return Reply{}, err
	}
	return ReadReply(c)
}
