//go:build linux

package engine

import (
	"testing"
	"time"
)

// TestHookTimeoutDefault: a runtime hook without a timeout gets the
// longest AWS allows (MicrovmHooks *TimeoutInSeconds: 1-60), not the old
// 10 s that failed hooks AWS would have waited for.
func TestHookTimeoutDefault(t *testing.T) {
	if got := hookTimeout(nil); got != 60*time.Second {
		t.Errorf("default runtime hook timeout %v, want 60s", got)
	}
	n := int64(7)
	if got := hookTimeout(&n); got != 7*time.Second {
		t.Errorf("explicit timeout: %v, want 7s", got)
	}
}
