package netns

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
)

// TestRetryDump: an interrupted dump is asked again, a bounded number of
// times; other errors and answers pass at once.
func TestRetryDump(t *testing.T) {
	interrupted := func(times int) (func() (int, error), *int) {
		calls := 0
		return func() (int, error) {
			calls++
			if calls <= times {
				return -1, fmt.Errorf("listing: %w", netlink.ErrDumpInterrupted)
			}
			return 42, nil
		}, &calls
	}
	dump, calls := interrupted(2)
	if v, err := retryDump(dump); v != 42 || err != nil || *calls != 3 {
		t.Errorf("twice interrupted: %d %v after %d calls", v, err, *calls)
	}
	dump, calls = interrupted(100)
	if _, err := retryDump(dump); !errors.Is(err, netlink.ErrDumpInterrupted) || *calls != dumpRetries+1 {
		t.Errorf("always interrupted: %v after %d calls", err, *calls)
	}
	other := errors.New("permission denied")
	n := 0
	if _, err := retryDump(func() (int, error) { n++; return 0, other }); err != other || n != 1 {
		t.Errorf("another error: %v after %d calls", err, n)
	}
}
