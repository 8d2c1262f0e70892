//go:build !linux

package proxy

import (
	"net"
	"time"
)

// waitDelivered has no queue to look at here: a pause stands in.
func waitDelivered(net.Conn) { time.Sleep(50 * time.Millisecond) }
