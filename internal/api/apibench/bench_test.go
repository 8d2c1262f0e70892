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
	ops := map[string]bool{}
	for _, r := range res {
		ops[r.Operation] = true
		if r.Requests == 0 || r.Errors != 0 {
			t.Errorf("%s: %d requests, %d errors", r.Operation, r.Requests, r.Errors)
		}
		if (r.Operation == "RunMicrovm") != (r.Backend == FakeBackend) {
			t.Errorf("%s is labelled backend %q", r.Operation, r.Backend)
		}
	}
	if len(ops) != 3 || !ops["RunMicrovm"] {
		t.Errorf("operations measured: %v", ops)
	}
}
