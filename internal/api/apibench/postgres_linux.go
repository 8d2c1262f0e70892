package apibench

import (
	"context"

	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
)

// startPostgres starts a private cluster and returns a database's URL and
// what stops the cluster.
func startPostgres(ctx context.Context) (string, func(), error) {
	c, err := pglocal.Start(ctx)
	if err != nil {
		return "", nil, err
	}
	url, err := c.NewDatabase(ctx)
	if err != nil {
		c.Stop()
		return "", nil, err
	}
	return url, c.Stop, nil
}
