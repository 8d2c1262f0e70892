//go:build !linux

package apibench

import (
	"context"
	"errors"
)

func startPostgres(context.Context) (string, func(), error) {
	return "", nil, errors.New("a private PostgreSQL cluster runs on Linux only; give --store a postgres:// URL")
}
