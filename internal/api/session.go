package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// principalKey carries the access key another adapter authenticated.
type principalKey struct{}

// WithPrincipal returns ctx carrying key as the caller of SessionHandler's
// operations. Only in-process code can set it: nothing a client sends
// becomes a context value.
func WithPrincipal(ctx context.Context, key store.AccessKey) context.Context {
	return context.WithValue(ctx, principalKey{}, key)
}

// SessionHandler serves every operation of Handler (same paths, same
// validation, same answers and error words) to callers that an adapter in
// this process has already authenticated some other way, as the web
// console does with its session cookie: the request's context must carry
// the caller's key (WithPrincipal), or every operation is refused. It
// never checks a SigV4 signature, so it must only be mounted behind such
// an adapter, never on its own.
func (s *Server) SessionHandler() http.Handler { return s.sessionMux }

// sessionPrincipal reads the body of a session request (bounded as signed
// ones are) and returns the principal the adapter put in its context.
func (s *Server) sessionPrincipal(w http.ResponseWriter, r *http.Request) ([]byte, store.AccessKey, *Error) {
	key, ok := r.Context().Value(principalKey{}).(store.AccessKey)
	if !ok || key.Account == "" {
		return nil, store.AccessKey{}, accessDenied("no session: sign in first")
	}
	if r.ContentLength > s.cfg.MaxBodyBytes {
		return nil, key, &Error{Status: 413, Type: "RequestTooLargeException",
			Message: fmt.Sprintf("request body of %d bytes exceeds %d bytes", r.ContentLength, s.cfg.MaxBodyBytes)}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, key, validation("request body exceeds %d bytes", s.cfg.MaxBodyBytes)
		}
		return nil, key, validation("reading request body: %v", err)
	}
	return body, key, nil
}

// uploadArtifactSession stores an upload for a session's account; the
// hash is computed here, as the browser declares none.
func (s *Server) uploadArtifactSession(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("x-amzn-RequestId", newRequestID())
	key, ok := r.Context().Value(principalKey{}).(store.AccessKey)
	if !ok || key.Account == "" {
		writeError(w, r, accessDenied("no session: sign in first"))
		return
	}
	s.storeArtifact(w, r, key, "")
}
