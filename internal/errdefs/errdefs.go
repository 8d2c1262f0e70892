// Package errdefs holds the few error categories every kiln package wraps
// its errors in, so that the API can map them to AWS error types in one
// place (errors.Is on the category, %w for the context).
package errdefs

import "errors"

var (
	// ErrNotFound: the thing named does not exist (or belongs to someone else).
	ErrNotFound = errors.New("not found")
	// ErrConflict: the thing exists but its state does not allow the operation.
	ErrConflict = errors.New("conflict")
	// ErrInvalid: the input is malformed or breaks a rule.
	ErrInvalid = errors.New("invalid")
	// ErrUnavailable: a dependency (QEMU, the kernel, the guest) is missing or
	// not answering; retrying later, or after set-up, may help.
	ErrUnavailable = errors.New("unavailable")
	// ErrExhausted: a limit is reached (an account's quota, the host's
	// memory); retrying after something else ends may help.
	ErrExhausted = errors.New("limit reached")
)
