//go:build linux

// Package pgtest runs tests against a private PostgreSQL cluster
// (internal/store/postgres/pglocal) under the project's rule: skip when
// postgresql-15 is missing, fail under CI. It stays free of testing so
// that TestMain can use it before tests run.
package pgtest

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
)

// Cluster is a running private cluster.
type Cluster = pglocal.Cluster

// Run is a TestMain body: it starts a cluster, runs tests with it, stops
// it and returns tests' exit code. When the binaries are missing, tests
// get a nil cluster and the reason, to skip; under CI=true that is a
// failure instead (exit code 1), as is a cluster that does not start.
// (-short is the caller's to check: this package stays free of testing.)
func Run(tests func(c *Cluster, skip string) int) int {
	if err := pglocal.Available(); err != nil {
		if os.Getenv("CI") != "" {
			fmt.Fprintln(os.Stderr, "pgtest:", err)
			return 1
		}
		return tests(nil, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	c, err := pglocal.Start(ctx)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtest: starting a cluster:", err)
		return 1
	}
	defer c.Stop()
	return tests(c, "")
}
