package api

import (
	"context"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// TokenIssuer makes the tokens that the endpoint proxy accepts in the
// X-aws-proxy-auth header. The returned map is the API's authToken.
type TokenIssuer interface {
	IssueToken(ctx context.Context, m store.Microvm, req TokenRequest) (map[string]string, error)
}

// TokenRequest is what a token grants.
type TokenRequest struct {
	Shell   bool      // a shell token (CreateMicrovmShellAuthToken)
	Expires time.Time // absolute expiry
	Ports   []PortSpec
}

// PortSpec is one entry of allowedPorts: exactly one of the fields is set.
type PortSpec struct {
	Port     *int64     `json:"port,omitempty"`
	Range    *PortRange `json:"range,omitempty"`
	AllPorts *struct{}  `json:"allPorts,omitempty"`
}

// PortRange is an inclusive range of ports.
type PortRange struct {
	StartPort *int64 `json:"startPort"`
	EndPort   *int64 `json:"endPort"`
}
