//go:build linux

package engine

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"

	"github.com/kiln-sandbox/kiln/internal/imds"
	"github.com/kiln-sandbox/kiln/internal/netns"
)

// startIMDS serves the VM's metadata service in its namespace. The VM
// gets its role's credentials only if the operator's roles file has the
// role and the role is of the VM's own account (a tenant cannot pass
// another account's role, as IAM's PassRole forbids on AWS); otherwise
// the credential paths answer 404, as for a VM without a role.
func (e *Engine) startIMDS(ctx context.Context, v *vmState, n *netns.Net) (*imds.Server, error) {
	cfg := imds.Config{Log: e.log.With("microvm", v.id)}
	if v.role != "" {
		var creds aws.CredentialsProvider
		ok := false
		if e.cfg.Roles != nil {
			var err error
			if creds, ok, err = e.cfg.Roles.Lookup(ctx, v.role); err != nil {
				e.log.Warn("re-reading the roles file (the last good one answers)", "err", err)
			}
		}
		switch {
		case !ok:
			e.log.Warn("execution role is not in the roles file: the microvm gets no credentials", "microvm", v.id, "role", v.role)
		case imds.AccountOf(v.role) != v.account:
			e.log.Warn("execution role of another account: the microvm gets no credentials", "microvm", v.id, "role", v.role, "account", v.account)
		default:
			cfg.RoleARN, cfg.Credentials = v.role, creds
		}
	}
	h, err := imds.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("metadata service: %w", err)
	}
	srv, err := imds.Serve(ctx, n.NSPath, h)
	if err != nil {
		return nil, err
	}
	return srv, nil
}
