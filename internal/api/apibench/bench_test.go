package apibench

import (
	"context"
	"io"
	"testing"
	"time"
)

func TestRunSmall(t *testing.T) {
	res, err := Run(context.Background(), Options{Clients: 4, Records: 50, Duration: 200 * time.Millisecond, PageSize: 10, Dir: t.TempDir()}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Requests == 0 || r.Errors != 0 {
			t.Errorf("%s: %d requests, %d errors", r.Operation, r.Requests, r.Errors)
		}
	}
}
