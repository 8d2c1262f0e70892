//go:build !unix

package proxy

// upAlive cannot peek here: the send tells.
func upAlive(*upConn) bool { return true }
