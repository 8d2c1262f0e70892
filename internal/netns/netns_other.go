//go:build !linux

package netns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"time"
)

// Network namespaces exist on Linux only; the CLI still builds elsewhere.

func Setup(ctx context.Context, cfg Config) (*Net, error) { return nil, errors.ErrUnsupported }
func Open(ctx context.Context, id string) (*Net, error)   { return nil, errors.ErrUnsupported }
func (n *Net) Teardown(ctx context.Context) error         { return errors.ErrUnsupported }
func Teardown(ctx context.Context, id string) error       { return errors.ErrUnsupported }
func Reconcile(ctx context.Context, keep func(id string) bool) ([]string, error) {
	return nil, errors.ErrUnsupported
}
func SetEgressPolicy(ctx context.Context, id string, p EgressPolicy) error {
	return errors.ErrUnsupported
}
func AllowLearned(ctx context.Context, id string, addrs []netip.Addr, ttl time.Duration) error {
	return errors.ErrUnsupported
}
func RemoveHostRules() error                       { return errors.ErrUnsupported }
func RestoreHost() (bool, error)                   { return false, errors.ErrUnsupported }
func RunInNS(nsPath string, fn func() error) error { return errors.ErrUnsupported }

func HostDialer(timeout time.Duration) *net.Dialer { return &net.Dialer{Timeout: timeout} }

func NewSpare() (*os.File, error) { return nil, errors.ErrUnsupported }
func AdoptTap(ctx context.Context, nsPath string, spare *os.File) error {
	return errors.ErrUnsupported
}
