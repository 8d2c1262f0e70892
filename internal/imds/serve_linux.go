//go:build linux

package imds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
)

// Server is a Handler listening in one VM's namespace; Close stops it.
type Server struct {
	srv *http.Server
	ln  net.Listener
}

// Serve listens at netns.MetadataAddr:MetadataPort inside the namespace at
// nsPath ("" = the current one, for tests) and serves h until Close.
func Serve(ctx context.Context, nsPath string, h http.Handler) (*Server, error) {
	addr := net.JoinHostPort(netns.MetadataAddr.String(), strconv.Itoa(netns.MetadataPort))
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", addr)
		return err
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = netns.RunInNS(nsPath, listen)
	}
	if err != nil {
		return nil, fmt.Errorf("metadata service: listening on %s: %w", addr, err)
	}
	s := &Server{ln: ln, srv: &http.Server{
		Handler: guestOnly(h),
		// The guest is untrusted: small headers, short timeouts.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      40 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    8 << 10,
	}}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_ = err // the listener closed under us: Close was called
		}
	}()
	return s, nil
}

// guestOnly answers only the guest's own address (nftables already admits
// no other; this holds if the rules change).
func guestOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil || (ap.Addr().Unmap() != netns.GuestAddr && !ap.Addr().IsLoopback()) {
			http.Error(w, "Forbidden", http.StatusForbidden)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
		h.ServeHTTP(w, r)
	})
}

// Close stops serving; safe to call twice.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return s.srv.Shutdown(ctx)
}
