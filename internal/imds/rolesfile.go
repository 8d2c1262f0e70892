package imds

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
)

// RolesFile is the roles file, re-read when it changes (size or mtime),
// so an operator adds a role without restarting kiln: VMs started after
// the change see it. A file that no longer parses keeps the last good
// roles, and the error is returned for the log.
type RolesFile struct {
	path string
	mu   sync.Mutex
	mod  time.Time
	size int64
	prov map[string]aws.CredentialsProvider
}

// OpenRolesFile reads path once; an error here stops the server start.
func OpenRolesFile(ctx context.Context, path string) (*RolesFile, error) {
	f := &RolesFile{path: path}
	if err := f.reload(ctx); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *RolesFile) reload(ctx context.Context) error {
	fi, err := os.Stat(f.path)
	if err != nil {
		return fmt.Errorf("roles file: %w", err)
	}
	if f.prov != nil && fi.ModTime().Equal(f.mod) && fi.Size() == f.size {
		return nil
	}
	r, err := LoadRoles(f.path)
	if err != nil {
		return err
	}
	p, err := r.Providers(ctx)
	if err != nil {
		return err
	}
	// A changed file gives every role a fresh provider (and session):
	// simpler than diffing sources, and changes are rare.
	f.prov, f.mod, f.size = p, fi.ModTime(), fi.Size()
	return nil
}

// Lookup returns the credentials of roleARN, re-reading the file first if
// it changed. err reports a failed re-read (the last good roles answer).
func (f *RolesFile) Lookup(ctx context.Context, roleARN string) (aws.CredentialsProvider, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.reload(ctx)
	p, ok := f.prov[roleARN]
	return p, ok, err
}

// Len is the number of roles known.
func (f *RolesFile) Len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.prov)
}
